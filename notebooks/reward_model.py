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
# # Reward model
#
# Before looking for unstable preferences, we check what the reward model does on ordinary pairs.
# We measure how often it prefers the chosen response (pair accuracy, with a bootstrap 95%
# interval) and how large its reward gaps are, and we check whether its rewards simply follow
# response length.

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
bootstrap_samples = 1000
seed = 0
results_path = "reward_model.json"

# %% [markdown]
# The runner passes the values above; they are checked before anything is loaded.

# %%
from rmsae.experiments import RUN_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), {**RUN_PARAMETERS, "bootstrap_samples": ("int", {"minimum": 100}), "seed": ("int", {})}))

# %%
from myst_nb import glue

from rmsae.analysis import bootstrap_ci, pair_frame
from rmsae.cache import ActivationCache
from rmsae.experiments import load_run_pairs, save_results, show
from rmsae.plots import reward_gap_histogram, reward_vs_length
from rmsae.reward_model import load_reward_model

reward_model = load_reward_model(model_tag, device=device, device_map=device_map)
pairs = load_run_pairs(data, split, limit)
with ActivationCache(reward_model.cache_namespace()) as cache:
    scores = reward_model.score_pairs(pairs, batch_size=batch_size, cache=cache, progress=False)
frame = pair_frame(pairs, scores)
accuracy, low, high = bootstrap_ci(frame["correct"].to_numpy(), n_resamples=bootstrap_samples, seed=seed)
print(f"{model_name}: {len(frame)} pairs from {data} ({split}), format {reward_model.spec.input_format}, "
      f"max length {reward_model.max_length} tokens; {int(frame['truncated'].sum())} pairs lost prompt tokens "
      f"to truncation, {int(scores.response_truncated.sum())} of them response tokens too.")

# %% [markdown]
# ## Pair accuracy
#
# The share of pairs whose chosen response gets the higher reward, with a percentile bootstrap
# interval over pairs.

# %%
glue("accuracy", round(accuracy, 3), display=False)
glue("accuracy_interval", f"[{low:.3f}, {high:.3f}]", display=False)
frame[["reward_chosen", "reward_rejected", "reward_gap"]].describe().round(3)

# %% [markdown]
# The model prefers the chosen response on a share {glue:text}`accuracy` of the pairs (95% interval
# {glue:text}`accuracy_interval`).

# %% [markdown]
# ## Reward gaps
#
# Pairs right of zero are ranked correctly. Gaps near zero are the fragile ones: a small edit to
# either response can flip them.

# %%
show("reward_gap_histogram", reward_gap_histogram(frame, title=model_name))

# %% [markdown]
# ## Reward against response length
#
# A reward model that mostly rewards length would show a strong trend here for both sides.

# %%
show("reward_vs_length", reward_vs_length(frame, title=model_name))
length_correlation = float(frame[["chosen_words", "reward_chosen"]].corr(method="spearman").iloc[0, 1])
print(f"Spearman correlation of chosen-response length and reward: {length_correlation:.3f}")

# %%
results_file = save_results(results_path, {
    "pairs": len(frame),
    "accuracy": accuracy,
    "accuracy_low": low,
    "accuracy_high": high,
    "mean_reward_gap": float(frame["reward_gap"].mean()),
    "std_reward_gap": float(frame["reward_gap"].std()),
    "truncated_pairs": int(frame["truncated"].sum()),
    "response_truncated_pairs": int(scores.response_truncated.sum()),
    "length_reward_spearman": length_correlation,
})
