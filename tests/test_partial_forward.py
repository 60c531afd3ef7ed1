"""Partial forwards: rewards resumed from a stored block output equal full forwards, steered or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rmsae.hooks import block_output_container, replay_block_output
from rmsae.mitigation import MitigationCases, MitigationError, RawFeatureSteering, SAEFeatureSteering, capture_case_outputs, steer, steered_gaps
from rmsae.partial_forward import PartialForwardError, _verify_replay, capture_block_outputs, rewards_from_block_outputs
from rmsae.perturb import with_trigger
from rmsae.reward_model import load_reward_model
from rmsae.sae import load_sae

from test_mitigation import PAIRS
from test_sae import HIDDEN, save_gated_sae


def conversations(pairs=PAIRS):
    return [pair.conversation("chosen") for pair in pairs] + [pair.conversation("rejected") for pair in pairs]


@pytest.fixture(scope="module", params=["llama", "qwen3", "score_model", "minilm"])
def any_rm(request, tiny_models, minilm_path):
    if request.param == "minilm":
        return load_reward_model("all-minilm-l6-v2", allow_fresh_head=True, fresh_head_seed=3, max_length=64)
    return load_reward_model(str(tiny_models[request.param]), input_format="chat_template", max_length=64)


def full_rewards(reward_model, texts, batch_size=4):
    return reward_model.score_conversations(texts, batch_size=batch_size, progress=False).rewards


@pytest.mark.parametrize("layer", [0, 1])
def test_replay_equals_full_forward(any_rm, layer):
    texts = conversations()
    outputs = capture_block_outputs(any_rm, texts, layer, batch_size=4, progress=False)
    expected = full_rewards(any_rm, texts)
    np.testing.assert_allclose(outputs.rewards, expected, atol=1e-5)
    np.testing.assert_allclose(rewards_from_block_outputs(any_rm, outputs), expected, atol=1e-5)


def test_steered_replay_equals_steered_full_forward(any_rm):
    texts = conversations()
    direction = torch.randn(any_rm.hidden_size, generator=torch.Generator().manual_seed(0))
    raw = RawFeatureSteering(direction, layer=1, beta=3.0)
    outputs = capture_block_outputs(any_rm, texts, 1, batch_size=3, progress=False)
    with steer(any_rm, raw):
        full = full_rewards(any_rm, texts)
        resumed = rewards_from_block_outputs(any_rm, outputs)
    np.testing.assert_allclose(resumed, full, atol=1e-5)
    assert np.abs(full - outputs.rewards).max() > 1e-3


def test_sae_steering_resumed_in_any_batch_size(tiny_models, tmp_path):
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    sae = load_sae(save_gated_sae(tmp_path / "sae", metadata={"hook_name": "model.layers.1"}), layer=1, d_model=HIDDEN)
    texts = conversations()
    steering = SAEFeatureSteering(sae, torch.arange(0, 256, 5), eta=-0.5, mode="replace", token_scope="response")
    with steer(reward_model, steering):
        full = full_rewards(reward_model, texts, batch_size=8)
    for batch_size in (1, 8):
        outputs = capture_block_outputs(reward_model, texts, 1, batch_size=batch_size, progress=False)
        with steer(reward_model, steering):
            np.testing.assert_allclose(rewards_from_block_outputs(reward_model, outputs), full, atol=1e-5)


def test_repeated_texts_run_once(tiny_models):
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    texts = conversations(PAIRS[:3]) + conversations(PAIRS[:2])
    outputs = capture_block_outputs(reward_model, texts, 0, batch_size=2, progress=False)
    assert sum(len(batch.rows) for batch in outputs.batches) == 6
    assert len(outputs.rewards) == 10
    np.testing.assert_allclose(rewards_from_block_outputs(reward_model, outputs)[6:], outputs.rewards[[0, 1, 3, 4]], atol=1e-6)


def test_steered_gaps_resume_from_case_outputs(tiny_models):
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    cases = MitigationCases([p.case_id for p in PAIRS[:4]], ["backdoor"] * 4, PAIRS[:4], [with_trigger(p) for p in PAIRS[:4]])
    raw = RawFeatureSteering(torch.linspace(-1, 1, HIDDEN), layer=1, beta=2.0)
    outputs = capture_case_outputs(reward_model, cases, 1, batch_size=3)
    resumed = steered_gaps(reward_model, raw, cases, block_outputs=outputs)
    full = steered_gaps(reward_model, raw, cases, batch_size=3)
    np.testing.assert_allclose(resumed[0], full[0], atol=1e-5)
    np.testing.assert_allclose(resumed[1], full[1], atol=1e-5)

    with pytest.raises(MitigationError, match="layer 1, but"):
        steered_gaps(reward_model, RawFeatureSteering(raw.direction, layer=0), cases, block_outputs=outputs)
    other = MitigationCases(cases.case_ids[:3], cases.attack_types[:3], cases.originals[:3], cases.perturbed[:3])
    with pytest.raises(MitigationError, match="other texts than these"):
        steered_gaps(reward_model, raw, other, block_outputs=outputs)


def test_capture_rejects_edited_model_and_foreign_outputs(tiny_models):
    llama = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    qwen = load_reward_model(str(tiny_models["qwen3"]), input_format="chat_template")
    with steer(llama, RawFeatureSteering(torch.ones(HIDDEN), layer=1)):
        with pytest.raises(PartialForwardError, match="unedited model"):
            capture_block_outputs(llama, conversations(), 1, progress=False)
    outputs = capture_block_outputs(llama, conversations(), 1, progress=False)
    with pytest.raises(PartialForwardError, match="captured with the model"):
        rewards_from_block_outputs(qwen, outputs)
    with pytest.raises(ValueError, match="out of range"):
        capture_block_outputs(llama, conversations(), 9, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        capture_block_outputs(llama, conversations(), 1, batch_size=0, progress=False)


def test_replay_mismatch_is_detected(tiny_models):
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    outputs = capture_block_outputs(reward_model, conversations(), 1, progress=False, verify=False)
    outputs.batches[0].hidden = outputs.batches[0].hidden + 1.0
    with pytest.raises(PartialForwardError, match="does not resume"):
        _verify_replay(reward_model, outputs, outputs.rewards[outputs.batches[0].rows])


def test_replay_restores_block_forwards(tiny_models):
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    texts = conversations(PAIRS[:2])
    before = full_rewards(reward_model, texts)
    outputs = capture_block_outputs(reward_model, texts, 1, progress=False)
    rewards_from_block_outputs(reward_model, outputs)
    assert all("forward" not in block.__dict__ for block in reward_model.blocks)
    np.testing.assert_allclose(full_rewards(reward_model, texts), before, atol=1e-6)


def test_block_output_container():
    hidden = torch.zeros(1, 2, 3)
    assert block_output_container(hidden) == "tensor"
    assert block_output_container((hidden, None)) == "tuple"
    with pytest.raises(ValueError, match="more than a hidden state"):
        block_output_container((hidden, torch.ones(1)))
    with pytest.raises(ValueError, match="container must be"):
        with replay_block_output(torch.nn.Module(), 0, hidden, "list"):
            pass


class TupleBlock(torch.nn.Module):
    """A block that returns ``(hidden, None)``, as older transformers releases and BERT-like encoders did."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(seed))

    def forward(self, hidden, mask=None):
        return (hidden + torch.tanh(self.linear(hidden)), None)


class TupleModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(TupleBlock(seed) for seed in range(3))

    def forward(self, hidden):
        for block in self.layers:
            hidden = block(hidden, None)[0]
        return hidden


def test_replay_of_tuple_blocks():
    model = TupleModel()
    inputs = torch.randn(2, 5, 4)
    captured = {}
    handle = model.layers[1].register_forward_hook(lambda module, args, output: captured.setdefault("output", output))
    expected = model(inputs)
    handle.remove()
    assert block_output_container(captured["output"]) == "tuple"
    with replay_block_output(model, 1, captured["output"][0], "tuple"):
        resumed = model(torch.full_like(inputs, float("nan")))
    torch.testing.assert_close(resumed, expected)
    assert not torch.isnan(model(inputs)).any()


def test_capture_limit_falls_back(tiny_models, caplog):
    from rmsae.mitigation import try_capture_block_outputs

    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    with pytest.raises(PartialForwardError, match="above the limit"):
        capture_block_outputs(reward_model, conversations(), 1, max_bytes=1000, progress=False)
    assert try_capture_block_outputs(reward_model, conversations(), 1, max_bytes=1000) is None
    assert "full forwards" in caplog.text
    assert try_capture_block_outputs(reward_model, conversations(), 1, max_bytes=10**9) is not None
