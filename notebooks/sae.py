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
# # Sparse autoencoder
#
# The detection and mitigation stages read the reward model through a sparse autoencoder (SAE) on
# the residual stream after block `layer`. This notebook checks that the SAE is faithful there: how
# much of the activation variance it explains, how many latents fire per token (L0), how many never
# fire, and whether the reward model still ranks pairs as well with the SAE reconstruction spliced
# into the forward pass.

# %% tags=["parameters", "remove-cell"]
profile = "demo"
model_name = "demo-minilm-hh"
model_tag = "demo-minilm-hh"
layer = 2
sae = "released"
data = "hh-rlhf"
split = "demo-eval"
limit = None
activation_texts = 256
batch_size = 32
device = "auto"
device_map = None
results_path = "sae.json"

# %%
from rmsae.experiments import RUN_PARAMETERS, LAYER_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), {**RUN_PARAMETERS, **LAYER_PARAMETERS, "activation_texts": ("int", {"minimum": 2})}))

# %%
from myst_nb import glue

from rmsae.cache import ActivationCache
from rmsae.experiments import load_run_pairs, load_run_sae, save_results, show
from rmsae.plots import latent_density_histogram
from rmsae.reward_model import load_reward_model
from rmsae.sae import splice_sae
from rmsae.sae_training import sae_fidelity

reward_model = load_reward_model(model_tag, device=device, device_map=device_map)
loaded = load_run_sae(sae, model_name, layer, reward_model.hidden_size, device=reward_model.block_device(layer))
pairs = load_run_pairs(data, split, limit)
print(f"{loaded.info.architecture} SAE with {loaded.d_sae} latents on block {layer} of {model_name} "
      f"(hidden size {reward_model.hidden_size}); {len(pairs)} pairs.")

# %% [markdown]
# ## Reconstruction and sparsity
#
# Measured on every token of the first `activation_texts` texts (chosen and rejected responses
# with their prompts).

# %%
texts = [pair.conversation(side) for pair in pairs for side in ("chosen", "rejected")][:activation_texts]
activations = reward_model.token_activations(texts, [layer], batch_size=batch_size, progress=False)[layer]
fidelity, density = sae_fidelity(loaded, activations, return_density=True)
for key in ("explained_variance", "l0", "dead_fraction"):
    glue(key, round(fidelity[key], 3), display=False)
print(f"{fidelity['eval_tokens']} held-out tokens: explained variance {fidelity['explained_variance']:.3f}, "
      f"L0 {fidelity['l0']:.1f} of {loaded.d_sae}, dead fraction {fidelity['dead_fraction']:.3f}.")

# %% [markdown]
# The SAE explains {glue:text}`explained_variance` of the activation variance with an L0 of
# {glue:text}`l0` latents per token; a share of {glue:text}`dead_fraction` of its latents never fires on
# these tokens. The histogram shows how often each latent that does fire is active.

# %%
show("latent_density", latent_density_histogram(density, title=f"{model_name}, layer {layer}"))

# %% [markdown]
# ## Pair accuracy with the SAE spliced in
#
# Block `layer`'s output is replaced by its SAE reconstruction and the rest of the model runs as
# usual. Both scorings go through the activation cache, each under its own key.

# %%
with ActivationCache(reward_model.cache_namespace()) as cache:
    base = reward_model.score_pairs(pairs, batch_size=batch_size, cache=cache, progress=False)
with splice_sae(reward_model, loaded):
    with ActivationCache(reward_model.cache_namespace()) as cache:
        spliced = reward_model.score_pairs(pairs, batch_size=batch_size, cache=cache, progress=False)
agreement = float((base.correct == spliced.correct).mean())
glue("spliced_accuracy", round(spliced.accuracy, 3), display=False)
print(f"accuracy {base.accuracy:.3f} without the SAE, {spliced.accuracy:.3f} with it spliced in; "
      f"the two agree on {agreement:.1%} of pairs.")

# %% [markdown]
# With the SAE spliced in, the pair accuracy is {glue:text}`spliced_accuracy`.

# %%
results_file = save_results(results_path, {
    "d_sae": loaded.d_sae,
    "eval_tokens": fidelity["eval_tokens"],
    "explained_variance": fidelity["explained_variance"],
    "l0": fidelity["l0"],
    "dead_fraction": fidelity["dead_fraction"],
    "pairs": len(pairs),
    "accuracy": base.accuracy,
    "spliced_accuracy": spliced.accuracy,
    "spliced_accuracy_drop": base.accuracy - spliced.accuracy,
    "ranking_agreement": agreement,
})
