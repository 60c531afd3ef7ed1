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
# # The safe-rlhf prompt prefix
#
# The official input of the safe-rlhf reward models (Beaver and the poisoned SUDO model) starts
# with `BEGINNING OF CONVERSATION:`; the authors' scripts leave that prefix out. This notebook
# scores the same held-out pairs with the prefix (`safe_rlhf`), without it (`safe_rlhf_author`) and
# in the model's registered format, and reports how far accuracy and individual preferences move.
# For the safe-rlhf models this measures the authors' deviation itself. The demo reward models were
# trained on HH-RLHF text, so for them both safe-rlhf variants are foreign inputs and the comparison
# shows how sensitive a reward model is to a few tokens of prompt boilerplate.

# %% tags=["parameters", "remove-cell"]
profile = "demo"
model_name = "demo-minilm-hh"
model_tag = "demo-minilm-hh"
data = "hh-rlhf"
split = "demo-eval"
limit = None
batch_size = 32
device = "auto"
device_map = None
prefix_pairs = 300
bootstrap_samples = 1000
seed = 0
results_path = "deviations.json"

# %%
from rmsae.experiments import RUN_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), {
    **RUN_PARAMETERS,
    "prefix_pairs": ("int", {"minimum": 1}),
    "bootstrap_samples": ("int", {"minimum": 1}),
    "seed": ("int", {"minimum": 0}),
}))

# %%
import numpy as np
import pandas as pd

from rmsae.analysis import bootstrap_ci
from rmsae.cache import ActivationCache
from rmsae.experiments import load_run_pairs, save_results, table
from rmsae.reward_model import load_reward_model

pairs = load_run_pairs(data, split, limit or prefix_pairs)
registered = load_reward_model(model_tag, device=device, device_map=device_map)
formats = list(dict.fromkeys([registered.spec.input_format, "safe_rlhf", "safe_rlhf_author"]))
gaps = {}
for input_format in formats:
    reward_model = registered
    if input_format != registered.spec.input_format:
        reward_model = load_reward_model(model_tag, input_format=input_format, device=device, device_map=device_map)
    with ActivationCache(reward_model.cache_namespace()) as cache:
        gaps[input_format] = reward_model.score_pairs(pairs, batch_size=batch_size, cache=cache, progress=False).reward_gap
rows = []
for input_format, gap in gaps.items():
    accuracy, low, high = bootstrap_ci((gap > 0).astype(float), n_resamples=bootstrap_samples, seed=seed)
    rows.append({"input_format": input_format, "registered": input_format == registered.spec.input_format, "pairs": len(gap),
                 "accuracy": accuracy, "accuracy_low": low, "accuracy_high": high})
accuracy = pd.DataFrame(rows)
print(f"{model_name}: {len(pairs)} held-out pairs; registered format {registered.spec.input_format!r}.")
table(accuracy)

# %% [markdown]
# How many individual preferences the prefix reverses, and how closely the reward gaps agree:

# %%
with_prefix, without_prefix = gaps["safe_rlhf"], gaps["safe_rlhf_author"]
reversed_share = float(np.mean(np.sign(with_prefix) != np.sign(without_prefix)))
correlation = float(np.corrcoef(with_prefix, without_prefix)[0, 1])
print(f"Without the prefix, {reversed_share:.1%} of preferences reverse; the reward gaps correlate at r = {correlation:.3f}.")

# %%
results_file = save_results(results_path, {
    "pairs": len(pairs),
    "registered_format": registered.spec.input_format,
    "accuracy": accuracy.to_dict(orient="records"),
    "prefix_reversed_share": reversed_share,
    "prefix_gap_correlation": correlation,
    "prefix_accuracy_change": float(np.mean(without_prefix > 0) - np.mean(with_prefix > 0)),
})
