"""Loading with a device map: a tiny model split over the CPU and disk offload scores, hooks and steers as on one device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rmsae.mitigation import RawFeatureSteering, SAEFeatureSteering, steer
from rmsae.partial_forward import capture_block_outputs, rewards_from_block_outputs
from rmsae.reward_model import load_reward_model
from rmsae.sae import load_sae

from test_mitigation import PAIRS
from test_sae import HIDDEN, save_gated_sae

# Block 1 is offloaded to disk: accelerate keeps its weights on the meta device and loads them for
# each forward, which is what a block on another GPU looks like to the hooks.
SPLIT_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
             "model.norm": "cpu", "model.rotary_emb": "cpu", "score": "cpu"}


@pytest.fixture(scope="module")
def both_models(tiny_models, tmp_path_factory):
    path = str(tiny_models["llama"])
    single = load_reward_model(path, input_format="chat_template")
    split = load_reward_model(path, input_format="chat_template", device_map=SPLIT_MAP,
                              offload_folder=tmp_path_factory.mktemp("offload"))
    return single, split


def test_split_model_is_dispatched(both_models):
    _, split = both_models
    assert split.model.hf_device_map["model.layers.1"] == "disk"
    assert next(split.blocks[1].parameters()).device.type == "meta"
    assert split.block_device(1) == torch.device("cpu")
    assert split.device == torch.device("cpu")


def test_split_model_scores_and_pools_alike(both_models, tmp_path):
    single, split = both_models
    sae = load_sae(save_gated_sae(tmp_path / "sae", metadata={"hook_name": "model.layers.1"}), layer=1, d_model=HIDDEN)
    expected = single.score_pairs(PAIRS, layers=[0, 1, 2], saes=[sae], batch_size=3, progress=False)
    got = split.score_pairs(PAIRS, layers=[0, 1, 2], saes=[sae], batch_size=3, progress=False)
    np.testing.assert_allclose(got.reward_chosen, expected.reward_chosen, atol=1e-5)
    np.testing.assert_allclose(got.reward_rejected, expected.reward_rejected, atol=1e-5)
    for layer in (0, 1, 2):
        np.testing.assert_allclose(got.chosen.pooled[(layer, "mean")], expected.chosen.pooled[(layer, "mean")], atol=1e-5)
    np.testing.assert_allclose(got.chosen.codes(sae), expected.chosen.codes(sae), atol=1e-5)


def test_split_model_steers_and_resumes_alike(both_models, tmp_path):
    single, split = both_models
    sae = load_sae(save_gated_sae(tmp_path / "sae", metadata={"hook_name": "model.layers.1"}), layer=1, d_model=HIDDEN)
    texts = [pair.conversation("chosen") for pair in PAIRS]
    for intervention in (SAEFeatureSteering(sae, torch.arange(0, 256, 4), eta=-0.5), RawFeatureSteering(torch.linspace(-1, 1, HIDDEN), 1, 2.0)):
        with steer(single, intervention):
            expected = single.score_conversations(texts, progress=False).rewards
        with steer(split, intervention):
            got = split.score_conversations(texts, progress=False).rewards
        np.testing.assert_allclose(got, expected, atol=1e-5)
        outputs = capture_block_outputs(split, texts, 1, batch_size=4, progress=False)
        with steer(split, intervention):
            np.testing.assert_allclose(rewards_from_block_outputs(split, outputs), expected, atol=1e-5)


def test_device_map_rejects_bad_settings(tiny_models):
    path = str(tiny_models["llama"])
    assert load_reward_model(path, input_format="chat_template", device="auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="either device"):
        load_reward_model(path, input_format="chat_template", device="cuda:0", device_map="auto")
    with pytest.raises(TypeError, match="device_map must be a string or a dict"):
        load_reward_model(path, input_format="chat_template", device_map=["cpu"])
