"""Bradley-Terry fine-tuning: the batch order and a rule a tiny reward model must learn."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from rmsae.data import PreferencePair, Turn
from rmsae.reward_model import load_reward_model
from rmsae.rm_training import RMTrainingConfig, epoch_order, head_parameter_names, lr_factor, train_bradley_terry


def padded_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    """Tokens a run over ``order`` pads to: each batch costs its longest pair times its size."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)


def test_length_grouped_order_saves_padding():
    lengths = [int(x) for x in np.random.default_rng(0).integers(10, 257, size=400)]
    config = RMTrainingConfig(batch_size=16)
    first = epoch_order(lengths, config, 0, random.Random(0))
    assert sorted(first) == list(range(400))
    assert epoch_order(lengths, config, 0, random.Random(99)) == first  # seeded by config.seed + epoch
    assert epoch_order(lengths, config, 1, random.Random(0)) != first
    assert epoch_order(lengths, replace(config, seed=1), 0, random.Random(0)) != first

    shuffled = epoch_order(lengths, replace(config, group_by_length=False), 0, random.Random(0))
    assert sorted(shuffled) == list(range(400))
    # Uniform lengths in 10..256: a random batch of 16 pads to about 242 tokens, a grouped one to
    # about its own mean (133), so grouping must save at least a third of the padded tokens.
    assert padded_tokens(first, lengths, 16) < 0.67 * padded_tokens(shuffled, lengths, 16)


def rule_pairs(n: int) -> list[PreferencePair]:
    """Pairs whose chosen response is "yes" and rejected one "no", after prompts of varied length."""
    rng = random.Random(0)
    words = ["tell", "me", "about", "the", "weather", "today", "please", "now"]
    pairs = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
        pairs.append(PreferencePair((Turn("user", f"{prompt} {i}"),), "yes yes yes", "no no no", "rule"))
    return pairs


@pytest.mark.parametrize("group_by_length", [True, False])
def test_training_learns_a_preference_rule(tiny_models, group_by_length):
    pairs = rule_pairs(48)
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template", max_length=128)
    config = RMTrainingConfig(epochs=3, batch_size=8, lr=3e-3, bf16_autocast=False, group_by_length=group_by_length)
    losses = train_bradley_terry(reward_model, pairs, config, progress=False)
    after = reward_model.score_pairs(pairs, progress=False)
    assert losses[-1] < 0.5 * losses[0]
    assert after.accuracy == 1.0
    assert not reward_model.model.training


def test_training_rejects_bad_settings(tiny_models):
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    with pytest.raises(ValueError, match="at least one training pair"):
        train_bradley_terry(reward_model, [], RMTrainingConfig())
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        RMTrainingConfig(epochs=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got True"):
        RMTrainingConfig(batch_size=True)
    with pytest.raises(ValueError, match="lr must be a positive finite number, got 0"):
        RMTrainingConfig(lr=0)
    with pytest.raises(ValueError, match="lr must be a positive finite number, got inf"):
        RMTrainingConfig(lr=float("inf"))
    assert RMTrainingConfig(lr=np.float32(1e-4), lr_end_ratio=np.float64(0.5)).lr == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="lr_end_ratio must be a number in \\[0, 1\\], got 1.5"):
        RMTrainingConfig(lr_end_ratio=1.5)
    with pytest.raises(ValueError, match="head_lr must be a positive finite number or None, got -0.001"):
        RMTrainingConfig(head_lr=-1e-3)
    with pytest.raises(ValueError, match="head_lr must be a positive finite number or None, got '1e-3'"):
        RMTrainingConfig(head_lr="1e-3")


def test_head_parameters_of_each_architecture(tiny_models):
    llama = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    assert head_parameter_names(llama.model) == ["score.weight"]
    minilm = load_reward_model("all-minilm-l6-v2", allow_fresh_head=True)
    assert head_parameter_names(minilm.model) == [
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"
    ]


def test_head_lr_reaches_head_only(tiny_models):
    # With the trunk's lr at 1e-12, only the head can move: head_lr must reach the head alone.
    pairs = rule_pairs(32)
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template", max_length=128)
    before = {name: p.detach().clone() for name, p in reward_model.model.named_parameters()}
    config = RMTrainingConfig(epochs=2, batch_size=8, lr=1e-12, head_lr=3e-3, weight_decay=0.0, bf16_autocast=False)
    losses = train_bradley_terry(reward_model, pairs, config, progress=False)
    moved = {
        name for name, p in reward_model.model.named_parameters() if (p.detach() - before[name]).abs().max() > 1e-6
    }
    assert moved == {"score.weight"}
    assert losses[-1] < losses[0]

    # Without head_lr the head trains at lr, here too small to move anything.
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template", max_length=128)
    train_bradley_terry(reward_model, pairs, replace(config, head_lr=None), progress=False)
    assert all((p.detach() - before[name]).abs().max() <= 1e-6 for name, p in reward_model.model.named_parameters())


def test_lr_schedule():
    # 10 steps, 2 of warm-up: 0.5, 1, then a straight line from 1 down to the end ratio after the last step.
    assert [lr_factor(step, 2, 10) for step in range(11)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    )
    assert [lr_factor(step, 2, 10, 0.5) for step in (1, 2, 6, 10)] == pytest.approx([1.0, 1.0, 0.75, 0.5])
    assert lr_factor(0, 0, 4) == 1.0


def test_lr_end_ratio_reaches_training(tiny_models):
    # Two steps without warm-up: the second runs at half the peak rate with lr_end_ratio 0, at the
    # full rate with 1, so the trained heads must differ.
    pairs = rule_pairs(16)
    heads = []
    for end_ratio in (0.0, 1.0):
        reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template", max_length=128)
        config = RMTrainingConfig(epochs=1, batch_size=8, lr=1e-3, warmup_fraction=0.0, lr_end_ratio=end_ratio, bf16_autocast=False)
        train_bradley_terry(reward_model, pairs, config, progress=False)
        heads.append(reward_model.model.score.weight.detach().numpy().copy())
    assert not np.allclose(heads[0], heads[1])


def test_head_lr_without_head_rejected(tiny_models, monkeypatch):
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template", max_length=128)
    # A model whose trunk prefix is unknown has no parameters that head_lr could name.
    monkeypatch.setattr(type(reward_model.model), "base_model_prefix", "")
    config = RMTrainingConfig(epochs=1, batch_size=8, head_lr=1e-3, freeze_embeddings=True, bf16_autocast=False)
    with pytest.raises(ValueError, match="head_lr=0.001 was given, but .* has no parameters outside its trunk"):
        train_bradley_terry(reward_model, rule_pairs(8), config, progress=False)
    assert reward_model.model.get_input_embeddings().weight.requires_grad
