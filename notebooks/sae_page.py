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
# # Sparse autoencoders
#
# One SAE per reward model and layer. Explained variance and L0 measure how faithful and how sparse the
# reconstruction is; the spliced accuracy shows whether the reward model still works when it reads
# the reconstruction instead of its own residual stream. The sections after this page are the
# executed notebooks, one per model and layer, with the latent-density histograms.

# %% tags=["parameters", "remove-cell"]
profile = "demo"
stage = "sae"
runs_dir = "runs/demo"
expected_runs = []
results_path = "sae.json"

# %%
from rmsae.experiments import PAGE_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), PAGE_PARAMETERS))

# %%
from rmsae.experiments import finished_runs, save_results, show, table
from rmsae.plots import metrics_by_layer

runs, finished = finished_runs(runs_dir, stage, expected_runs)
finished = finished.sort_values(["model", "layer"])
table(finished, ["model", "layer", "d_sae", "explained_variance", "l0", "dead_fraction", "accuracy", "spliced_accuracy", "spliced_accuracy_drop"])

# %% [markdown]
# The same numbers against depth.

# %%
if len(finished):
    show("sae_metrics_by_layer", metrics_by_layer(finished, {
        "explained_variance": "explained variance",
        "l0": "L0 (latents per token)",
        "spliced_accuracy_drop": "accuracy drop when spliced",
    }))
results_file = save_results(results_path, {"runs": len(runs), "finished": len(finished)})
