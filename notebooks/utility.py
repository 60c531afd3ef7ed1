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
# A defence is only worth having if the reward model stays as good on everything else. This
# notebook reloads the three interventions that the mitigation stage fitted at this layer (nothing
# is trained again) and scores a benchmark with the plain reward model and with each of them.
#
# - `benchmark = "rewardbench2"`: RewardBench 2 (`allenai/reward-bench-2`, or a local copy in the
#   hub schema), with two scores side by side. The **official** score credits a prompt `1/k` when
#   its correct completion has the highest reward and `k` completions share it. The Ties subset has
#   its own composite rule, and the overall score is the mean of the subset scores. The **authors'
#   rule** counts a prompt as correct when every correct completion outscores every incorrect one,
#   micro-averaged over prompts. `rmsae.rewardbench` documents both, with the RewardBench code
#   version they follow.
# - `benchmark = "demo"`: RewardBench 2 needs the hub, so the demo profile measures the same on the
#   data it has, in the same layout. It uses held-out HH-RLHF harmless pairs that the perturbation
#   stage never used (one correct and one incorrect completion each) and TruthfulQA questions, a task the demo reward
#   models were not trained for (the best answer against three incorrect answers, the layout of
#   RewardBench 2's non-Ties subsets).

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
benchmark = "rewardbench2"
benchmark_path = None
hh_prompts = 200
truthfulqa_prompts = 150
partial_forward = True
partial_forward_max_gb = 8.0
seed = 0
results_path = "utility.json"

# %%
from rmsae.experiments import LAYER_PARAMETERS, RUN_PARAMETERS
from rmsae.params import check_all

globals().update(check_all(globals(), {
    **RUN_PARAMETERS,
    **LAYER_PARAMETERS,
    "benchmark": ("str", {"choices": ["rewardbench2", "demo"]}),
    "benchmark_path": ("path", {"optional": True}),
    "hh_prompts": ("int", {"minimum": 1}),
    "truthfulqa_prompts": ("int", {"minimum": 1}),
    "partial_forward": ("bool", {}),
    "partial_forward_max_gb": ("float", {"minimum": 0.0}),
    "seed": ("int", {"minimum": 0}),
}))
run_dir = results_path.parent

# %%
import pandas as pd

from rmsae.cache import ActivationCache
from rmsae.experiments import load_run_pairs, load_run_records, load_run_sae, save_results, show, table
from rmsae.mitigation import MitigationError, RawFeatureSteering, ResidualCorrection, SAEFeatureSteering, steered_rewards, try_capture_block_outputs
from rmsae.plots import utility_bars
from rmsae.reward_model import load_reward_model
from rmsae.rewardbench import (
    authors_scores, flatten_conversations, load_rewardbench2, official_scores, prompts_from_pairs, prompts_from_truthfulqa, score_table,
    split_scores,
)

reward_model = load_reward_model(model_tag, device=device, device_map=device_map)
loaded = load_run_sae(sae, model_name, layer, reward_model.hidden_size, device=reward_model.block_device(layer))
fitted = {name: run_dir / f"{name}.safetensors" for name in ("sae_feature_steering", "raw_feature_steering", "residual_correction")}
missing = [str(path) for path in fitted.values() if not path.is_file()]
if missing:
    raise MitigationError(f"Fitted interventions not found: {missing}. Run the mitigation stage for {model_name} layer {layer} first.")
steering = SAEFeatureSteering.load(run_dir / "sae_feature_steering", loaded)
raw_steering = RawFeatureSteering.load(run_dir / "raw_feature_steering")
correction = ResidualCorrection.load(run_dir / "residual_correction", sae=loaded)

if benchmark == "rewardbench2":
    prompts = load_rewardbench2(benchmark_path, limit=limit)
else:
    # Held-out HH pairs and TruthfulQA questions that the perturbation stage never touched, whichever
    # data this run's interventions were fitted on. Leaving out only the fitted cases would bias the
    # sample, because only pairs the model ranked correctly can be successfully perturbed.
    perturbed = [record.original for record in load_run_records(run_dir.parent)]
    perturbed_cases = {pair.case_id for pair in perturbed}
    perturbed_prompts = {pair.prompt for pair in perturbed}
    held_out = [pair for pair in load_run_pairs("hh-rlhf", "demo-eval") if pair.case_id not in perturbed_cases][:hh_prompts]
    questions = [prompt for prompt in prompts_from_truthfulqa(seed=seed) if prompt.prompt not in perturbed_prompts][:truthfulqa_prompts]
    prompts = prompts_from_pairs(held_out, "HH harmless (held out)") + questions
conversations = flatten_conversations(prompts)
counts = pd.Series([p.subset for p in prompts]).value_counts()
print(f"{len(prompts)} prompts, {len(conversations)} completions: " + ", ".join(f"{n} {subset}" for subset, n in counts.items()) + ".")

# %% [markdown]
# ## Scores
#
# Every completion is scored once by the plain model (its pooled SAE codes come from the same
# forward and give Residual Correction's corrections) and once under each steering intervention.
# SAE FS is shown beside its η = 1 control, which only splices the SAE in.

# %%
with ActivationCache(reward_model.cache_namespace()) as cache:
    base = reward_model.score_conversations(conversations, saes=[loaded], cache=cache, batch_size=batch_size, progress=False)
block_outputs = None
if partial_forward:
    # Steering resumes after block `layer` from stored outputs; past the memory limit it runs full forwards.
    block_outputs = try_capture_block_outputs(reward_model, conversations, layer, batch_size=batch_size,
                                              max_bytes=int(partial_forward_max_gb * 2**30))


def steered(intervention):
    return steered_rewards(reward_model, intervention, conversations, batch_size=batch_size, block_outputs=block_outputs)


flat_scores = {
    "base": base.rewards,
    "SAE FS, η = 1 (control)": steered(SAEFeatureSteering(loaded, steering.latents, 1.0, steering.mode, steering.token_scope)),
    f"SAE FS, η = {steering.eta:g}": steered(steering),
    "SAE RC": base.rewards + correction.corrections(base.codes(loaded)),
    f"Raw FS, β = {raw_steering.beta:g}": steered(raw_steering),
}
scores = {method: split_scores(prompts, values) for method, values in flat_scores.items()}
results = score_table(prompts, scores)
wide = results.pivot(index="subset", columns="method", values="official")[list(scores)]
print("Official score (rows: subsets, columns: methods):")
table(wide.reset_index())

# %% [markdown]
# The authors' all-pairs rule on the same scores:

# %%
table(results.pivot(index="subset", columns="method", values="authors_rule")[list(scores)].reset_index())

# %% [markdown]
# ## Change against the plain reward model
#
# Official score per subset, each method's bar next to the plain model's. A defence that keeps the
# reward model's utility leaves its bars level with `base`.

# %%
show("utility_scores", utility_bars(results))

# %%
results_file = save_results(results_path, {
    "benchmark": benchmark,
    "prompts": len(prompts),
    "completions": len(conversations),
    "subsets": counts.to_dict(),
    "partial_forward": block_outputs is not None,
    "methods": {method: {"official": official_scores(prompts, values), "authors": authors_scores(prompts, values)}
                for method, values in scores.items()},
})
