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
# # Feature analysis
#
# What the SAE latents that separate perturbed from benign texts are. Each run counts, per latent,
# how often it fires on benign and on perturbed texts of one reward model at one layer, lists the
# latents that SAE Feature Steering ranks highest, and shows the tokens on which those fire most.
# The sections after this page are the executed notebooks, with the activation-rate figures.

# %% tags=["parameters", "remove-cell"]
profile = "demo"
stage = "features"
runs_dir = "runs/demo"
expected_runs = []
results_path = "features.json"

# %%
from rmsae.experiments import PAGE_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), PAGE_PARAMETERS))

# %%
import pandas as pd
from IPython.display import display

from rmsae.experiments import finished_runs, save_results, table

runs, finished = finished_runs(runs_dir, stage, expected_runs)
finished = finished.sort_values(["model", "layer"])
summary = pd.DataFrame([
    {"model": row["model"], "layer": row["layer"], "cases": row["cases"], "latents": row["latents"], "dead_latents": row["dead_latents"],
     "perturbed_only_latents": row["perturbed_only_latents"], "top_activations_on_perturbed": row["top_activations_perturbed_share"]}
    for _, row in finished.iterrows()
])
table(summary)

# %% [markdown]
# `perturbed_only_latents` fire on at least 5% of the perturbed texts of one side (chosen or
# rejected) and on no benign text. `top_activations_on_perturbed` is the share of perturbed texts
# among the strongest activations of the top-ranked latents, where half the searched texts are
# perturbed.
#
# ## Strongest activations of the top latent, per run

# %%
examples = pd.DataFrame([
    {"model": row["model"], "layer": row["layer"], **example}
    for _, row in finished.iterrows() for example in row["examples"] if example["latent"] == row["top_latents"][0]["latent"]
])
if len(examples):
    display(table(examples, ["model", "layer", "latent", "rank", "variant", "side", "attack_type", "activation", "context"]))
results_file = save_results(results_path, {"runs": len(runs), "finished": len(finished)})
