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
# # Reward models
#
# Each reward model of the profile scored on the same held-out preference pairs. The sections after
# this page are the executed notebooks, one per model, with the reward-gap and length figures.

# %% tags=["parameters", "remove-cell"]
profile = "demo"
stage = "reward_model"
runs_dir = "runs/demo"
expected_runs = []
results_path = "reward_model.json"

# %%
from rmsae.experiments import PAGE_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), PAGE_PARAMETERS))

# %%
from rmsae.experiments import finished_runs, save_results, show, table
from rmsae.plots import accuracy_intervals

runs, finished = finished_runs(runs_dir, stage, expected_runs)
table(finished, ["model", "pairs", "accuracy", "accuracy_low", "accuracy_high", "mean_reward_gap", "std_reward_gap", "truncated_pairs",
                 "response_truncated_pairs"])

# %% [markdown]
# Pair accuracy per model; the dashed line is chance.

# %%
if len(finished):
    show("reward_model_accuracy", accuracy_intervals(finished))
results_file = save_results(results_path, {"runs": len(runs), "finished": len(finished), "models": finished["model"].tolist()})
