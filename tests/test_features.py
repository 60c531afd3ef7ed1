"""Feature analysis: activation rates, per-latent statistics and top activations against direct computation."""

from __future__ import annotations

import numpy as np
import pytest

from rmsae.features import activation_rates, latent_statistics, top_activations
from rmsae.reward_model import load_reward_model
from rmsae.sae import load_sae

from test_mitigation import PAIRS
from test_sae import HIDDEN, save_gated_sae


def test_activation_rates_by_hand():
    codes = np.array([[0.0, 0.2, 0.0], [0.1, 0.0, 0.0], [0.3, 0.5, 0.0], [0.0, 0.05, 0.0]])
    np.testing.assert_allclose(activation_rates(codes), [0.5, 0.75, 0.0])
    np.testing.assert_allclose(activation_rates(codes, threshold=0.1), [0.25, 0.5, 0.0])
    with pytest.raises(ValueError, match="non-empty"):
        activation_rates(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="non-empty"):
        activation_rates(np.zeros(3))


def test_latent_statistics_columns():
    benign = np.array([[0.0, 1.0], [0.0, 3.0]])
    perturbed = np.array([[2.0, 1.0], [0.0, 1.0], [4.0, 1.0]])
    statistics = latent_statistics({"benign": benign, "perturbed": perturbed})
    assert list(statistics["latent"]) == [0, 1]
    np.testing.assert_allclose(statistics["benign_rate"], [0.0, 1.0])
    np.testing.assert_allclose(statistics["perturbed_rate"], [2 / 3, 1.0])
    np.testing.assert_allclose(statistics["benign_mean"], [0.0, 2.0])
    np.testing.assert_allclose(statistics["perturbed_std"], [np.std([2.0, 0.0, 4.0]), 0.0])
    with pytest.raises(ValueError, match="same number of latents"):
        latent_statistics({"a": benign, "b": np.zeros((2, 3))})


def test_top_activations_match_token_codes(tiny_models, tmp_path):
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    sae = load_sae(save_gated_sae(tmp_path / "sae", metadata={"hook_name": "model.layers.1"}), layer=1, d_model=HIDDEN)
    texts = [pair.conversation("chosen") for pair in PAIRS]
    # Reference: encode every text alone and take the per-token maximum of each latent.
    per_text = []
    for turns in texts:
        hidden = reward_model.token_activations([turns], [1], progress=False)[1]
        per_text.append(sae.encode(hidden).numpy())
    latents = [int(np.argmax(np.concatenate(per_text).max(axis=0))), 3]
    found = top_activations(reward_model, sae, texts, latents, top_n=2, batch_size=3, progress=False)
    assert len(found) == 4
    for latent in latents:
        maxima = np.array([codes[:, latent].max() for codes in per_text])
        rows = found[found["latent"] == latent].sort_values("rank")
        assert list(rows["text"]) == list(np.argsort(-maxima, kind="stable")[:2])
        np.testing.assert_allclose(rows["activation"], np.sort(maxima)[::-1][:2], atol=1e-5)
        assert all("[[" in context for context in rows["context"])


def test_top_activations_rejects_bad_latents(tiny_models, tmp_path):
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    sae = load_sae(save_gated_sae(tmp_path / "sae", metadata={"hook_name": "model.layers.1"}), layer=1, d_model=HIDDEN)
    texts = [PAIRS[0].conversation("chosen")]
    with pytest.raises(ValueError, match="0..255"):
        top_activations(reward_model, sae, texts, [256], progress=False)
    with pytest.raises(ValueError, match="latents is empty"):
        top_activations(reward_model, sae, texts, [], progress=False)
    with pytest.raises(ValueError, match="conversations is empty"):
        top_activations(reward_model, sae, [], [1], progress=False)
