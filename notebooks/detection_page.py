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
# The first claim of Liu et al. (arXiv 2605.16339): pooled SAE features separate perturbed preference pairs from the benign
# originals, better than the raw hidden states they are computed from. Each row below is one reward
# model and layer; the detector and its inputs are described in the sections after this page, one
# per model and layer, with ROC curves, per-type results and the transfer between perturbation types.

# %% tags=["parameters", "remove-cell"]
profile = "demo"
stage = "detection"
runs_dir = "runs/demo"
expected_runs = []
results_path = "detection.json"

# %%
from rmsae.experiments import PAGE_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), PAGE_PARAMETERS))

# %%
import pandas as pd

from rmsae.experiments import finished_runs, save_results, show, table
from rmsae.plots import auc_by_layer

runs, finished = finished_runs(runs_dir, stage, expected_runs)
finished = finished.sort_values(["model", "layer"])
table(finished, ["model", "layer", "cases", "samples", "sae_roc_auc", "sae_roc_auc_low", "sae_roc_auc_high", "raw_roc_auc",
                 "raw_roc_auc_low", "raw_roc_auc_high", "sae_logistic_roc_auc", "raw_logistic_roc_auc"])

# %% [markdown]
# ## Against depth
#
# Test ROC AUC of the MLP detector at each layer, SAE against raw features, with bootstrap 95%
# intervals over test cases. The dashed line is chance.

# %%
if len(finished):
    show("detection_auc_by_layer", auc_by_layer(finished))

# %% [markdown]
# ## Per perturbation type
#
# ROC AUC of the same detectors on each type's test cases.

# %%
per_type = pd.DataFrame([
    {"model": row["model"], "layer": row["layer"], "features": name, "attack_type": kind, "test samples": values["n"],
     "roc_auc": values["roc_auc"], "roc_auc_low": values["roc_auc_low"], "roc_auc_high": values["roc_auc_high"]}
    for _, row in finished.iterrows() for name in ("sae", "raw") if isinstance(row.get(f"{name}_per_type"), dict)
    for kind, values in row[f"{name}_per_type"].items()
])
table(per_type)

# %% [markdown]
# ## Our split against the authors' split
#
# The same detector on the authors' split by sample, which lets a case's original and perturbed pairs
# sit on the two sides, against our split by case. Under the authors' split a test pair often has a
# near-duplicate with the opposite label in training, and a benign original attacked by two methods
# can sit on both sides with the same label, so its AUC is not an estimate of performance on unseen
# cases, in either direction.

# %%
if "sae_ungrouped_roc_auc" in finished:
    leakage = finished[["model", "layer", "sae_roc_auc", "sae_ungrouped_roc_auc", "raw_roc_auc", "raw_ungrouped_roc_auc"]]
    display_table = table(leakage)
else:
    display_table = "No run compared the two splits."
display_table

# %%
results_file = save_results(results_path, {"runs": len(runs), "finished": len(finished)})
