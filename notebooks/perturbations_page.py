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
# # Perturbations
#
# How often each kind of meaning-preserving edit flips the preference of each reward model, on
# held-out pairs. The backdoor trigger should flip many preferences of the poisoned model and few of
# the clean one. The sections after this page are the executed notebooks, one per model, with the
# reward gaps, the paraphrase trajectories and examples.

# %% tags=["parameters", "remove-cell"]
profile = "demo"
stage = "perturbations"
runs_dir = "runs/demo"
expected_runs = []
results_path = "perturbations.json"

# %%
from rmsae.experiments import PAGE_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), PAGE_PARAMETERS))

# %%
import pandas as pd

from rmsae.experiments import finished_runs, save_results, show, table
from rmsae.plots import success_rates

runs, finished = finished_runs(runs_dir, stage, expected_runs)
rates = pd.DataFrame([
    {"model": row["model"], "method": method, **values}
    for _, row in finished.iterrows() for method, values in row["methods"].items()
])
table(rates, ["model", "method", "pairs", "initial_accuracy", "successes", "success_rate_on_correct",
              "success_rate_on_correct_low", "success_rate_on_correct_high", "overall_success_rate"])

# %%
if len(rates):
    show("perturbation_success_rates", success_rates(rates))
results_file = save_results(results_path, {"runs": len(runs), "finished": len(finished)})
