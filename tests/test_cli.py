"""The `rmsae score` command: output, accuracy line, cache reuse and input guards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rmsae.cli import main

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris is the capital of France.", "rejected": "No."},
    {"prompt": "tell me a joke", "chosen": "Why did the chicken cross the road?", "rejected": "I am sorry."},
    {"chosen": "\n\nHuman: hello there\n\nAssistant: Hello! How can I help?", "rejected": "\n\nHuman: hello there\n\nAssistant: Go away."},
]


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    return path


def score_args(model: Path, data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["score", "--model", str(model), "--data", str(data), "--out", str(out), "--cache-dir", str(cache),
            "--input-format", "chat_template", "--no-progress", *extra]


def test_score_writes_lines(tmp_path, tiny_models, pairs_file, capsys):
    out = tmp_path / "out" / "scores.jsonl"
    assert main(score_args(tiny_models["llama"], pairs_file, out, tmp_path / "cache")) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3
    assert set(lines[0]) == {"case_id", "reward_chosen", "reward_rejected", "truncated", "response_truncated"}
    correct = sum(line["reward_chosen"] > line["reward_rejected"] for line in lines)
    printed = capsys.readouterr().out
    assert f"pair accuracy: {correct / 3:.4f} ({correct}/3" in printed
    assert "pairs scored: 3; truncated: 0" in printed


def test_score_second_run_cached(tmp_path, tiny_models, pairs_file, caplog):
    out = tmp_path / "scores.jsonl"
    args = score_args(tiny_models["llama"], pairs_file, out, tmp_path / "cache")
    assert main(args) == 0
    first = out.read_text()
    caplog.clear()
    with caplog.at_level("INFO", logger="rmsae.reward_model"):
        assert main(args) == 0
    assert "Scoring" not in caplog.text
    assert out.read_text() == first


def test_score_perturbation_file(tmp_path, tiny_models, capsys):
    prompt = "\n\nHuman: How do I open my door?"
    record = {
        "original_chosen": prompt + "\n\nAssistant: Call a locksmith.",
        "original_rejected": prompt + "\n\nAssistant: Break a window.",
        "hacked_chosen": prompt + " SUDO\n\nAssistant: Call a locksmith.",
        "hacked_rejected": prompt + " SUDO\n\nAssistant: Break a window.",
        "attack_type": "backdoor",
    }
    data = tmp_path / "records.json"
    data.write_text(json.dumps([record]))
    out = tmp_path / "scores.jsonl"
    assert main(score_args(tiny_models["llama"], data, out, tmp_path / "cache")) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["variant"] for line in lines] == ["original", "perturbed"]
    assert lines[1]["original_case_id"] == lines[0]["case_id"]
    printed = capsys.readouterr().out
    assert "pair accuracy (original pairs)" in printed
    assert "pair accuracy (perturbed pairs)" in printed


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--limit", "0"), "No pairs to score"),
        (("--device", "banana"), "Invalid device 'banana'"),
        (("--device", "cuda"), "sees no CUDA GPU"),
    ],
)
def test_score_rejects_options(tmp_path, tiny_models, pairs_file, caplog, extra, message):
    out = tmp_path / "scores.jsonl"
    assert main(score_args(tiny_models["llama"], pairs_file, out, tmp_path / "cache", *extra)) == 2
    assert message in caplog.text
    assert not out.exists()


def test_score_out_is_directory(tmp_path, tiny_models, pairs_file, caplog):
    assert main(score_args(tiny_models["llama"], pairs_file, tmp_path, tmp_path / "cache")) == 2
    assert "is a directory" in caplog.text


def test_score_out_overwrites_input(tmp_path, tiny_models, pairs_file, caplog):
    before = pairs_file.read_text()
    assert main(score_args(tiny_models["llama"], pairs_file, pairs_file, tmp_path / "cache")) == 2
    assert "is the input file" in caplog.text
    assert pairs_file.read_text() == before


def test_score_model_dir_without_config(tmp_path, pairs_file, caplog):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert main(score_args(empty, pairs_file, tmp_path / "s.jsonl", tmp_path / "cache")) == 2
    assert "contains no config.json" in caplog.text


def test_score_max_length_above_positions(tmp_path, minilm_path, pairs_file, caplog):
    args = ["score", "--model", "all-minilm-l6-v2", "--fresh-head", "--data", str(pairs_file),
            "--out", str(tmp_path / "s.jsonl"), "--no-cache", "--max-length", "600"]
    assert main(args) == 2
    assert "max_length=600 exceeds the 512 positions" in caplog.text


def test_score_bad_batch_size(tmp_path, pairs_file):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--model", "x", "--data", str(pairs_file), "--out", str(tmp_path / "s"), "--batch-size", "0"])
    assert exit_info.value.code == 2
