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
# # Mitigation
#
# Three ways to restore the preferences that perturbations flipped, all with the reward model's
# weights untouched, fitted on the training cases of the detection stage's split and evaluated on
# its test cases:
#
# - **SAE Feature Steering (SAE FS)**: the `top_k` SAE latents that fire most above their benign
#   level on perturbed texts are scaled by η inside block `layer`. In `replace` mode (as Liu et al.,
#   arXiv 2605.16339, steer) the block output becomes the SAE reconstruction, so the η = 1 row, which only splices the SAE in,
#   is the control to compare with. `error_preserving` keeps the SAE's reconstruction error.
# - **SAE Residual Correction (SAE RC)**: a linear head on pooled SAE codes adds a correction to
#   each reward; it needs no new forward pass.
# - **Raw Feature Steering (Raw FS)**: β times the difference of mean pooled hidden states of
#   perturbed and benign texts is subtracted at every token of block `layer`'s output.
#
# A method works when perturbed pairs are ranked correctly again and benign pairs keep their ranking.

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
reward_threshold = 0.0
ranking = "mean_diff"
top_k = 200
positive_only = True
eta = -0.001
steering_mode = "replace"
token_scope = "all"
beta = 5.0
rc_epochs = 100
rc_learning_rate = 0.001
rc_reg_weight = 0.05
rc_margin = 1.0
rc_standardize = False
rc_margin_in_std = False
eta_sweep = [-0.001, -0.01, -0.1, -1.0]
top_k_sweep = [25, 50, 100, 200]
rc_epochs_sweep = [100, 200, 300, 400]
beta_sweep = [1.0, 5.0, 10.0, 15.0]
partial_forward = True
partial_forward_max_gb = 8.0
bootstrap_samples = 1000
seed = 0
results_path = "mitigation.json"

# %%
from rmsae.experiments import LAYER_PARAMETERS, RUN_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), {
    **RUN_PARAMETERS,
    **LAYER_PARAMETERS,
    "records_dir": ("path", {"optional": True}),
    "reward_threshold": ("float", {"minimum": 0.0}),
    "ranking": ("str", {"choices": ["mean_diff", "median_diff", "ttest", "effect_size"]}),
    "top_k": ("int", {"minimum": 1}),
    "positive_only": ("bool", {}),
    "eta": ("float", {}),
    "steering_mode": ("str", {"choices": ["replace", "error_preserving"]}),
    "token_scope": ("str", {"choices": ["all", "response"]}),
    "beta": ("float", {}),
    "rc_epochs": ("int", {"minimum": 1}),
    "rc_learning_rate": ("float", {"minimum": 0.0}),
    "rc_reg_weight": ("float", {"minimum": 0.0}),
    "rc_margin": ("float", {"minimum": 0.0}),
    "rc_standardize": ("bool", {}),
    "rc_margin_in_std": ("bool", {}),
    "eta_sweep": ("float_list", {}),
    "top_k_sweep": ("int_list", {"minimum": 1}),
    "rc_epochs_sweep": ("int_list", {"minimum": 1}),
    "beta_sweep": ("float_list", {}),
    "partial_forward": ("bool", {}),
    "partial_forward_max_gb": ("float", {"minimum": 0.0}),
    "bootstrap_samples": ("int", {"minimum": 1}),
    "seed": ("int", {"minimum": 0}),
}))
# The per-layer run folder sits inside the model's folder, where the perturbations stage wrote its records.
records_dir = records_dir or results_path.parent.parent
run_dir = results_path.parent

# %%
import numpy as np
import pandas as pd
from myst_nb import glue

from rmsae.cache import ActivationCache
from rmsae.detection import SplitManifest
from rmsae.experiments import load_run_records, load_run_sae, save_results, show, table
from rmsae.mitigation import (
    CorrectionData, GapsBeforeAfter, MitigationError, RawFeatureSteering, ResidualCorrection, SAEFeatureSteering, evaluate_gaps, pair_features,
    capture_case_outputs, rank_latents, select_latents, split_cases, steered_gaps, steering_direction, text_codes,
)
from rmsae.plots import ablation_curves, mitigation_gaps, recovery_bucket_bars
from rmsae.reward_model import load_reward_model

reward_model = load_reward_model(model_tag, device=device, device_map=device_map)
loaded = load_run_sae(sae, model_name, layer, reward_model.hidden_size, device=reward_model.block_device(layer))
manifest = SplitManifest.load(run_dir / "detection_split.json")
cases = split_cases(load_run_records(records_dir), manifest, model=reward_model.spec.tag, reward_threshold=reward_threshold)
if not len(cases["test"]):
    raise MitigationError(f"The test side of {run_dir / 'detection_split.json'} contains no successfully perturbed case; perturb more pairs.")
features = {}
with ActivationCache(reward_model.cache_namespace()) as cache:
    for side, side_cases in cases.items():
        features[side] = {
            variant: pair_features(reward_model, pairs, layer=layer, sae=loaded, cache=cache, batch_size=batch_size, progress=False)
            for variant, pairs in (("benign", side_cases.originals), ("perturbed", side_cases.perturbed))
        }
print(f"{model_name}, layer {layer}: " + ", ".join(f"{len(c)} {side} cases" for side, c in cases.items()) + ".")

# %% [markdown]
# ## Fitting
#
# All three methods are fitted on the training cases; Residual Correction keeps the epoch with the
# lowest loss on the validation cases. Each fitted method is saved beside this notebook
# (`*.safetensors` with a `.json` of its settings) and reloaded for the evaluation, as later stages
# reload it.

# %%
train, validation = features["train"], features["validation"]
fitted_on = {"model": reward_model.spec.tag, "layer": layer, "split": str(run_dir / "detection_split.json"),
             "train_cases": len(cases["train"]), "validation_cases": len(cases["validation"])}
latent_scores = rank_latents(text_codes(train["perturbed"], "sae"), text_codes(train["benign"], "sae"), ranking)
latents = select_latents(latent_scores, top_k, positive_only=positive_only)
SAEFeatureSteering(loaded, latents, eta, steering_mode, token_scope).save(run_dir / "sae_feature_steering", {**fitted_on, "ranking": ranking}, latent_scores)
RawFeatureSteering(steering_direction(train["perturbed"], train["benign"]), layer, beta, token_scope).save(run_dir / "raw_feature_steering", fitted_on)


def fit_correction(epochs):
    correction = ResidualCorrection(margin=rc_margin, reg_weight=rc_reg_weight, learning_rate=rc_learning_rate, epochs=epochs,
                                    standardize=rc_standardize, margin_in_std=rc_margin_in_std, seed=seed)
    validation_data = CorrectionData.from_features(validation["benign"], validation["perturbed"]) if len(cases["validation"]) else None
    return correction.fit(CorrectionData.from_features(train["benign"], train["perturbed"]), validation_data)


fit_correction(rc_epochs).save(run_dir / "residual_correction", fitted_on, sae=loaded)

steering = SAEFeatureSteering.load(run_dir / "sae_feature_steering", loaded)
raw_steering = RawFeatureSteering.load(run_dir / "raw_feature_steering")
correction = ResidualCorrection.load(run_dir / "residual_correction", sae=loaded)
glue("steered_latents", len(latents), display=False)
print(f"{len(latents)} latents selected (of {loaded.d_sae}); steering direction norm {float(raw_steering.direction.norm()):.3f}; "
      f"Residual Correction kept epoch {correction.best_epoch_} of {rc_epochs}.")

# %% [markdown]
# ## Before and after, on the test cases
#
# Pair accuracy on benign and perturbed pairs before and after each method, with bootstrap 95%
# intervals; pairs repaired (wrong before, right after) and newly flipped (right before, wrong
# after); the median diff-recovery rate of perturbed pairs, the gap after divided by the benign gap
# before (1 means the original preference is fully back). The median is shown because pairs with a
# tiny benign gap give extreme rates that dominate the mean. SAE FS steers {glue:text}`steered_latents`
# latents.

# %%
test, test_cases = features["test"], cases["test"]
kinds = np.array(test_cases.attack_types)


def gaps_after(benign_after, perturbed_after):
    return GapsBeforeAfter(kinds, test["benign"].gap, np.asarray(benign_after), test["perturbed"].gap, np.asarray(perturbed_after))


# Every steered scoring below edits block `layer` of the same test texts, so with `partial_forward`
# block `layer`'s per-token output is stored once and each scoring runs only the later blocks.
block_outputs = None
if partial_forward:
    block_outputs = capture_case_outputs(reward_model, test_cases, layer, batch_size=batch_size, max_bytes=int(partial_forward_max_gb * 2**30))
if block_outputs is not None:
    print(f"Steered scoring resumes after block {layer} from {block_outputs.nbytes / 2**20:.1f} MB of stored outputs.")


def steered(intervention):
    return gaps_after(*steered_gaps(reward_model, intervention, test_cases, batch_size=batch_size, block_outputs=block_outputs))


other_mode = "error_preserving" if steering_mode == "replace" else "replace"
outcomes = {
    "SAE FS, η = 1 (control)": steered(SAEFeatureSteering(loaded, steering.latents, 1.0, steering_mode, token_scope)),
    f"SAE FS, η = {eta:g}": steered(steering),
    f"SAE FS, η = {eta:g}, {other_mode}": steered(SAEFeatureSteering(loaded, steering.latents, eta, other_mode, token_scope)),
    "SAE RC": gaps_after(correction.corrected_gap(test["benign"]), correction.corrected_gap(test["perturbed"])),
    f"Raw FS, β = {beta:g}": steered(raw_steering),
}
evaluations = {method: evaluate_gaps(gaps, n_resamples=bootstrap_samples, seed=seed) for method, gaps in outcomes.items()}
summary = pd.DataFrame([{"method": method, **{k: v for k, v in result["overall"].items() if not isinstance(v, dict)}}
                        for method, result in evaluations.items()])
table(summary, ["method", "cases", "benign_accuracy_before", "benign_accuracy_after", "benign_accuracy_after_low",
                "benign_accuracy_after_high", "benign_introduced", "perturbed_accuracy_before", "perturbed_accuracy_after",
                "perturbed_accuracy_after_low", "perturbed_accuracy_after_high", "perturbed_repaired", "perturbed_recovery_median"])

# %% [markdown]
# The same per perturbation type:

# %%
per_type = pd.DataFrame([
    {"method": method, "attack_type": kind, **{k: v for k, v in values.items() if not isinstance(v, dict)}}
    for method, result in evaluations.items() for kind, values in result["per_type"].items()
])
table(per_type, ["method", "attack_type", "cases", "benign_accuracy_after", "perturbed_accuracy_before", "perturbed_accuracy_after",
                 "perturbed_repaired", "benign_introduced"])

# %% [markdown]
# ## Reward gaps, pair by pair
#
# Each point is a test pair: its reward gap before the method against after it. Perturbed pairs
# (red) start left of the vertical axis; a method repairs those it lifts above the horizontal axis,
# and breaks benign pairs (blue) it pushes below it.

# %%
gap_rows = pd.concat([
    pd.DataFrame({"method": method, "variant": variant, "before": getattr(gaps, f"{variant}_before"), "after": getattr(gaps, f"{variant}_after")})
    for method, gaps in outcomes.items() for variant in ("benign", "perturbed")
], ignore_index=True)
show("mitigation_gaps", mitigation_gaps(gap_rows))

# %% [markdown]
# ## Diff recovery
#
# Where each perturbed pair's gap lands after the method, relative to the benign pair's gap before
# it. The buckets do not overlap, so each bar sums to one.

# %%
buckets = pd.DataFrame([{"method": method, "bucket": bucket, "share": share}
                        for method, result in evaluations.items()
                        for bucket, share in result["overall"]["perturbed_recovery_buckets"].items()])
show("mitigation_recovery", recovery_bucket_bars(buckets))

# %% [markdown]
# ## Ablations
#
# Each method's main setting swept, the others at their defaults: η and the number of steered
# latents K for SAE FS (in `steering_mode`), the training epochs of SAE RC, and β for Raw FS.

# %%
ablation_rows = []


def record_ablation(parameter, value, gaps):
    for variant in ("benign", "perturbed"):
        ablation_rows.append({"parameter": parameter, "value": value, "variant": variant,
                              "accuracy": float((getattr(gaps, f"{variant}_after") > 0).mean())})


for value in eta_sweep:
    record_ablation("eta", value, outcomes[f"SAE FS, η = {eta:g}"] if value == eta else
                    steered(SAEFeatureSteering(loaded, steering.latents, value, steering_mode, token_scope)))
for value in top_k_sweep:
    if value > loaded.d_sae:
        print(f"K = {value} is skipped: the SAE has {loaded.d_sae} latents.")
        continue
    chosen = select_latents(latent_scores, value, positive_only=positive_only)
    record_ablation("top_k", value, outcomes[f"SAE FS, η = {eta:g}"] if value == top_k else
                    steered(SAEFeatureSteering(loaded, chosen, eta, steering_mode, token_scope)))
for value in rc_epochs_sweep:
    swept = fit_correction(value)
    record_ablation("rc_epochs", value, gaps_after(swept.corrected_gap(test["benign"]), swept.corrected_gap(test["perturbed"])))
for value in beta_sweep:
    record_ablation("beta", value, outcomes[f"Raw FS, β = {beta:g}"] if value == beta else
                    steered(RawFeatureSteering(raw_steering.direction, layer, value, token_scope)))
ablations = pd.DataFrame(ablation_rows)
show("mitigation_ablations", ablation_curves(ablations))

# %%
results_file = save_results(results_path, {
    "cases": {side: len(c) for side, c in cases.items()},
    "steered_latents": len(latents),
    "rc_best_epoch": correction.best_epoch_,
    "methods": {method: {"overall": {k: v for k, v in result["overall"].items()},
                         "per_type": result["per_type"]} for method, result in evaluations.items()},
    "ablations": ablation_rows,
})
