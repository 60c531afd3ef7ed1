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
# The second claim of Liu et al. (arXiv 2605.16339): with the reward model's weights untouched, SAE-based interventions
# restore correct preferences on perturbed pairs while benign pairs keep their ranking. Each row
# below is one method on the test cases of one reward model and layer. The sections after this page
# are the executed notebooks, with pair-by-pair gaps, diff recovery and the ablations of each run.

# %% tags=["parameters", "remove-cell"]
profile = "demo"
stage = "mitigation"
runs_dir = "runs/demo"
expected_runs = []
results_path = "mitigation.json"

# %%
from rmsae.experiments import PAGE_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), PAGE_PARAMETERS))

# %%
import pandas as pd

from rmsae.experiments import finished_runs, save_results, show, table
from rmsae.plots import ablation_curves, mitigation_by_layer

runs, finished = finished_runs(runs_dir, stage, expected_runs)
finished = finished.sort_values(["model", "layer"])
rows = pd.DataFrame([
    {"model": row["model"], "layer": row["layer"], "method": method, **{k: v for k, v in result["overall"].items() if not isinstance(v, dict)}}
    for _, row in finished.iterrows() for method, result in row["methods"].items()
])
table(rows, ["model", "layer", "method", "cases", "benign_accuracy_before", "benign_accuracy_after", "perturbed_accuracy_before",
             "perturbed_accuracy_after", "perturbed_repaired", "benign_introduced", "perturbed_recovery_median"])

# %% [markdown]
# ## Against depth
#
# Pair accuracy after each method at each layer: perturbed pairs (solid) should rise, benign pairs
# (dashed) should stay near their accuracy before, which is 1 by construction (the cases are
# perturbations of pairs the RM ranked correctly).

# %%
if len(rows):
    show("mitigation_by_layer", mitigation_by_layer(rows))

# %% [markdown]
# ## Ablations
#
# Each run's sweeps, one line style per model and layer.

# %%
ablations = pd.DataFrame([
    {**entry, "run": f"{row['model']} L{row['layer']}"} for _, row in finished.iterrows() for entry in row["ablations"]
])
if len(ablations):
    show("mitigation_ablations_all", ablation_curves(ablations))
results_file = save_results(results_path, {"runs": len(runs), "finished": len(finished)})
