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
# # Deviations from the authors' code
#
# The scripts released with Liu et al. (arXiv 2605.16339) contain defects that change the numbers
# they report. Where this companion corrects one, the corrected behaviour is the default and the
# authors' behaviour is one switch away, so the two can be compared. The table lists each such
# defect, our default and the switch that restores the authors' behaviour. The last column gives
# the effect measured on this profile's runs, with the stage that measured it, and is empty where no
# run measures the defect.
# The sections after the table show the measurements in detail; the per-model notebooks after
# this page measure the safe-rlhf prompt prefix.

# %% tags=["parameters", "remove-cell"]
profile = "demo"
stage = "deviations"
runs_dir = "runs/demo"
expected_runs = []
results_path = "deviations.json"

# %%
from rmsae.experiments import PAGE_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), PAGE_PARAMETERS))

# %%
import numpy as np
import pandas as pd
from IPython.display import display

from rmsae.experiments import collect_results, finished_runs, save_results, table

runs, prefix_runs = finished_runs(runs_dir, stage, expected_runs)
detection = collect_results(runs_dir, "detection")
detection = detection[detection["status"] == "ok"]
mitigation = collect_results(runs_dir, "mitigation")
mitigation = mitigation[mitigation["status"] == "ok"]
utility = collect_results(runs_dir, "utility")
utility = utility[utility["status"] == "ok"]


def mean_text(values, digits=3):
    values = [float(value) for value in values if value is not None and np.isfinite(value)]
    return f"{np.mean(values):.{digits}f}" if values else ""


split_leak = (f"SAE-feature detector ROC AUC, mean over {len(detection)} runs: {mean_text(detection['sae_roc_auc'])} grouped by case, "
              f"{mean_text(detection['sae_ungrouped_roc_auc'])} with the authors' sample split (detection)") if len(detection) else ""


def method_mean(frame, method, key):
    return mean_text([row[method]["overall"][key] for row in frame["methods"] if method in row])


if len(mitigation):
    methods = list(mitigation["methods"].iloc[0])
    control = next(m for m in methods if m.startswith("SAE FS, η = 1"))
    replace = next(m for m in methods if m.startswith("SAE FS, η =") and m != control and "error_preserving" not in m)
    preserving = next((m for m in methods if "error_preserving" in m), None)
    reconstruction = (f"perturbed / benign accuracy after, mean over {len(mitigation)} runs: replace "
                      f"{method_mean(mitigation, replace, 'perturbed_accuracy_after')} / {method_mean(mitigation, replace, 'benign_accuracy_after')}, "
                      f"η = 1 splice only {method_mean(mitigation, control, 'perturbed_accuracy_after')} / "
                      f"{method_mean(mitigation, control, 'benign_accuracy_after')}")
    if preserving:
        reconstruction += (f", error_preserving {method_mean(mitigation, preserving, 'perturbed_accuracy_after')} / "
                           f"{method_mean(mitigation, preserving, 'benign_accuracy_after')}")
    reconstruction += " (mitigation)"
else:
    reconstruction = ""

prefix = ""
if len(prefix_runs):
    prefix = (f"without the prefix, {mean_text(prefix_runs['prefix_reversed_share'] * 100, 1)}% of preferences reverse and accuracy "
              f"changes by {mean_text(prefix_runs['prefix_accuracy_change'], 3)}, mean over {len(prefix_runs)} models (deviations)")

rb2_rule = ""
if len(utility):
    official = [row["base"]["official"]["overall"] for row in utility["methods"]]
    authors = [row["base"]["authors"]["overall"]["accuracy"] for row in utility["methods"]]
    rb2_rule = (f"plain model's overall score, mean over {len(utility)} runs: official {mean_text(official)}, "
                f"authors' rule {mean_text(authors)} (utility; {utility['benchmark'].iloc[0]} benchmark)")

deviations = pd.DataFrame([
    {"defect": "Detector split by sample: a case's original and perturbed pair can sit on both sides",
     "our default": "split grouped by case id, stratified, seeded, with a validation side",
     "authors' behaviour": "detection notebook `compare_ungrouped`; `make_split(mode='ungrouped')`", "measured": split_leak},
    {"defect": "SAE Feature Steering replaces the block output by the SAE reconstruction, so the splice alone moves rewards",
     "our default": "`replace` (the paper's) always reported beside the η = 1 control, and `error_preserving` beside both",
     "authors' behaviour": "`SAEFeatureSteering(mode='replace')`", "measured": reconstruction},
    {"defect": "safe-rlhf reward models scored without the `BEGINNING OF CONVERSATION:` prefix",
     "our default": "the official safe-rlhf template", "authors' behaviour": "`input_format='safe_rlhf_author'`", "measured": prefix},
    {"defect": "RewardBench 2 scored with an all-pairs rule, micro-averaged, without the Ties rule",
     "our default": "official RewardBench 2 scores", "authors' behaviour": "`rmsae.rewardbench.authors_scores`, shown beside them",
     "measured": rb2_rule},
    {"defect": "Detector and Residual Correction keep a live reference to the 'best' weights, so the last epoch is used",
     "our default": "best validation epoch deep-copied and restored", "authors' behaviour": "`MLPDetector(monitor='training', restore_best=False)`",
     "measured": ""},
    {"defect": "Mitigation split as unshuffled head and tail of the concatenated record files",
     "our default": "the detection stage's grouped manifest, shared by every later stage", "authors' behaviour": "none: the cut depends on file order",
     "measured": ""},
    {"defect": "Residual Correction: a fixed margin of 1 whatever the reward scale, LayerNorm declared but unused",
     "our default": "as the authors (margin 1, no normalisation)", "authors' behaviour": "options `rc_margin_in_std`, `rc_standardize`",
     "measured": ""},
    {"defect": "Overlapping diff-recovery buckets", "our default": "buckets that do not overlap and sum to 1",
     "authors' behaviour": "none", "measured": ""},
    {"defect": "Random two-logit head when a safe-rlhf model is loaded without its score head",
     "our default": "loading stops with an error naming the missing head", "authors' behaviour": "none (it gives meaningless rewards)",
     "measured": ""},
    {"defect": "Chat inputs truncated on the right, cutting the response end where the reward is read",
     "our default": "the prompt is truncated from the left and truncations are counted", "authors' behaviour": "none", "measured": ""},
    {"defect": "RewardBench 2 evaluation retrains every defence at 4,096 tokens instead of reusing the fitted ones",
     "our default": "the utility stage reloads the mitigation stage's saved interventions", "authors' behaviour": "none", "measured": ""},
])
display(table(deviations))

# %% [markdown]
# ## Split leakage, per run
#
# Test ROC AUC of the detector on pooled SAE features, with the split grouped by case and with the
# authors' split by sample. In the authors' split the benign and perturbed pair of one case, whose
# features are close, can be on opposite sides with opposite labels.

# %%
if len(detection):
    display(table(detection[["model", "layer", "sae_roc_auc", "sae_ungrouped_roc_auc", "raw_roc_auc", "raw_ungrouped_roc_auc"]]
                  .sort_values(["model", "layer"])))

# %% [markdown]
# ## The safe-rlhf prefix, per model

# %%
if len(prefix_runs):
    display(table(prefix_runs[["model", "registered_format", "pairs", "prefix_reversed_share", "prefix_accuracy_change",
                               "prefix_gap_correlation"]]))
results_file = save_results(results_path, {"runs": len(runs), "finished": len(prefix_runs),
                                           "deviations": deviations.to_dict(orient="records")})
