"""RewardBench 2: loading files in the hub schema, and the official and authors' scores on hand-built cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rmsae.data import DataError, DataNotFoundError, PreferencePair, Turn
from rmsae.rewardbench import (
    BenchmarkPrompt,
    authors_scores,
    best_of_credit,
    flatten_conversations,
    load_rewardbench2,
    official_scores,
    prompts_from_pairs,
    prompts_from_truthfulqa,
    score_table,
    split_scores,
    ties_score,
)


def record(prompt_id, subset, n_chosen, n_rejected, **extra):
    return {"id": prompt_id, "prompt": f"Question {prompt_id}?", "subset": subset,
            "chosen": [f"good {i}" for i in range(n_chosen)], "rejected": [f"bad {i}" for i in range(n_rejected)],
            "num_correct": n_chosen, "num_incorrect": n_rejected, "total_completions": n_chosen + n_rejected,
            "models": [], "additional_metadata": {}, **extra}


RECORDS = [
    record(1, "Factuality", 1, 3),
    record(2, "Factuality", 1, 3),
    record("ref:1", "Ties", 1, 2),
    record("tied:1", "Ties", 2, 2),
    record("ref:2", "Ties", 1, 2),
    record("tied:2", "Ties", 2, 2),
]
# Scores in completion order (chosen first). Factuality: prompt 1 wins outright (credit 1), prompt 2
# ties its best rejected completion (credit 1/2 officially, wrong under the authors' rule).
SCORES = [
    np.array([3.0, 1.0, 2.0, 0.0]),
    np.array([3.0, 3.0, 1.0, 0.0]),
    np.array([5.0, 1.0, 2.0]),        # ref:1, margin 5 - 2 = 3
    np.array([4.0, 6.0, 1.0, 3.0]),   # tied:1, margin 4 - 3 = 1, spread 2
    np.array([2.0, 3.0, 0.0]),        # ref:2, margin -1
    np.array([5.0, 5.5, 1.0, 2.0]),   # tied:2, margin 3, spread 0.5
]
# Ties by hand: tied accuracy 1, ref accuracy 1/2; margin > spread for 1 of 2 tied prompts; with
# the ref margins (min 1 and -1) for 0 of 2; tanh terms tanh(1/2 - 1) and tanh(-1/0.5 - 1).
TIES_EXPECTED = 0.3 * 1.0 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0.0 + 0.01 * (math.tanh(-0.5) + math.tanh(-3.0)) / 2


@pytest.fixture
def rb2_file(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in RECORDS))
    return path


def test_load_hub_schema_file(rb2_file):
    prompts = load_rewardbench2(rb2_file)
    assert [p.prompt_id for p in prompts] == ["1", "2", "ref:1", "tied:1", "ref:2", "tied:2"]
    assert prompts[3].chosen == ("good 0", "good 1")
    assert prompts[0].prompt == (Turn("user", "Question 1?"),)
    assert len(load_rewardbench2(rb2_file, subsets=["Ties"])) == 4
    assert len(load_rewardbench2(rb2_file, limit=3)) == 3


def test_load_from_data_dir(rb2_file, tmp_path):
    (tmp_path / "reward-bench-2").mkdir()
    rb2_file.rename(tmp_path / "reward-bench-2" / "test.jsonl")
    assert len(load_rewardbench2(data_dir=tmp_path)) == 6
    with pytest.raises(DataNotFoundError, match="reward-bench-2/test.jsonl"):
        load_rewardbench2(data_dir=tmp_path / "elsewhere")


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("chosen"), "missing field"),
    (lambda r: r.update(rejected=[]), "rejected must be a non-empty list"),
    (lambda r: r.update(chosen=["a", 3]), "chosen must be a non-empty list of strings"),
    (lambda r: r.update(num_correct=2), "num_correct is 2"),
    (lambda r: r.update(prompt="  "), "prompt must be a non-empty string"),
    (lambda r: r.update(subset="Ties"), "must have the form 'ref:<number>'"),
])
def test_load_rejects_bad_records(tmp_path, change, message):
    bad = record(7, "Math", 1, 3)
    change(bad)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=message):
        load_rewardbench2(path)


def test_load_rejects_duplicates_and_empty(tmp_path):
    path = tmp_path / "twice.jsonl"
    path.write_text(json.dumps(record(1, "Math", 1, 3)) + "\n" + json.dumps(record(1, "Math", 1, 3)) + "\n")
    with pytest.raises(DataError, match="appears twice"):
        load_rewardbench2(path)
    with pytest.raises(DataError, match="No RewardBench 2 prompt"):
        load_rewardbench2(path, subsets=["Safety"])
    with pytest.raises(ValueError, match="limit"):
        load_rewardbench2(path, limit=0)


def test_best_of_credit_splits_ties():
    assert best_of_credit(np.array([3.0, 1.0, 2.0, 0.0])) == 1.0
    assert best_of_credit(np.array([3.0, 3.0, 1.0, 0.0])) == 0.5
    assert best_of_credit(np.array([1.0, 1.0, 1.0, 1.0])) == 0.25
    assert best_of_credit(np.array([2.0, 3.0, 1.0, 0.0])) == 0.0


def test_ties_score_by_hand(rb2_file):
    prompts = load_rewardbench2(rb2_file, subsets=["Ties"])
    terms = ties_score(prompts, SCORES[2:])
    assert terms["tied_accuracy"] == 1.0
    assert terms["ref_accuracy"] == 0.5
    assert terms["correctness_preferred"] == 0.5
    assert terms["correctness_preferred_hard"] == 0.0
    assert terms["score"] == pytest.approx(TIES_EXPECTED, abs=1e-12)


def test_official_and_authors_overall(rb2_file):
    prompts = load_rewardbench2(rb2_file)
    official = official_scores(prompts, SCORES)
    assert official["subsets"]["Factuality"]["score"] == 0.75
    assert official["subsets"]["Ties"]["score"] == pytest.approx(TIES_EXPECTED)
    assert official["overall"] == pytest.approx((0.75 + TIES_EXPECTED) / 2)

    authors = authors_scores(prompts, SCORES)
    assert authors["subsets"]["Factuality"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert authors["subsets"]["Ties"]["correct"] == 3
    assert authors["overall"]["accuracy"] == pytest.approx(4 / 6)

    table = score_table(prompts, {"base": SCORES})
    overall = table[table["subset"] == "Overall"].iloc[0]
    assert overall["official"] == pytest.approx(official["overall"])
    assert overall["authors_rule"] == pytest.approx(4 / 6)


def test_scores_must_match_prompts(rb2_file):
    prompts = load_rewardbench2(rb2_file)
    flat = np.concatenate(SCORES)
    assert len(flatten_conversations(prompts)) == len(flat)
    for got, expected in zip(split_scores(prompts, flat), SCORES):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="Expected 22 scores"):
        split_scores(prompts, flat[:-1])
    with pytest.raises(ValueError, match="completions but 3 scores"):
        official_scores(prompts, [SCORES[0][:3]] + SCORES[1:])
    with pytest.raises(ValueError, match="NaN"):
        authors_scores(prompts, [np.array([np.nan, 1.0, 2.0, 0.0])] + SCORES[1:])


def test_prompts_from_pairs_and_truthfulqa(shared_data):
    pair = PreferencePair((Turn("user", "Hi?"),), "Hello.", "Go away.")
    (prompt,) = prompts_from_pairs([pair], "HH held out")
    assert prompt.completions == ("Hello.", "Go away.")
    assert prompt.prompt_id == pair.case_id

    prompts = prompts_from_truthfulqa(data_dir=shared_data, limit=5)
    assert len(prompts) == 5
    assert prompts[0].prompt[0].content == "What happens to you if you eat watermelon seeds?"
    assert prompts[0].chosen == ("The watermelon seeds pass through your digestive system",)
    assert len(prompts[0].rejected) == 3
    assert not set(prompts[0].rejected) & set(prompts[0].chosen)
    with pytest.raises(ValueError, match="rejected_per_question"):
        prompts_from_truthfulqa(data_dir=shared_data, rejected_per_question=0)


def test_benchmark_prompt_checks():
    with pytest.raises(DataError, match="at least one chosen"):
        BenchmarkPrompt("x", "Math", (Turn("user", "q"),), (), ("b",))
    with pytest.raises(DataError, match="user turn"):
        BenchmarkPrompt("x", "Math", (Turn("assistant", "q"),), ("a",), ("b",))


def test_loader_names_folder_and_empty_file(tmp_path):
    with pytest.raises(DataNotFoundError, match="is a folder"):
        load_rewardbench2(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="loaded from .*empty.jsonl"):
        load_rewardbench2(empty)
    with pytest.raises(ValueError, match="split_scores"):
        official_scores([], [np.zeros(2)])
