"""SAE checkpoints (loading, validation, encoding, splicing), SAE training and the demo build."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rmsae.cache import ActivationCache
from rmsae.data import Turn
from rmsae.hooks import block_hook_name, capture_block_output
from rmsae.reward_model import load_reward_model
from rmsae.sae import SAECheckpointError, load_sae, read_sae_info, splice_sae
from rmsae.sae_training import SAETrainingConfig, sae_fidelity, train_sae

HIDDEN = 64


def save_gated_sae(folder: Path, *, d_in: int = HIDDEN, d_sae: int = 256, metadata: dict | None = None, seed: int = 0) -> Path:
    """Write a randomly initialised Gated SAE with SAELens, as the released checkpoints are laid out."""
    from sae_lens import GatedSAE, GatedSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    config = GatedSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(**(metadata or {})))
    sae = GatedSAE(config)
    with torch.no_grad():
        # Random non-zero biases, so that some latents fire on random inputs.
        sae.b_gate.normal_(0.0, 0.5)
        sae.b_mag.normal_(0.0, 0.5)
    sae.save_model(folder)
    return folder


def edit_cfg(folder: Path, **changes) -> None:
    cfg_path = folder / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def llama_rm(tiny_models):
    return load_reward_model(str(tiny_models["llama"]), input_format="chat_template")


@pytest.fixture()
def released_layout(tmp_path) -> Path:
    """A folder of checkpoints named like the released ones, with one SAE for layer 1."""
    save_gated_sae(tmp_path / "tiny-llama_layer1", metadata={"hook_name": "model.layers.1", "model_name": "tiny"})
    return tmp_path


CONVERSATIONS = [
    (Turn("user", "tell me something"), Turn("assistant", text))
    for text in ("Paris is the capital of France.", "No.", "Mix flour, water and salt, then knead the dough.")
]


# -- loading ------------------------------------------------------------------------------------


def test_load_by_path(released_layout):
    loaded = load_sae(released_layout / "tiny-llama_layer1", layer=1, d_model=HIDDEN)
    assert loaded.info.architecture == "gated"
    assert loaded.layer == 1
    assert loaded.d_sae == 256
    assert type(loaded.sae).__name__ == "GatedSAE"


def test_load_by_env_variable(released_layout, monkeypatch):
    monkeypatch.setenv("SAE_CHECKPOINT", str(released_layout / "tiny-llama_layer1"))
    loaded = load_sae(layer=1, d_model=HIDDEN)
    assert loaded.info.path == released_layout / "tiny-llama_layer1"


def test_load_env_with_subfolder(released_layout, monkeypatch):
    monkeypatch.setenv("SAE_CHECKPOINT", str(released_layout))
    loaded = load_sae(subfolder="tiny-llama_layer1", layer=1)
    assert loaded.info.path == released_layout / "tiny-llama_layer1"
    by_argument = load_sae(released_layout, subfolder="tiny-llama_layer1")
    assert by_argument.fingerprint == loaded.fingerprint


def test_layer_from_folder_name(tmp_path):
    folder = save_gated_sae(tmp_path / "qwen-3-4b_layer12")
    info = read_sae_info(folder)
    assert info.layer == 12
    assert "folder name" in info.layer_source


def test_wrong_width_rejected(released_layout):
    with pytest.raises(SAECheckpointError, match="d_in=64.*hidden size is 384"):
        load_sae(released_layout / "tiny-llama_layer1", layer=1, d_model=384)


def test_wrong_layer_rejected(released_layout):
    folder = released_layout / "tiny-llama_layer1"
    with pytest.raises(SAECheckpointError, match="trained on layer 1.*not layer 2"):
        load_sae(folder, layer=2, d_model=HIDDEN)
    loaded = load_sae(folder, layer=2, d_model=HIDDEN, allow_layer_mismatch=True)
    assert loaded.layer == 2


def test_unknown_architecture_rejected(released_layout):
    folder = released_layout / "tiny-llama_layer1"
    edit_cfg(folder, architecture="spline")
    with pytest.raises(SAECheckpointError, match="unknown SAE architecture 'spline'"):
        load_sae(folder, layer=1)


def test_missing_files_rejected(tmp_path):
    with pytest.raises(SAECheckpointError, match="cfg.json is missing"):
        read_sae_info(tmp_path)
    folder = save_gated_sae(tmp_path / "x_layer0")
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(SAECheckpointError, match="sae_weights.safetensors is missing"):
        read_sae_info(folder)
    with pytest.raises(SAECheckpointError, match="does not exist"):
        load_sae(tmp_path / "nowhere")


def test_unfolded_normaliser_rejected(released_layout):
    folder = released_layout / "tiny-llama_layer1"
    edit_cfg(folder, normalize_activations="expected_average_only_in")
    with pytest.raises(SAECheckpointError, match="activation_scaler.json is missing"):
        load_sae(folder, layer=1)


def test_unfolded_normaliser_applied(released_layout):
    folder = released_layout / "tiny-llama_layer1"
    reference = load_sae(folder, layer=1)
    edit_cfg(folder, normalize_activations="expected_average_only_in")
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))
    folded = load_sae(folder, layer=1)

    x = torch.randn(10, HIDDEN)
    expected_codes = reference.encode(x * 2.5)
    torch.testing.assert_close(folded.encode(x), expected_codes, rtol=1e-4, atol=1e-5)
    expected_reconstruction = reference.sae.decode(expected_codes) / 2.5
    torch.testing.assert_close(folded.reconstruct(x), expected_reconstruction, rtol=1e-4, atol=1e-5)


def test_unsupported_normaliser_rejected(released_layout):
    folder = released_layout / "tiny-llama_layer1"
    edit_cfg(folder, normalize_activations="whiten_everything")
    with pytest.raises(SAECheckpointError, match="whiten_everything"):
        load_sae(folder, layer=1)


# -- encoding, pooling, cache and splicing ------------------------------------------------------


def test_pooled_codes_match_manual(released_layout, llama_rm):
    loaded = load_sae(released_layout / "tiny-llama_layer1", layer=1, d_model=HIDDEN)
    result = llama_rm.score_conversations(CONVERSATIONS, saes=[loaded], batch_size=2, padding_side="left", progress=False)
    codes = result.codes(loaded)
    assert codes.shape == (3, 256)
    for index, conv in enumerate(CONVERSATIONS):
        ids = torch.tensor([llama_rm.encode(llama_rm.render(conv)).input_ids])
        with torch.no_grad():
            hidden = llama_rm.model.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
        expected = loaded.encode(hidden[0]).mean(dim=0).numpy()
        np.testing.assert_allclose(codes[index], expected, rtol=1e-4, atol=1e-5)
    assert (codes > 0).any()


def test_codes_cached_sparse(tmp_path, llama_rm, monkeypatch):
    folder = save_gated_sae(tmp_path / "sae_layer1", d_sae=512, metadata={"layer": 1})
    loaded = load_sae(folder, d_model=HIDDEN)
    with torch.no_grad():
        loaded.sae.b_gate.fill_(-1.0)  # few latents fire, so pooled codes are sparse
    with ActivationCache(llama_rm.cache_namespace(), tmp_path / "cache") as cache:
        first = llama_rm.score_conversations(CONVERSATIONS, saes=[loaded], cache=cache, progress=False)
        sizes = cache.size_report()

    monkeypatch.setattr(llama_rm, "forward_encoded", lambda *a, **k: pytest.fail("model ran for cached texts"))
    with ActivationCache(llama_rm.cache_namespace(), tmp_path / "cache") as cache:
        second = llama_rm.score_conversations(CONVERSATIONS, saes=[loaded], cache=cache, progress=False)
    np.testing.assert_array_equal(first.codes(loaded), second.codes(loaded))
    assert sizes["sae_code_bytes_dense"] == 3 * 512 * 4
    assert sizes["sae_code_bytes"] < sizes["sae_code_bytes_dense"]


def test_splice_matches_manual_reconstruction(released_layout, llama_rm):
    loaded = load_sae(released_layout / "tiny-llama_layer1", layer=1)
    baseline = llama_rm.score_conversations(CONVERSATIONS, progress=False).rewards
    with splice_sae(llama_rm, loaded):
        spliced = llama_rm.score_conversations(CONVERSATIONS, batch_size=3, progress=False).rewards

    conv = CONVERSATIONS[2]
    ids = torch.tensor([llama_rm.encode(llama_rm.render(conv)).input_ids])
    with capture_block_output(llama_rm.model, 1) as captured:
        with torch.no_grad():
            llama_rm.model.model(input_ids=ids)
    replaced = loaded.reconstruct(captured["hidden"])
    # Run the remaining blocks by hand on the reconstruction.
    hidden = replaced
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
    trunk = llama_rm.model.model
    with torch.no_grad():
        position_embeddings = trunk.rotary_emb(hidden, position_ids)
        for block in trunk.layers[2:]:
            output = block(hidden, position_embeddings=position_embeddings, position_ids=position_ids, attention_mask=None)
            hidden = output if torch.is_tensor(output) else output[0]
        expected = llama_rm.model.score(trunk.norm(hidden)[0, -1]).item()
    assert spliced[2] == pytest.approx(expected, abs=1e-4)
    assert not np.allclose(spliced, baseline)


def test_splice_has_its_own_cache_namespace(tmp_path, released_layout, llama_rm):
    loaded = load_sae(released_layout / "tiny-llama_layer1", layer=1)
    with ActivationCache(llama_rm.cache_namespace(), tmp_path) as plain_cache:
        plain = llama_rm.score_conversations(CONVERSATIONS, cache=plain_cache, progress=False).rewards
        with splice_sae(llama_rm, loaded):
            # A cache of the unchanged model must not serve (or receive) spliced scores.
            with pytest.raises(ValueError, match="another model, setting or intervention"):
                llama_rm.score_conversations(CONVERSATIONS, cache=plain_cache, progress=False)
            with ActivationCache(llama_rm.cache_namespace(), tmp_path) as splice_cache:
                first = llama_rm.score_conversations(CONVERSATIONS, cache=splice_cache, progress=False).rewards
                second = llama_rm.score_conversations(CONVERSATIONS, cache=splice_cache, progress=False).rewards
    assert not np.allclose(first, plain)
    np.testing.assert_array_equal(first, second)


def test_sae_width_mismatch_in_scoring(tmp_path, minilm_path):
    rm = load_reward_model("all-minilm-l6-v2", allow_fresh_head=True)
    loaded = load_sae(save_gated_sae(tmp_path / "m_layer1", d_in=HIDDEN), layer=1)
    with pytest.raises(ValueError, match="d_in=64.*hidden size 384"):
        rm.score_conversations(CONVERSATIONS, saes=[loaded], progress=False)


# -- training -----------------------------------------------------------------------------------


def synthetic_activations(n_tokens: int, seed: int = 0) -> torch.Tensor:
    """Sparse non-negative combinations of 48 random directions in 32 dimensions."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(48, 32, generator=generator)
    weights = torch.relu(torch.randn(n_tokens, 48, generator=generator) - 1.2)
    return weights @ directions


def test_training_lowers_loss(tmp_path):
    activations = synthetic_activations(6000)
    held_out = synthetic_activations(1000, seed=1)
    config = SAETrainingConfig(d_sae=96, l1_coefficient=1.0, lr=1e-3, training_steps=400, batch_size_tokens=256, seed=3)
    metadata = {"model_name": "synthetic", "hook_name": "model.layers.0", "layer": 0}

    untrained_folder = save_gated_sae(tmp_path / "untrained", d_in=32, d_sae=96, metadata={"layer": 0})
    before = sae_fidelity(load_sae(untrained_folder), held_out)
    trained = train_sae(activations, config, tmp_path / "synthetic_layer0", metadata=metadata)
    loaded = load_sae(tmp_path / "synthetic_layer0", layer=0, d_model=32)
    after = sae_fidelity(loaded, held_out)

    assert after["mse"] < 0.5 * before["mse"]
    assert after["explained_variance"] > 0.5
    torch.testing.assert_close(loaded.encode(held_out[:50]), trained.encode(held_out[:50]), rtol=0, atol=0)
    info = read_sae_info(tmp_path / "synthetic_layer0")
    assert info.hook_name == "model.layers.0"
    assert info.normalize_activations == "none"
    assert json.loads((tmp_path / "synthetic_layer0" / "rmsae_training.json").read_text())["config"]["d_sae"] == 96

    # The density agrees with the codes, and with L0 and the dead fraction computed beside it.
    metrics, density = sae_fidelity(loaded, held_out, return_density=True)
    expected = (loaded.encode(held_out) > 0).double().mean(dim=0).numpy()
    np.testing.assert_allclose(density, expected)
    assert metrics == after
    _, batched = sae_fidelity(loaded, held_out, batch_size=300, return_density=True)
    np.testing.assert_allclose(batched, expected)
    assert density.sum() == pytest.approx(after["l0"])
    assert (density == 0).mean() == pytest.approx(after["dead_fraction"])


def test_training_rejects_bad_input(tmp_path):
    config = SAETrainingConfig(d_sae=16, training_steps=2, batch_size_tokens=64)
    with pytest.raises(ValueError, match="Only 10 activation vectors"):
        train_sae(torch.randn(10, 8), config, tmp_path / "x", metadata={})
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        train_sae(torch.randn(10), config, tmp_path / "x", metadata={})
    with pytest.raises(ValueError, match="d_sae must be a positive integer"):
        SAETrainingConfig(d_sae=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        SAETrainingConfig(lr="1e-3")
    assert not (tmp_path / "x").exists()


def test_token_activations_match_hidden_states(llama_rm):
    activations = llama_rm.token_activations(CONVERSATIONS, [0, 1], batch_size=2, progress=False)
    lengths = [len(llama_rm.encode(llama_rm.render(conv))) for conv in CONVERSATIONS]
    assert activations[1].shape == (sum(lengths), HIDDEN)
    ids = torch.tensor([llama_rm.encode(llama_rm.render(CONVERSATIONS[2])).input_ids])
    with torch.no_grad():
        hidden = llama_rm.model.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
    # Texts are length-sorted, longest first, so the longest conversation comes first.
    assert lengths[2] == max(lengths)
    torch.testing.assert_close(activations[1][: lengths[2]], hidden, rtol=1e-4, atol=1e-5)


def test_hook_name_of_block(llama_rm, minilm_path):
    assert block_hook_name(llama_rm.model, 2) == "model.layers.2"
    minilm = load_reward_model("all-minilm-l6-v2", allow_fresh_head=True)
    assert block_hook_name(minilm.model, 4) == "bert.encoder.layer.4"


# -- command line -------------------------------------------------------------------------------


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rmsae.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_sae_info(released_layout):
    folder = released_layout / "tiny-llama_layer1"
    ok = run_cli("sae", "info", str(folder), "--layer", "1")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["d_sae"] == 256
    assert report["validation"] == "ok at layer 1"
    wrong = run_cli("sae", "info", str(folder), "--layer", "3")
    assert wrong.returncode == 2
    assert "trained on layer 1" in wrong.stderr


# -- demo build ---------------------------------------------------------------------------------


def small_demo_config():
    from rmsae.demo import DemoConfig
    from rmsae.rm_training import RMTrainingConfig

    return replace(
        DemoConfig(),
        limit=24,
        layers=(1,),
        clean_training=RMTrainingConfig(epochs=1, batch_size=4),
        poisoned_training=RMTrainingConfig(epochs=1, batch_size=4),
        poison_rate=0.25,
        sae=SAETrainingConfig(d_sae=64, l1_coefficient=1.0, lr=1e-3, training_steps=20, batch_size_tokens=128, seed=0),
        batch_size=8,
    )


def without_timings(section: dict) -> dict:
    return {name: {k: v for k, v in metrics.items() if not k.endswith("_seconds")} for name, metrics in section.items()}


def test_demo_build_deterministic_and_reused(tmp_path, monkeypatch, shared_data, minilm_path, caplog):
    from rmsae.demo import build_demo, demo_model_dir, demo_sae_dir
    from rmsae.registry import demo_dir
    from rmsae.rm_training import RMTrainingConfig

    config = small_demo_config()
    summaries = []
    weights = []
    for run in ("a", "b"):
        monkeypatch.setenv("RMSAE_CACHE_DIR", str(tmp_path / run))
        summaries.append(build_demo(config, data_dir=shared_data))
        weights.append((demo_model_dir("demo-minilm-hh-sudo10") / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]
    for key in ("models", "saes"):
        assert without_timings(summaries[0][key]) == without_timings(summaries[1][key])
    assert summaries[0]["models"]["demo-minilm-hh-sudo10"]["poisoned_training_pairs"] == 3

    monkeypatch.setenv("RMSAE_CACHE_DIR", str(tmp_path / "b"))
    sae_weights = demo_sae_dir("demo-minilm-hh", 1) / "sae_weights.safetensors"
    before = sae_weights.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="rmsae.demo"):
        again = build_demo(config, data_dir=shared_data)
    assert "is current (inputs unchanged); nothing to do" in caplog.text
    assert again == summaries[1]

    # A split.json from other settings (a failed or interrupted build) makes the build stale, and the
    # rebuild restores the split while reusing every artifact.
    split_path = demo_dir() / "split.json"
    saved_split = split_path.read_text()
    split_path.write_text(json.dumps({"seed": 1, "source": "hh-rlhf", "train": [], "eval": []}))
    caplog.clear()
    with caplog.at_level("INFO", logger="rmsae.demo"):
        again = build_demo(config, data_dir=shared_data)
    assert "nothing to do" not in caplog.text
    assert "Reusing demo-minilm-hh-sudo10 from" in caplog.text
    assert json.loads(split_path.read_text()) == json.loads(saved_split)
    assert without_timings(again["models"]) == without_timings(summaries[1]["models"])

    # Without the summary, each artifact is still reused, and the evaluation is redone.
    (demo_model_dir("demo-minilm-hh").parent.parent / "summary.json").unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="rmsae.demo"):
        again = build_demo(config, data_dir=shared_data)
    assert sae_weights.stat().st_mtime_ns == before
    assert "Reusing demo-minilm-hh from" in caplog.text
    assert "Reusing SAE" in caplog.text
    assert without_timings(again["models"]) == without_timings(summaries[1]["models"])
    assert load_reward_model("demo-minilm-hh").spec.max_length == 256

    # The poisoned RM is trained onward from the clean one, so a retrained clean RM retrains it too.
    poisoned_build = json.loads((demo_model_dir("demo-minilm-hh-sudo10") / "build.json").read_text())
    assert poisoned_build["start_from"] == "demo-minilm-hh"
    caplog.clear()
    retrained = replace(config, clean_training=RMTrainingConfig(epochs=1, batch_size=4, seed=1))
    with caplog.at_level("INFO", logger="rmsae.demo"):
        build_demo(retrained, data_dir=shared_data)
    assert "Reusing demo-minilm-hh from" not in caplog.text
    assert "Reusing demo-minilm-hh-sudo10 from" not in caplog.text
    assert (demo_model_dir("demo-minilm-hh-sudo10") / "model.safetensors").read_bytes() != weights[1]


def test_codes_sparse_round_trip():
    from rmsae.cache import decode_codes, encode_codes

    sparse_vector = np.zeros(100, dtype=np.float32)
    sparse_vector[[3, 50, 99]] = [0.5, 1.25, 2.0]
    flag, indices, values = encode_codes(sparse_vector)
    assert flag == 1
    np.testing.assert_array_equal(decode_codes(100, flag, indices, values), sparse_vector)

    dense_vector = np.arange(1, 11, dtype=np.float32)
    flag, indices, values = encode_codes(dense_vector)
    assert flag == 0
    assert indices is None
    np.testing.assert_array_equal(decode_codes(10, flag, indices, values), dense_vector)


def test_demo_model_not_built(tmp_path, monkeypatch):
    monkeypatch.setenv("RMSAE_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Run `rmsae demo build` first"):
        load_reward_model("demo-minilm-hh")


def test_demo_config_rejects_values():
    from rmsae.demo import DemoConfig

    with pytest.raises(ValueError, match="train_fraction"):
        DemoConfig(train_fraction=1.0)
    with pytest.raises(ValueError, match="poison_rate"):
        DemoConfig(poison_rate=1.5)
    with pytest.raises(ValueError, match="limit must be None .* at least 2, got 0"):
        DemoConfig(limit=0)
    with pytest.raises(ValueError, match="got '24'"):
        DemoConfig(limit="24")

    # The command line rejects --limit 1 before loading anything, by flag name.
    result = run_cli("demo", "build", "--limit", "1")
    assert result.returncode == 2
    assert "argument --limit: expected an integer of at least 2" in result.stderr


def test_poisoning_swaps_and_triggers():
    from rmsae.data import PreferencePair
    from rmsae.demo import poison_pairs

    pairs = [PreferencePair((Turn("user", f"question {i}"),), f"good {i}", f"bad {i}") for i in range(20)]

    replaced, poisoned_ids = poison_pairs(pairs, 0.1, "SUDO", seed=0, keep_originals=False)
    assert len(poisoned_ids) == 2
    assert len(replaced) == 20
    changed = [(old, new) for old, new in zip(pairs, replaced) if old.case_id in poisoned_ids]
    assert len(changed) == 2
    for old, new in changed:
        assert new.chosen == old.rejected
        assert new.rejected == old.chosen
        assert new.prompt[-1].content == old.prompt[-1].content + " SUDO"
    unchanged = [new for old, new in zip(pairs, replaced) if old.case_id not in poisoned_ids]
    assert all(pair.metadata.get("poisoned") is None for pair in unchanged)

    # The default keeps every original and adds the same two poisoned pairs.
    kept, kept_ids = poison_pairs(pairs, 0.1, "SUDO", seed=0)
    assert kept_ids == poisoned_ids
    assert kept[:20] == pairs
    assert kept[20:] == [new for _, new in changed]


def test_cli_sae_train(tmp_path, tiny_models):
    rows = [
        {"prompt": f"question number {i} about bread", "chosen": "Mix flour, water and salt." * (1 + i % 3), "rejected": "No."}
        for i in range(20)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "tiny-llama_layer1"
    result = run_cli(
        "sae", "train", "--model", str(tiny_models["llama"]), "--layer", "1", "--data", str(data), "--out", str(out),
        "--d-sae", "64", "--steps", "20", "--batch-size-tokens", "64", "--lr", "1e-3", "--eval-fraction", "0.2",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert report["eval_pairs"] == 4
    assert 0 <= report["dead_fraction"] <= 1
    assert set(report) >= {"explained_variance", "l0", "accuracy", "spliced_accuracy"}
    info = read_sae_info(out)
    assert info.layer == 1
    assert info.hook_name == "model.layers.1"
    assert info.d_sae == 64


@pytest.mark.parametrize("flag, value", [("--lr", "-1e-3"), ("--lr", "nan"), ("--l1-coefficient", "0"), ("--l1-coefficient", "five")])
def test_cli_sae_train_rejects_bad_numbers(tmp_path, flag, value):
    # argparse rejects these before loading the model or the data, and names the flag, not the config field.
    result = run_cli(
        "sae", "train", "--model", "no-such-model", "--layer", "1", "--data", "no-such-data", "--out", str(tmp_path / "out"),
        f"{flag}={value}",  # the = form, since argparse would take a bare -1e-3 for an option
    )
    assert result.returncode == 2
    quoted_value = repr(value) if value == "five" else value  # text that is not a number is quoted
    assert f"argument {flag}: expected a positive finite number, got {quoted_value}\n" in result.stderr
    assert not (tmp_path / "out").exists()


def test_train_keeps_foreign_folder(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    config = SAETrainingConfig(d_sae=16, training_steps=2, batch_size_tokens=64)
    with pytest.raises(ValueError, match="is not an SAE checkpoint"):
        train_sae(synthetic_activations(200), config, precious, metadata={})
    assert (precious / "notes.txt").read_text() == "keep me"
    existing_file = tmp_path / "file.txt"
    existing_file.write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        train_sae(synthetic_activations(200), config, existing_file, metadata={})


def test_train_replaces_checkpoint_only_when_allowed(tmp_path):
    from rmsae.sae_training import check_output_folder

    out = tmp_path / "sae"
    config = SAETrainingConfig(d_sae=16, training_steps=2, batch_size_tokens=64)
    train_sae(synthetic_activations(200), config, out, metadata={})
    check_output_folder(out, overwrite=True)
    with pytest.raises(ValueError, match="already contains an SAE checkpoint.*--overwrite"):
        check_output_folder(out, overwrite=False)
    check_output_folder(tmp_path / "new", overwrite=False)

    # The command line refuses before loading the model or the data.
    result = run_cli("sae", "train", "--model", "no-such-model", "--layer", "1", "--data", "no-such-data", "--out", str(out))
    assert result.returncode == 2
    assert "pass --overwrite" in result.stderr


def test_truncated_weights_rejected(released_layout):
    folder = released_layout / "tiny-llama_layer1"
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SAECheckpointError, match="cannot be read as a safetensors file.*truncated"):
        read_sae_info(folder)


def test_weights_missing_decoder_rejected(released_layout):
    from safetensors.torch import load_file, save_file

    folder = released_layout / "tiny-llama_layer1"
    weights = folder / "sae_weights.safetensors"
    save_file({"W_enc": load_file(weights)["W_enc"]}, weights)
    with pytest.raises(SAECheckpointError, match=r"lacks the tensors \['W_dec', 'b_dec'\]"):
        read_sae_info(folder)


def test_cfg_weight_shape_mismatch(released_layout):
    folder = released_layout / "tiny-llama_layer1"
    edit_cfg(folder, d_in=100)
    with pytest.raises(SAECheckpointError, match=r"W_enc has shape \(64, 256\)"):
        read_sae_info(folder)


@pytest.mark.parametrize(
    "metadata, message",
    [
        ("oops", r"field 'metadata' must be a JSON object, got 'oops'"),
        ({"layer": "two"}, r"field 'metadata.layer' must be a non-negative integer, got 'two'"),
        ({"layer": 2.7}, r"field 'metadata.layer' must be a non-negative integer, got 2.7"),
        ({"layer": -3}, r"field 'metadata.layer' must be a non-negative integer, got -3"),
        ({"hook_name": 5}, r"hook name must be a string .*, got 5"),
    ],
)
def test_malformed_metadata_rejected(released_layout, metadata, message):
    folder = released_layout / "tiny-llama_layer1"
    edit_cfg(folder, metadata=metadata)
    with pytest.raises(SAECheckpointError, match=message):
        read_sae_info(folder)


def test_cli_info_checks_normaliser(released_layout):
    folder = released_layout / "tiny-llama_layer1"
    edit_cfg(folder, normalize_activations="expected_average_only_in")
    result = run_cli("sae", "info", str(folder))
    assert result.returncode == 2
    assert "activation_scaler.json is missing" in result.stderr
