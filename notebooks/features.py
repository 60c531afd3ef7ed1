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
# What separates perturbed from benign texts inside the SAE at this layer. For every latent: how
# often it fires (its mean-pooled code is above `activation_threshold`) on benign and on perturbed
# texts, separately for chosen and rejected responses. Then the latents that SAE Feature Steering
# ranked highest on the training cases, with their statistics. Last, the texts and tokens on which
# each of the first few reaches its largest activation show what an "unstable feature" responds to.

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
activation_threshold = 0.0
top_latents = 15
inspected_latents = 5
examples_per_latent = 4
results_path = "features.json"

# %%
from rmsae.experiments import LAYER_PARAMETERS, RUN_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), {
    **RUN_PARAMETERS,
    **LAYER_PARAMETERS,
    "records_dir": ("path", {"optional": True}),
    "reward_threshold": ("float", {"minimum": 0.0}),
    "activation_threshold": ("float", {"minimum": 0.0}),
    "top_latents": ("int", {"minimum": 1}),
    "inspected_latents": ("int", {"minimum": 1}),
    "examples_per_latent": ("int", {"minimum": 1}),
}))
# The per-layer run folder sits inside the model's folder, where the perturbations stage wrote its records.
records_dir = records_dir or results_path.parent.parent
run_dir = results_path.parent

# %%
import numpy as np
import pandas as pd
from IPython.display import display

from rmsae.cache import ActivationCache
from rmsae.detection import SplitManifest
from rmsae.experiments import load_run_records, load_run_sae, save_results, show, table
from rmsae.features import latent_statistics, top_activations
from rmsae.mitigation import MitigationError, load_fitted, pair_features, split_cases
from rmsae.plots import activation_rate_panels
from rmsae.reward_model import load_reward_model
from rmsae.storage import atomic_write_bytes

reward_model = load_reward_model(model_tag, device=device, device_map=device_map)
loaded = load_run_sae(sae, model_name, layer, reward_model.hidden_size, device=reward_model.block_device(layer))
manifest = SplitManifest.load(run_dir / "detection_split.json")
cases = split_cases(load_run_records(records_dir), manifest, model=reward_model.spec.tag, reward_threshold=reward_threshold)
steering_file = run_dir / "sae_feature_steering.safetensors"
if not steering_file.is_file():
    raise MitigationError(f"{steering_file} not found; run the mitigation stage for {model_name} layer {layer} first.")
groups = {}
with ActivationCache(reward_model.cache_namespace()) as cache:
    for variant, attribute in (("benign", "originals"), ("perturbed", "perturbed")):
        pairs = [pair for side_cases in cases.values() for pair in getattr(side_cases, attribute)]
        features = pair_features(reward_model, pairs, layer=layer, sae=loaded, raw=False, cache=cache, batch_size=batch_size, progress=False)
        groups[f"{variant}_chosen"], groups[f"{variant}_rejected"] = features.sae_chosen, features.sae_rejected
statistics = latent_statistics(groups, activation_threshold)
atomic_write_bytes(run_dir / "feature_statistics.csv", statistics.to_csv(index=False).encode())
n_cases = sum(len(side_cases) for side_cases in cases.values())
print(f"{n_cases} successfully perturbed cases (all sides of the split), {loaded.d_sae} latents.")

# %% [markdown]
# ## Activation rates
#
# Each latent's share of texts on which it fires, sorted by its benign rate. Pink lines that rise
# where the blue benign curve has dropped to zero are latents that fire on perturbed texts and
# hardly ever on benign ones.

# %%
show("feature_activation_rates", activation_rate_panels(statistics))
rate_columns = [f"{group}_rate" for group in groups]
dead = int((statistics[rate_columns].max(axis=1) == 0).sum())
benign_rate = statistics[["benign_chosen_rate", "benign_rejected_rate"]].max(axis=1)
perturbed_rate = statistics[["perturbed_chosen_rate", "perturbed_rejected_rate"]].max(axis=1)
perturbed_only = int(((perturbed_rate >= 0.05) & (benign_rate == 0)).sum())
print(f"{dead} latents never fire on these texts; {perturbed_only} fire on at least 5% of perturbed texts of one side "
      "and on no benign text.")

# %% [markdown]
# ## The latents SAE Feature Steering ranks highest
#
# Their ranking score from the training cases (as the mitigation stage saved it), with mean pooled
# code and activation rate on benign and perturbed texts of all cases.

# %%
weights, steering_settings = load_fitted(run_dir / "sae_feature_steering")
if "scores" not in weights:
    raise MitigationError(f"{steering_file} has no latent scores; rerun the mitigation stage with `--force` to save them.")
latent_scores = weights["scores"].numpy()
ranked = np.argsort(-latent_scores, kind="stable")[:top_latents]
top = statistics.iloc[ranked].assign(score=latent_scores[ranked], rank=np.arange(1, len(ranked) + 1))
top = top.assign(benign_mean=(top["benign_chosen_mean"] + top["benign_rejected_mean"]) / 2,
                 perturbed_mean=(top["perturbed_chosen_mean"] + top["perturbed_rejected_mean"]) / 2)
print(f"Ranking: {steering_settings['fitted_on'].get('ranking', 'mean_diff')}.")
table(top, ["rank", "latent", "score", "benign_mean", "perturbed_mean", "benign_chosen_rate", "perturbed_chosen_rate",
            "benign_rejected_rate", "perturbed_rejected_rate"])

# %% [markdown]
# ## What the top latents respond to
#
# For each of the first latents above, the texts of the test cases (benign and perturbed, chosen and
# rejected) on which it reaches its largest per-token activation. The token is marked `[[ ]]` in a
# window of its neighbours.

# %%
test_cases = cases["test"]
texts, labels = [], []
for variant, pairs in (("benign", test_cases.originals), ("perturbed", test_cases.perturbed)):
    for side in ("chosen", "rejected"):
        for pair, kind in zip(pairs, test_cases.attack_types):
            texts.append(pair.conversation(side))
            labels.append({"variant": variant, "side": side, "attack_type": kind})
inspected = [int(latent) for latent in ranked[:inspected_latents]]
examples = top_activations(reward_model, loaded, texts, inspected, top_n=examples_per_latent, batch_size=batch_size, progress=False)
examples = pd.concat([examples, pd.DataFrame([labels[index] for index in examples["text"]])], axis=1)
display(table(examples, ["latent", "rank", "variant", "side", "attack_type", "activation", "context"]))
perturbed_share = float((examples["variant"] == "perturbed").mean())
print(f"{perturbed_share:.0%} of these top activations are on perturbed texts (the test texts are half perturbed).")

# %%
results_file = save_results(results_path, {
    "cases": n_cases,
    "latents": loaded.d_sae,
    "dead_latents": dead,
    "perturbed_only_latents": perturbed_only,
    "top_latents": top[["rank", "latent", "score", "benign_mean", "perturbed_mean"]].to_dict(orient="records"),
    "top_activations_perturbed_share": perturbed_share,
    "examples": examples[["latent", "rank", "variant", "side", "attack_type", "activation", "token", "context"]].to_dict(orient="records"),
})
