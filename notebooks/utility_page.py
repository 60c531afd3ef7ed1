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
# # Utility outside the perturbed pairs
#
# Does a defence cost the reward model its quality elsewhere? Each run reloads the interventions
# that the mitigation stage fitted at one layer and scores a benchmark with the plain model and with
# each of them. The paper profile uses RewardBench 2. The demo profile uses held-out HH-RLHF harmless
# pairs and TruthfulQA questions laid out as RewardBench 2 prompts. Scores are the official
# RewardBench 2 rule and the authors' all-pairs rule (both in `rmsae.rewardbench`). The sections
# after this page are the executed notebooks of each run.

# %% tags=["parameters", "remove-cell"]
profile = "demo"
stage = "utility"
runs_dir = "runs/demo"
expected_runs = []
results_path = "utility.json"

# %%
from rmsae.experiments import PAGE_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), PAGE_PARAMETERS))

# %%
import pandas as pd
from IPython.display import display

from rmsae.experiments import finished_runs, save_results, show, table
from rmsae.plots import utility_change_by_layer

runs, finished = finished_runs(runs_dir, stage, expected_runs)
finished = finished.sort_values(["model", "layer"])
rows = []
for _, row in finished.iterrows():
    base = row["methods"]["base"]["official"]["overall"]
    for method, scores in row["methods"].items():
        rows.append({"model": row["model"], "layer": row["layer"], "method": method, "official": scores["official"]["overall"],
                     "authors_rule": scores["authors"]["overall"]["accuracy"], "change": scores["official"]["overall"] - base})
rows = pd.DataFrame(rows)
table(rows, ["model", "layer", "method", "official", "authors_rule", "change"])

# %% [markdown]
# ## Against depth
#
# Change of the overall official score against the plain model; 0 means the intervention left the
# reward model's utility where it was.

# %%
if len(rows):
    show("utility_change_by_layer", utility_change_by_layer(rows[rows["method"] != "base"]))

# %% [markdown]
# ## Per subset
#
# Official score of every subset, per run and method.

# %%
subsets = pd.DataFrame([
    {"model": row["model"], "layer": row["layer"], "method": method, "subset": subset, "score": entry["score"]}
    for _, row in finished.iterrows() for method, scores in row["methods"].items()
    for subset, entry in scores["official"]["subsets"].items()
])
if len(subsets):
    display(table(subsets.pivot_table(index=["model", "layer", "subset"], columns="method", values="score", sort=False).reset_index()))
results_file = save_results(results_path, {"runs": len(runs), "finished": len(finished)})
