# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Detection
#
# Can a small classifier tell a perturbed preference pair from the original it came from, by looking
# at the reward model's internals at block `layer`? Each successful perturbation of the
# perturbations stage gives two samples: the original pair (label 0) and the perturbed pair
# (label 1). A sample's input is `|f(chosen) - f(rejected)|`, where `f` is the mean-pooled SAE code
# (**sae** features) or the mean-pooled hidden state (**raw** features) of each side.
#
# The detector is the MLP of Liu et al. (arXiv 2605.16339): one hidden layer of 128, batch
# normalisation and dropout 0.3. Early stopping watches a validation split, and the best epoch's
# weights are kept. A logistic regression on
# the same inputs is the linear baseline. Cases are split into training, validation and test sides
# by case id, so a case's original and perturbed pairs never sit on two sides.

# %% tags=["parameters", "remove-cell"]
profile = "demo"
model_name = "demo-minilm-hh"
model_tag = "demo-minilm-hh"
layer = 2
sae = "released"
data = "hh-rlhf"
split = "demo-eval"
limit = None
batch_size = 32
device = "auto"
device_map = None
records_dir = None
feature_types = "sae,raw"
case_type = "successfully_attacked"
reward_threshold = 0.0
test_ratio = 0.3
validation_ratio = 0.15
seed = 0
hidden_dims = [128]
dropout = 0.3
learning_rate = 0.001
detector_batch_size = 32
max_epochs = 100
patience = 10
bootstrap_samples = 1000
compare_ungrouped = True
results_path = "detection.json"

# %%
from rmsae.experiments import LAYER_PARAMETERS, RUN_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), {
    **RUN_PARAMETERS,
    **LAYER_PARAMETERS,
    "records_dir": ("path", {"optional": True}),
    "feature_types": ("str_list", {"choices": ["sae", "raw"]}),
    "case_type": ("str", {"choices": ["successfully_attacked", "initial_classification"]}),
    "reward_threshold": ("float", {"minimum": 0.0}),
    "test_ratio": ("float", {"minimum": 0.0, "maximum": 1.0}),
    "validation_ratio": ("float", {"minimum": 0.0, "maximum": 1.0}),
    "seed": ("int", {"minimum": 0}),
    "hidden_dims": ("int_list", {"minimum": 1}),
    "dropout": ("float", {"minimum": 0.0, "maximum": 1.0}),
    "learning_rate": ("float", {"minimum": 0.0}),
    "detector_batch_size": ("int", {"minimum": 1}),
    "max_epochs": ("int", {"minimum": 1}),
    "patience": ("int", {"minimum": 1}),
    "bootstrap_samples": ("int", {"minimum": 1}),
    "compare_ungrouped": ("bool", {}),
}))
# The per-layer run folder sits inside the model's folder, where the perturbations stage wrote its records.
records_dir = records_dir or results_path.parent.parent

# %%
import pandas as pd
from myst_nb import glue

from rmsae.cache import ActivationCache
from rmsae.detection import build_detection_data, load_or_make_split, make_split, run_detection
from rmsae.experiments import load_run_records, load_run_sae, save_results, show, table
from rmsae.plots import roc_curves, training_curves, transfer_heatmaps
from rmsae.reward_model import load_reward_model

reward_model = load_reward_model(model_tag, device=device, device_map=device_map)
loaded = None
if "sae" in feature_types:
    loaded = load_run_sae(sae, model_name, layer, reward_model.hidden_size, device=reward_model.block_device(layer))
records = load_run_records(records_dir)
with ActivationCache(reward_model.cache_namespace()) as cache:
    detection_data = build_detection_data(
        reward_model, records, layer=layer, sae=loaded, feature_types=feature_types, case_type=case_type,
        reward_threshold=reward_threshold, seed=seed, batch_size=batch_size, cache=cache, progress=False,
    )
split_settings = {"test_ratio": test_ratio, "validation_ratio": validation_ratio, "seed": seed, "model": reward_model.spec.tag}
manifest = load_or_make_split(results_path.with_name("detection_split.json"), detection_data, **split_settings)
detector_params = {"hidden_dims": hidden_dims, "dropout": dropout, "learning_rate": learning_rate,
                   "batch_size": detector_batch_size, "max_epochs": max_epochs, "patience": patience}
print(f"{model_name}, layer {layer}: {len(detection_data)} samples from {len(set(detection_data.case_ids))} cases "
      f"({len(records)} perturbation records).")

# %% [markdown]
# ## Samples and split
#
# Cases and samples per perturbation type, and the number of cases on each side of the split. The
# split manifest (`detection_split.json` beside this notebook) is reused by the mitigation stage.

# %%
placed = pd.DataFrame({"attack_type": detection_data.attack_types, "case_id": detection_data.case_ids,
                       "side": manifest.sides(detection_data)}).drop_duplicates()
by_side = pd.crosstab(placed["attack_type"], placed["side"]).add_suffix(" cases").reset_index()
table(detection_data.counts().merge(by_side, on="attack_type"), digits=0)

# %% [markdown]
# ## Detection on the test cases
#
# Accuracy, precision, recall, F1 and ROC AUC of each detector on the test side, with bootstrap 95%
# intervals that resample whole cases. The positive class is "perturbed".

# %%
results = run_detection(detection_data, manifest, detector_params=detector_params, n_resamples=bootstrap_samples)
rows = []
for name in feature_types:
    for classifier, entry in (("MLP", results[name]), ("logistic", results[name]["logistic"])):
        overall = entry["overall"]
        rows.append({"features": name, "classifier": classifier, **{key: value for key, value in overall.items() if key != "confusion_matrix"}})
metrics = pd.DataFrame(rows)
for name in feature_types:
    glue(f"{name}_auc", round(results[name]["overall"]["roc_auc"], 3), display=False)
table(metrics, ["features", "classifier", "n", "accuracy", "precision", "recall", "f1", "roc_auc", "roc_auc_low", "roc_auc_high"])

# %% [markdown]
# With SAE features the MLP reaches a test ROC AUC of {glue:text}`sae_auc`; with raw hidden states,
# {glue:text}`raw_auc`. The ROC curves of the MLP detectors:

# %%
samples = {name: pd.DataFrame(results[name]["samples"]) for name in feature_types}
show("detection_roc", roc_curves(samples))

# %% [markdown]
# ## Per perturbation type
#
# The same MLP detectors, scored on the test cases of each perturbation type separately. Types with
# few test cases (column `n`) give unreliable numbers, and their bootstrap intervals can even collapse
# to a point, so read them with `n`.

# %%
per_type = pd.DataFrame([
    {"features": name, "attack_type": kind, **{key: value for key, value in values.items() if key != "confusion_matrix"}}
    for name in feature_types for kind, values in results[name]["per_type"].items()
])
table(per_type, ["features", "attack_type", "n", "accuracy", "f1", "roc_auc", "roc_auc_low", "roc_auc_high"])

# %% [markdown]
# ## Transfer between perturbation types
#
# A detector trained on one type's training cases only, tested on each type's test cases (ROC AUC).
# The paper does not report this; it shows whether the features the detector uses are specific to
# one kind of edit. Rows of types with fewer than five training cases are empty.

# %%
show("detection_transfer", transfer_heatmaps({name: results[name]["transfer"] for name in feature_types}))

# %% [markdown]
# ## Training
#
# Loss per epoch of each MLP detector; the dotted line marks the epoch whose weights are kept (the
# lowest validation loss).

# %%
show("detection_training", training_curves({name: results[name]["training"]["history"] for name in feature_types},
                                           {name: results[name]["training"]["best_epoch"] for name in feature_types}))

# %% [markdown]
# ## The authors' split
#
# The authors split samples, not cases, so a case's original pair can be in training while its
# perturbed pair is tested. The table compares the test ROC AUC of the same detector on both splits;
# the page of this stage explains why the authors' number is no estimate for unseen cases.

# %%
comparison = {}
if compare_ungrouped:
    ungrouped = make_split(detection_data, mode="ungrouped", **split_settings)
    ungrouped_results = run_detection(detection_data, ungrouped, detector_params=detector_params,
                                      n_resamples=bootstrap_samples, baseline=False, transfer=False)
    comparison = {name: {"grouped": results[name]["overall"]["roc_auc"], "ungrouped": ungrouped_results[name]["overall"]["roc_auc"]}
                  for name in feature_types}
    frame = pd.DataFrame([{"features": name, "grouped split (ours)": values["grouped"], "ungrouped split (authors')": values["ungrouped"],
                           "difference": values["ungrouped"] - values["grouped"]} for name, values in comparison.items()])
    display_table = table(frame)
else:
    display_table = "The comparison is switched off (compare_ungrouped = False)."
display_table

# %%
probabilities = pd.concat([frame.assign(features=name) for name, frame in samples.items()], ignore_index=True)
probabilities.to_csv(results_path.with_name("detection_probabilities.csv"), index=False)
summary = {"samples": len(detection_data), "cases": len(set(detection_data.case_ids)), "split": results["split"],
           "case_type": case_type, "comparison": comparison}
for name in feature_types:
    entry = results[name]
    for key, value in entry["overall"].items():
        summary[f"{name}_{key}"] = value
    summary[f"{name}_logistic_roc_auc"] = entry["logistic"]["overall"]["roc_auc"]
    summary[f"{name}_best_epoch"] = entry["training"]["best_epoch"]
    summary[f"{name}_per_type"] = {kind: {key: values[key] for key in ("n", "roc_auc", "roc_auc_low", "roc_auc_high", "f1")}
                                   for kind, values in entry["per_type"].items()}
    summary[f"{name}_transfer"] = entry["transfer"]
    if comparison:
        summary[f"{name}_ungrouped_roc_auc"] = comparison[name]["ungrouped"]
results_file = save_results(results_path, summary)
