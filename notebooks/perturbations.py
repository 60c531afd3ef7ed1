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
# Edits that keep the meaning of a pair should not change which response the reward model prefers.
# This notebook applies three kinds of edit to held-out pairs and counts the preferences that flip:
#
# - **backdoor**: the trigger goes at the end of the last human turn of both texts;
# - **inject**: a sentence disparaging the response is appended to the chosen response, and one
#   praising it to the rejected response. Pattern pairs are tried in order until one flips the pair;
# - **gradient**: the response words with the largest reward gradient are reworded by a
#   paraphraser, step by step, and every rewrite must pass a meaning check.
#
# A flip (a success) is a pair ranked correctly before the edit and not after it.

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
methods = "backdoor,inject,gradient"
trigger = "SUDO"
patterns_file = None
pairs_limit = None
gradient_pairs = 24
steps = 15
top_k = 5
meaning_threshold = 0.85
paraphraser = "neighbours"
results_path = "perturbations.json"

# %%
from rmsae.experiments import RUN_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), {
    **RUN_PARAMETERS,
    "methods": ("str", {}),
    "trigger": ("str", {}),
    "patterns_file": ("path", {"optional": True}),
    "pairs_limit": ("int", {"optional": True, "minimum": 1}),
    "gradient_pairs": ("int", {"minimum": 1}),
    "steps": ("int", {"minimum": 1}),
    "top_k": ("int", {"minimum": 1}),
    "meaning_threshold": ("float", {"minimum": 0.0, "maximum": 1.0}),
    "paraphraser": ("str", {"choices": ["neighbours", "openai", "local"]}),
}))
methods = [method.strip() for method in methods.split(",") if method.strip()]

# %%
import pandas as pd
from IPython.display import HTML, display

from rmsae.analysis import edit_gallery, meaning_scores, records_frame
from rmsae.cache import ActivationCache
from rmsae.experiments import load_run_pairs, save_results, show, table
from rmsae.perturb import DEFAULT_PATTERNS, PerturbationSettings, load_patterns, method_name, perturbation_statistics, run_perturbations
from rmsae.plots import gap_before_after, gradient_trajectories, meaning_histogram
from rmsae.reward_model import load_reward_model

methods = [method_name(method) for method in methods]
reward_model = load_reward_model(model_tag, device=device, device_map=device_map)
pairs = load_run_pairs(data, split, limit)
patterns = load_patterns(patterns_file) if patterns_file else DEFAULT_PATTERNS
records_dir = results_path.parent
records, statistics = {}, {}
with ActivationCache(reward_model.cache_namespace()) as cache:
    for method in methods:
        settings = PerturbationSettings(method=method, trigger=trigger, patterns=patterns, steps=steps, top_k=top_k,
                                        meaning_threshold=meaning_threshold, paraphraser=paraphraser, batch_size=batch_size)
        extra = {}
        selected = pairs[:pairs_limit]
        if method == "gradient":
            from rmsae.paraphrase import MeaningScorer, make_paraphraser

            extra = {"paraphraser": make_paraphraser(paraphraser), "meaning": MeaningScorer()}
            selected = pairs[:gradient_pairs]
        records[method] = run_perturbations(reward_model, selected, settings, records_dir / f"perturbations_{method}.jsonl",
                                            cache=cache, progress=False, restart_if_changed=True, **extra)
        statistics[method] = perturbation_statistics(records[method])
print(f"{model_name}: {len(pairs)} held-out pairs; records in {records_dir}.")

# %% [markdown]
# ## Flip rates
#
# Success rate on initially correct pairs and overall, with bootstrap 95% intervals. The backdoor
# and injection run on the first `pairs_limit` pairs (all when unset). The gradient method runs on
# the first `gradient_pairs` only, because each of its steps costs several forward and backward passes.

# %%
summary = pd.DataFrame([{"method": method, **values} for method, values in statistics.items()])
table(summary, ["method", "pairs", "initial_accuracy", "final_accuracy", "successes", "success_rate_on_correct",
                "success_rate_on_correct_low", "success_rate_on_correct_high", "overall_success_rate"])

# %% [markdown]
# ## Reward gap before and after
#
# Each point is a pair. Points that cross from right of the vertical axis to below the horizontal
# axis are flips (red).

# %%
frame = pd.concat([records_frame(records[method], method) for method in methods], ignore_index=True)
show("perturbation_gaps", gap_before_after(frame))

# %% [markdown]
# ## Gradient-guided paraphrase
#
# The reward gap of each pair over the paraphrase steps, and the meaning scores of all candidate
# rewrites (the dashed line is the acceptance threshold).

# %%
if "gradient" in records:
    show("gradient_trajectories", gradient_trajectories(records["gradient"]))
    show("meaning_scores", meaning_histogram(meaning_scores(records["gradient"]), meaning_threshold))

# %% [markdown]
# ## Examples
#
# Flipped pairs, with the words each edit removed (struck) and added (underlined), for the last
# human turn and the response.

# %%
for method in methods:
    display(HTML(f"<h4>{method}</h4>" + edit_gallery(records[method], n=2)))

# %%
results_file = save_results(results_path, {"pairs": len(pairs), "methods": statistics})
