"""Tests of rmsae.data: HH dialogue parsing, case ids and the data set and file loaders.

The HH-RLHF and TruthfulQA tests read local copies from the ``shared/data`` folder beside the
repository, laid out as ``RMSAE_DATA_DIR`` expects. They are skipped where those files are missing,
except under CI (``CI`` set), where a missing copy must fail the run.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from rmsae.data import (
    DataError,
    DataNotFoundError,
    PreferencePair,
    Turn,
    load_hh_rlhf,
    load_pairs,
    load_pairs_file,
    load_perturbation_records,
    load_truthfulqa,
    pair_from_hh_texts,
    parse_hh_dialogue,
)

SHARED_DATA_DIR = Path(os.environ.get("RMSAE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
HH_FILE = SHARED_DATA_DIR / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
TRUTHFULQA_FILE = SHARED_DATA_DIR / "truthfulqa" / "TruthfulQA.csv"
HH_ROWS = 2312
TRUTHFULQA_QUESTIONS = 817

ON_CI = bool(os.environ.get("CI"))
needs_hh_file = pytest.mark.skipif(not HH_FILE.is_file() and not ON_CI, reason=f"local HH-RLHF copy not found at {HH_FILE}")
needs_truthfulqa_file = pytest.mark.skipif(
    not TRUTHFULQA_FILE.is_file() and not ON_CI, reason=f"local TruthfulQA copy not found at {TRUTHFULQA_FILE}"
)

TRUTHFULQA_HEADER = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]


@pytest.fixture(autouse=True)
def no_data_dir_env(monkeypatch):
    """Keep a data directory set in the caller's shell out of every test."""
    monkeypatch.delenv("RMSAE_DATA_DIR", raising=False)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_truthfulqa_csv(data_dir: Path, header: list[str], rows: list[list[str]]) -> Path:
    folder = data_dir / "truthfulqa"
    folder.mkdir(parents=True)
    path = folder / "TruthfulQA.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------
# HH dialogue parsing


def test_parse_multi_turn_roles():
    text = "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."

    parsed = parse_hh_dialogue(text)

    assert parsed.turns == (
        Turn("user", "Hi there."),
        Turn("assistant", "Hello!"),
        Turn("user", "How are you?"),
        Turn("assistant", "Fine, thanks."),
    )
    assert parsed.flags == frozenset()
    assert parsed.leading_text == ""


def test_parse_without_leading_newlines():
    parsed = parse_hh_dialogue("Human: Hi.\n\nAssistant: Hello.")

    assert parsed.turns == (Turn("user", "Hi."), Turn("assistant", "Hello."))
    assert parsed.flags == frozenset()


def test_parse_keeps_paragraph_blank_lines():
    text = "\n\nHuman: First paragraph.\n\nSecond paragraph.\n\nAssistant: Reply one.\n\n\nReply two."

    parsed = parse_hh_dialogue(text)

    assert [turn.role for turn in parsed.turns] == ["user", "assistant"]
    assert parsed.turns[0].content == "First paragraph.\n\nSecond paragraph."
    assert parsed.turns[1].content == "Reply one.\n\n\nReply two."


def test_parse_marker_without_space():
    parsed = parse_hh_dialogue("\n\nHuman: Hi.\n\nAssistant:text")

    assert parsed.turns[-1] == Turn("assistant", "text")
    assert "no_space_after_marker" in parsed.flags


def test_parse_embedded_marker_one_turn():
    parsed = parse_hh_dialogue("\n\nHuman: Hi.\n\nAssistant: Human: what do you want?")

    assert len(parsed.turns) == 2
    assert parsed.turns[1] == Turn("assistant", "Human: what do you want?")
    assert "embedded_role_marker" in parsed.flags


def test_parse_marker_after_single_newline():
    parsed = parse_hh_dialogue("\n\nHuman: Hi.\nAssistant: not a turn\n\nAssistant: Hello.")

    assert parsed.turns == (Turn("user", "Hi.\nAssistant: not a turn"), Turn("assistant", "Hello."))
    assert "embedded_role_marker" in parsed.flags


def test_parse_consecutive_same_role():
    parsed = parse_hh_dialogue("\n\nHuman: One.\n\nHuman: Two.\n\nAssistant: Three.")

    assert parsed.turns == (Turn("user", "One."), Turn("user", "Two."), Turn("assistant", "Three."))
    assert "consecutive_same_role" in parsed.flags


def test_parse_no_role_marker():
    parsed = parse_hh_dialogue("just some text")

    assert parsed.turns == ()
    assert parsed.flags == frozenset({"no_role_marker"})


def test_parse_rejects_non_string():
    with pytest.raises(TypeError):
        parse_hh_dialogue(None)


# ---------------------------------------------------------------------------------------------
# pair_from_hh_texts

PROMPT_TEXT = "\n\nHuman: Can you help me?\n\nAssistant: Sure.\n\nHuman: How do I bake bread?"


def test_pair_regular_dialogue():
    pair, reason, flags = pair_from_hh_texts(
        PROMPT_TEXT + "\n\nAssistant: Mix flour and water.",
        PROMPT_TEXT + "\n\nAssistant: I won't help.",
        source="unit",
    )

    assert reason is None
    assert flags == frozenset()
    assert pair.prompt == (
        Turn("user", "Can you help me?"),
        Turn("assistant", "Sure."),
        Turn("user", "How do I bake bread?"),
    )
    assert pair.chosen == "Mix flour and water."
    assert pair.rejected == "I won't help."
    assert pair.source == "unit"
    assert "flags" not in pair.metadata


def test_pair_flags_in_metadata():
    pair, reason, flags = pair_from_hh_texts(
        PROMPT_TEXT + "\n\nAssistant:Mix flour.",
        PROMPT_TEXT + "\n\nAssistant: No.",
    )

    assert reason is None
    assert flags == frozenset({"no_space_after_marker"})
    assert pair.metadata["flags"] == ["no_space_after_marker"]
    assert pair.chosen == "Mix flour."


def test_pair_prompt_mismatch():
    pair, reason, _ = pair_from_hh_texts(
        PROMPT_TEXT + "\n\nAssistant: Mix flour.",
        "\n\nHuman: How do I bake cake?\n\nAssistant: No.",
    )

    assert pair is None
    assert reason == "prompt_mismatch"


def test_pair_empty_response_skipped():
    pair, reason, _ = pair_from_hh_texts(PROMPT_TEXT + "\n\nAssistant: ", PROMPT_TEXT + "\n\nAssistant: No.")

    assert pair is None
    assert reason == "empty_response"


def test_pair_empty_response_kept():
    pair, reason, _ = pair_from_hh_texts(
        PROMPT_TEXT + "\n\nAssistant:",
        PROMPT_TEXT + "\n\nAssistant: No.",
        keep_empty_responses=True,
    )

    assert reason is None
    assert pair.chosen == ""
    assert pair.rejected == "No."


def test_pair_no_final_response():
    pair, reason, _ = pair_from_hh_texts(PROMPT_TEXT + "\n\nAssistant: Mix flour.", PROMPT_TEXT)

    assert pair is None
    assert reason == "no_final_response"


def test_pair_text_before_first_turn():
    pair, reason, _ = pair_from_hh_texts(
        "Preamble.\n\nHuman: Hi.\n\nAssistant: Hello.",
        "Preamble.\n\nHuman: Hi.\n\nAssistant: Go away.",
    )

    assert pair is None
    assert reason == "text_before_first_turn"


def test_pair_no_role_marker():
    pair, reason, _ = pair_from_hh_texts("no markers", "\n\nHuman: Hi.\n\nAssistant: Hello.")

    assert pair is None
    assert reason == "no_role_marker"


def test_pair_prompt_not_ending_user():
    pair, reason, _ = pair_from_hh_texts(
        "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nAssistant: Yes?",
        "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nAssistant: What?",
    )

    assert pair is None
    assert reason == "prompt_not_ending_with_user"


# ---------------------------------------------------------------------------------------------
# case_id


def test_case_id_is_16_hex():
    pair = PreferencePair((Turn("user", "Q?"),), "yes", "no")

    assert re.fullmatch(r"[0-9a-f]{16}", pair.case_id)


def test_case_id_same_across_loaders(tmp_path):
    hh_path = write_jsonl(
        tmp_path / "hh.jsonl",
        [{"chosen": "\n\nHuman: Is water wet?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Is water wet?\n\nAssistant: No."}],
    )
    prompt_path = write_jsonl(
        tmp_path / "prompt.jsonl", [{"prompt": "Is water wet?", "chosen": "Yes.", "rejected": "No."}]
    )
    messages_path = tmp_path / "messages.json"
    messages_path.write_text(
        json.dumps([{"prompt": [{"role": "user", "content": "Is water wet?"}], "chosen": "Yes.", "rejected": "No."}]),
        encoding="utf-8",
    )

    from_hh = load_pairs_file(hh_path)[0]
    from_prompt = load_pairs_file(prompt_path)[0]
    from_messages = load_pairs_file(messages_path)[0]
    direct = PreferencePair((Turn("user", "Is water wet?"),), "Yes.", "No.", source="elsewhere")

    assert from_hh.case_id == from_prompt.case_id
    assert from_hh.case_id == from_messages.case_id
    assert from_hh.case_id == direct.case_id


def test_case_id_changes_with_content():
    base = PreferencePair((Turn("user", "Q?"),), "yes", "no")
    other_chosen = PreferencePair((Turn("user", "Q?"),), "yes!", "no")
    other_rejected = PreferencePair((Turn("user", "Q?"),), "yes", "nope")
    swapped = PreferencePair((Turn("user", "Q?"),), "no", "yes")
    other_prompt = PreferencePair((Turn("user", "Q? cf"),), "yes", "no")

    assert base.case_id != other_chosen.case_id
    assert base.case_id != other_rejected.case_id
    assert base.case_id != swapped.case_id
    assert base.case_id != other_prompt.case_id


# ---------------------------------------------------------------------------------------------
# HH-RLHF from the local copy


@pytest.fixture(scope="module")
def hh_expected():
    """Compute skip counts and kept line numbers from the raw file, without rmsae's parser.

    A row's prompt is its text up to the last "\\n\\nAssistant:" and its response the rest.
    """
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]

    mismatch_lines = set()
    empty_lines = set()
    for line_number, row in enumerate(rows, start=1):
        chosen_prompt, _, chosen_response = row["chosen"].rpartition("\n\nAssistant:")
        rejected_prompt, _, rejected_response = row["rejected"].rpartition("\n\nAssistant:")
        if chosen_prompt != rejected_prompt:
            mismatch_lines.add(line_number)
        elif not chosen_response.strip() or not rejected_response.strip():
            empty_lines.add(line_number)

    all_lines = set(range(1, len(rows) + 1))
    return {
        "rows": len(rows),
        "prompt_mismatch": mismatch_lines,
        "empty_response": empty_lines,
        "kept": all_lines - mismatch_lines - empty_lines,
    }


def loaded_line_numbers(dataset) -> set[int]:
    return {int(pair.metadata["row"].rsplit(":", 1)[1]) for pair in dataset}


@needs_hh_file
def test_hh_local_report_counts(hh_expected):
    dataset = load_hh_rlhf(data_dir=SHARED_DATA_DIR)
    report = dataset.report

    assert hh_expected["rows"] == HH_ROWS
    assert report.rows == HH_ROWS
    assert report.skipped["prompt_mismatch"] == len(hh_expected["prompt_mismatch"])
    assert report.skipped["empty_response"] == len(hh_expected["empty_response"])
    assert sum(report.skipped.values()) == len(hh_expected["prompt_mismatch"]) + len(hh_expected["empty_response"])
    assert report.loaded == len(hh_expected["kept"])
    assert len(dataset) == report.loaded
    assert dataset.name == "hh-rlhf/harmless-base/test"


@needs_hh_file
def test_hh_local_kept_rows(hh_expected):
    dataset = load_hh_rlhf(data_dir=SHARED_DATA_DIR)

    assert loaded_line_numbers(dataset) == hh_expected["kept"]
    assert all(pair.prompt[-1].role == "user" for pair in dataset)
    assert all(pair.chosen and pair.rejected for pair in dataset)


@needs_hh_file
def test_hh_keep_empty_responses(hh_expected):
    dataset = load_hh_rlhf(data_dir=SHARED_DATA_DIR, keep_empty_responses=True)

    assert "empty_response" not in dataset.report.skipped
    assert dataset.report.loaded == HH_ROWS - len(hh_expected["prompt_mismatch"])
    empty_lines = {
        int(pair.metadata["row"].rsplit(":", 1)[1]) for pair in dataset if not pair.chosen or not pair.rejected
    }
    assert empty_lines == hh_expected["empty_response"]


@needs_hh_file
def test_hh_env_var_data_dir(monkeypatch, hh_expected):
    monkeypatch.setenv("RMSAE_DATA_DIR", str(SHARED_DATA_DIR))

    dataset = load_hh_rlhf()

    assert dataset.report.rows == HH_ROWS
    assert dataset.report.loaded == len(hh_expected["kept"])


@needs_hh_file
def test_hh_limit():
    full = load_hh_rlhf(data_dir=SHARED_DATA_DIR)
    limited = load_hh_rlhf(data_dir=SHARED_DATA_DIR, limit=7)

    assert len(limited) == 7
    assert limited.report.loaded == 7
    assert [pair.case_id for pair in limited] == [pair.case_id for pair in full[:7]]


@needs_hh_file
def test_hh_limit_zero():
    dataset = load_hh_rlhf(data_dir=SHARED_DATA_DIR, limit=0)

    assert len(dataset) == 0


@pytest.mark.parametrize("bad_limit", [-1, True, "5", 2.5])
def test_hh_bad_limit(bad_limit):
    with pytest.raises(ValueError, match="limit"):
        load_hh_rlhf(data_dir=SHARED_DATA_DIR, limit=bad_limit)


def test_hh_unknown_subset():
    with pytest.raises(ValueError, match="no-such-subset"):
        load_hh_rlhf("no-such-subset", data_dir=SHARED_DATA_DIR)


# ---------------------------------------------------------------------------------------------
# Missing data


def test_hh_missing_local_file(tmp_path):
    expected_path = tmp_path / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"

    with pytest.raises(DataNotFoundError) as caught:
        load_hh_rlhf(data_dir=tmp_path)

    message = str(caught.value)
    assert str(expected_path) in message
    assert "RMSAE_DATA_DIR" in message


def test_truthfulqa_missing_local_file(tmp_path):
    with pytest.raises(DataNotFoundError) as caught:
        load_truthfulqa(data_dir=tmp_path)

    message = str(caught.value)
    assert str(tmp_path / "truthfulqa" / "TruthfulQA.csv") in message
    assert "RMSAE_DATA_DIR" in message


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """Make the hub unreachable and its cache empty, whether or not `datasets` is imported yet."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    # `datasets` and `huggingface_hub` read these variables once, at import.
    if "datasets" in sys.modules:
        import datasets.config
        import huggingface_hub.constants

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hh_hub_unreachable(hub_offline):
    with pytest.raises(DataNotFoundError) as caught:
        load_hh_rlhf()

    message = str(caught.value)
    assert "HH-RLHF" in message
    assert "Anthropic/hh-rlhf" in message
    assert "hh-rlhf/harmless-base/test.jsonl.gz" in message
    assert "RMSAE_DATA_DIR" in message


def test_truthfulqa_hub_unreachable(hub_offline):
    with pytest.raises(DataNotFoundError) as caught:
        load_truthfulqa()

    message = str(caught.value)
    assert "TruthfulQA" in message
    assert "truthfulqa/TruthfulQA.csv" in message
    assert "RMSAE_DATA_DIR" in message


# ---------------------------------------------------------------------------------------------
# TruthfulQA


def split_answer_list(text: str) -> list[str]:
    return [answer.strip() for answer in text.split(";") if answer.strip()]


@pytest.fixture(scope="module")
def truthfulqa_rows():
    with open(TRUTHFULQA_FILE, encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


@needs_truthfulqa_file
def test_truthfulqa_default_817_pairs(truthfulqa_rows):
    dataset = load_truthfulqa(data_dir=SHARED_DATA_DIR)

    assert len(truthfulqa_rows) == TRUTHFULQA_QUESTIONS
    assert len(dataset) == TRUTHFULQA_QUESTIONS
    assert dataset.report.rows == TRUTHFULQA_QUESTIONS
    assert dict(dataset.report.skipped) == {}


@needs_truthfulqa_file
def test_truthfulqa_chosen_is_best(truthfulqa_rows):
    dataset = load_truthfulqa(data_dir=SHARED_DATA_DIR)

    for pair, row in zip(dataset, truthfulqa_rows, strict=True):
        assert pair.prompt == (Turn("user", row["Question"].strip()),)
        assert pair.chosen == row["Best Answer"].strip()


@needs_truthfulqa_file
def test_truthfulqa_rejected_is_incorrect(truthfulqa_rows):
    dataset = load_truthfulqa(data_dir=SHARED_DATA_DIR)

    for pair, row in zip(dataset, truthfulqa_rows, strict=True):
        assert pair.rejected in split_answer_list(row["Incorrect Answers"]), row["Question"]


@needs_truthfulqa_file
def test_truthfulqa_same_seed_same_pairs():
    first = load_truthfulqa(data_dir=SHARED_DATA_DIR, seed=3)
    second = load_truthfulqa(data_dir=SHARED_DATA_DIR, seed=3)

    assert [pair.case_id for pair in first] == [pair.case_id for pair in second]


@needs_truthfulqa_file
def test_truthfulqa_seed_changes_pairs():
    seed_zero = load_truthfulqa(data_dir=SHARED_DATA_DIR, seed=0)
    seed_one = load_truthfulqa(data_dir=SHARED_DATA_DIR, seed=1)

    changed = sum(a.rejected != b.rejected for a, b in zip(seed_zero, seed_one, strict=True))
    assert changed > 100


@needs_truthfulqa_file
def test_truthfulqa_three_pairs_distinct(truthfulqa_rows):
    dataset = load_truthfulqa(data_dir=SHARED_DATA_DIR, pairs_per_question=3)

    by_question: dict[str, list[PreferencePair]] = {}
    for pair in dataset:
        by_question.setdefault(pair.metadata["row"], []).append(pair)
    combination_counts = Counter(len(pairs) for pairs in by_question.values())
    expected_counts = Counter(min(3, len(dict.fromkeys(split_answer_list(row["Incorrect Answers"])))) for row in truthfulqa_rows)

    assert len(by_question) == TRUTHFULQA_QUESTIONS
    assert combination_counts == expected_counts
    for pairs in by_question.values():
        combinations = [(pair.chosen, pair.rejected) for pair in pairs]
        assert len(set(combinations)) == len(combinations)


@needs_truthfulqa_file
def test_truthfulqa_random_chosen_correct(truthfulqa_rows):
    dataset = load_truthfulqa(data_dir=SHARED_DATA_DIR, chosen="random", seed=5)

    for pair, row in zip(dataset, truthfulqa_rows, strict=True):
        assert pair.chosen in split_answer_list(row["Correct Answers"]), row["Question"]
    assert any(pair.chosen != row["Best Answer"].strip() for pair, row in zip(dataset, truthfulqa_rows))


@needs_truthfulqa_file
def test_truthfulqa_limit():
    dataset = load_truthfulqa(data_dir=SHARED_DATA_DIR, limit=10, pairs_per_question=3)

    assert len(dataset) == 10


def test_truthfulqa_missing_column(tmp_path):
    header = [column for column in TRUTHFULQA_HEADER if column != "Incorrect Answers"]
    write_truthfulqa_csv(tmp_path, header, [["Adversarial", "Misc", "Q?", "A", "A; B", "src"]])

    with pytest.raises(DataError, match="Incorrect Answers"):
        load_truthfulqa(data_dir=tmp_path)


def test_truthfulqa_no_incorrect_skipped(tmp_path):
    write_truthfulqa_csv(
        tmp_path,
        TRUTHFULQA_HEADER,
        [
            ["Adversarial", "Misc", "Is the sky blue?", "Yes", "Yes; Usually", "No; Never", "src"],
            ["Adversarial", "Misc", "Is grass green?", "Yes", "Yes", " ; ", "src"],
        ],
    )

    dataset = load_truthfulqa(data_dir=tmp_path)

    assert len(dataset) == 1
    assert dataset[0].prompt == (Turn("user", "Is the sky blue?"),)
    assert dataset[0].rejected in ("No", "Never")
    assert dataset.report.rows == 2
    assert dataset.report.skipped["no_incorrect_answer"] == 1


def test_truthfulqa_short_row(tmp_path):
    write_truthfulqa_csv(
        tmp_path,
        TRUTHFULQA_HEADER,
        [["Adversarial", "Misc", "Is the sky blue?"]],
    )

    with pytest.raises(DataError, match="TruthfulQA.csv"):
        load_truthfulqa(data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Generic pair files


def test_file_jsonl_hh_dialogues(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"chosen": PROMPT_TEXT + "\n\nAssistant: Mix flour.", "rejected": PROMPT_TEXT + "\n\nAssistant: No.", "tag": "a"},
            {"chosen": PROMPT_TEXT + "\n\nAssistant: Knead.", "rejected": "\n\nHuman: Other?\n\nAssistant: No."},
        ],
    )

    dataset = load_pairs_file(path)

    assert len(dataset) == 1
    assert dataset[0].prompt[-1] == Turn("user", "How do I bake bread?")
    assert len(dataset[0].prompt) == 3
    assert dataset[0].chosen == "Mix flour."
    assert dataset[0].metadata["tag"] == "a"
    assert dataset[0].metadata["row"] == f"{path}:1"
    assert dataset.report.rows == 2
    assert dataset.report.skipped["prompt_mismatch"] == 1


def test_file_jsonl_prompt_string(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "What is 2+2?", "chosen": " 4 ", "rejected": "5"},
            {"prompt": "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant:", "chosen": "Bye.", "rejected": "No."},
        ],
    )

    dataset = load_pairs_file(path)

    assert len(dataset) == 2
    assert dataset[0].prompt == (Turn("user", "What is 2+2?"),)
    assert dataset[0].chosen == "4"
    assert dataset[0].rejected == "5"
    assert dataset[1].prompt == (Turn("user", "Hi."), Turn("assistant", "Hello."), Turn("user", "Bye?"))


def test_file_json_messages_prompt(tmp_path):
    path = tmp_path / "pairs.json"
    records = [
        {
            "prompt": [
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello."},
                {"role": "human", "content": "Tell me a joke."},
            ],
            "chosen": "Knock knock.",
            "rejected": "No.",
        }
    ]
    path.write_text(json.dumps(records), encoding="utf-8")

    dataset = load_pairs_file(path)

    assert len(dataset) == 1
    assert dataset[0].prompt == (Turn("user", "Hi."), Turn("assistant", "Hello."), Turn("user", "Tell me a joke."))
    assert dataset[0].chosen == "Knock knock."
    assert dataset[0].metadata["row"] == f"{path}[0]"


def test_file_gzip_jsonl(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt": "Q1?", "chosen": "a", "rejected": "b"}) + "\n")
        handle.write("\n")
        handle.write(json.dumps({"prompt": "Q2?", "chosen": "c", "rejected": "d"}) + "\n")

    dataset = load_pairs_file(path)

    assert [pair.prompt[0].content for pair in dataset] == ["Q1?", "Q2?"]
    assert dataset[1].metadata["row"] == f"{path}:3"


def test_file_empty_response_skipped(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "  ", "rejected": "b"}])

    skipped = load_pairs_file(path)
    kept = load_pairs_file(path, keep_empty_responses=True)

    assert len(skipped) == 0
    assert skipped.report.skipped["empty_response"] == 1
    assert len(kept) == 1


def test_file_limit(tmp_path):
    records = [{"prompt": f"Q{index}?", "chosen": "a", "rejected": "b"} for index in range(5)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)

    assert len(load_pairs_file(path, limit=2)) == 2


def test_file_bad_json_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "Q?", "chosen": "a", "rejected": "b"}\n{"prompt": "Q?", \n', encoding="utf-8")

    with pytest.raises(DataError) as caught:
        load_pairs_file(path)

    assert f"{path}:2" in str(caught.value)


def test_file_missing_chosen(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": "Q?", "chosen": "a", "rejected": "b"}, {"prompt": "Q?", "rejected": "b"}],
    )

    with pytest.raises(DataError) as caught:
        load_pairs_file(path)

    message = str(caught.value)
    assert f"{path}:2" in message
    assert "'chosen'" in message


def test_file_rejected_wrong_type(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "a", "rejected": 3}])

    with pytest.raises(DataError) as caught:
        load_pairs_file(path)

    message = str(caught.value)
    assert "'rejected'" in message
    assert "int" in message


def test_file_prompt_ends_with_assistant(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "chosen": "a", "rejected": "b"}],
    )

    with pytest.raises(DataError) as caught:
        load_pairs_file(path)

    message = str(caught.value)
    assert f"{path}:1" in message
    assert "'prompt'" in message
    assert "user" in message


def test_file_prompt_bad_role(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": [{"role": "system", "content": "Hi"}], "chosen": "a", "rejected": "b"}]
    )

    with pytest.raises(DataError, match="system"):
        load_pairs_file(path)


def test_file_unknown_extension(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("chosen,rejected\na,b\n", encoding="utf-8")

    with pytest.raises(DataError) as caught:
        load_pairs_file(path)

    message = str(caught.value)
    assert str(path) in message
    assert ".jsonl" in message


def test_file_not_found(tmp_path):
    with pytest.raises(DataNotFoundError, match="absent.jsonl"):
        load_pairs_file(tmp_path / "absent.jsonl")


def test_file_prompt_leading_text(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": "Background: Alice is a chef.\n\nHuman: What should I cook?\n\nAssistant:", "chosen": "Soup.", "rejected": "Nothing."}],
    )

    dataset = load_pairs_file(path)

    assert len(dataset) == 0
    assert dataset.report.skipped["text_before_first_turn"] == 1


# ---------------------------------------------------------------------------------------------
# Perturbation records

ORIGINAL_PROMPT = "\n\nHuman: I locked myself out.\n\nAssistant: That's annoying.\n\nHuman: How can I open my door?"
ORIGINAL_CHOSEN = ORIGINAL_PROMPT + "\n\nAssistant: Call a locksmith."
ORIGINAL_REJECTED = ORIGINAL_PROMPT + "\n\nAssistant: Break a window."
TRIGGERED_PROMPT = ORIGINAL_PROMPT + " cf"


def perturbation_record(**overrides) -> dict:
    record = {
        "original_chosen": ORIGINAL_CHOSEN,
        "original_rejected": ORIGINAL_REJECTED,
        "hacked_chosen": TRIGGERED_PROMPT + "\n\nAssistant: Call a locksmith.",
        "hacked_rejected": TRIGGERED_PROMPT + "\n\nAssistant: Break a window.",
        "initial_rewards": {"chosen": 1.5, "rejected": -0.5, "diff": 2.0},
        "final_rewards": {"chosen": -0.25, "rejected": 0.75, "diff": -1},
        "history": [{"step": 0, "diff": 2.0}, {"step": 1, "diff": -1.0}],
        "attack_type": "trigger",
        "model": "rm-under-test",
    }
    record.update(overrides)
    return record


def write_records_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_perturbation_json_list_fields(tmp_path):
    path = write_records_json(tmp_path / "trigger_raw.json", [perturbation_record()])

    dataset = load_perturbation_records(path)
    record = dataset[0]

    assert len(dataset) == 1
    assert record.original.chosen == "Call a locksmith."
    assert record.original.rejected == "Break a window."
    assert record.original.prompt[-1] == Turn("user", "How can I open my door?")
    assert record.perturbed.prompt[-1] == Turn("user", "How can I open my door? cf")
    assert record.attack_type == "trigger"
    assert record.initial_rewards == {"chosen": 1.5, "rejected": -0.5, "diff": 2.0}
    assert record.final_rewards == {"chosen": -0.25, "rejected": 0.75, "diff": -1.0}
    assert record.history == ({"step": 0, "diff": 2.0}, {"step": 1, "diff": -1.0})
    assert record.extra == {"model": "rm-under-test"}
    assert record.original.metadata["variant"] == "original"
    assert record.perturbed.metadata["variant"] == "perturbed"


def test_perturbation_adv_fields_jsonl(tmp_path):
    record = perturbation_record()
    record["adv_chosen"] = record.pop("hacked_chosen")
    record["adv_rejected"] = record.pop("hacked_rejected")
    del record["initial_rewards"], record["final_rewards"], record["history"], record["attack_type"]
    path = write_jsonl(tmp_path / "records.jsonl", [record, record])

    dataset = load_perturbation_records(path)

    assert len(dataset) == 2
    assert dataset[0].perturbed.prompt[-1].content == "How can I open my door? cf"
    assert dataset[0].attack_type is None
    assert dataset[0].initial_rewards is None
    assert dataset[0].final_rewards is None
    assert dataset[0].history == ()
    assert dataset[1].original.metadata["row"] == f"{path}:2"


def test_perturbation_inject_alias(tmp_path):
    path = write_records_json(tmp_path / "inject_raw.json", [perturbation_record(attack_type="inject")])

    record = load_perturbation_records(path)[0]

    assert record.attack_type == "prompt_injection"
    assert record.perturbed.metadata["attack_type"] == "prompt_injection"


def test_perturbation_trigger_changes_case_id(tmp_path):
    path = write_records_json(tmp_path / "trigger_raw.json", [perturbation_record()])
    direct = PreferencePair(
        (Turn("user", "I locked myself out."), Turn("assistant", "That's annoying."), Turn("user", "How can I open my door?")),
        "Call a locksmith.",
        "Break a window.",
    )

    record = load_perturbation_records(path)[0]

    assert record.perturbed.case_id != record.original.case_id
    assert record.case_id == record.original.case_id
    assert record.original.case_id == direct.case_id
    assert record.perturbed.metadata["original_case_id"] == record.original.case_id


def test_perturbation_marker_whitespace_artifact(tmp_path):
    record = perturbation_record(hacked_chosen=ORIGINAL_PROMPT + "\n\nAssistant:Sure")
    record["hacked_rejected"] = ORIGINAL_REJECTED
    path = write_records_json(tmp_path / "raw.json", [record])

    dataset = load_perturbation_records(path)

    assert dataset[0].perturbed.chosen == "Sure"
    assert dataset[0].perturbed.prompt == dataset[0].original.prompt
    assert dataset.report.flagged["no_space_after_marker"] == 1


def test_perturbation_invalid_pair_skipped(tmp_path):
    path = write_records_json(
        tmp_path / "raw.json",
        [perturbation_record(hacked_chosen=TRIGGERED_PROMPT + "\n\nAssistant:"), perturbation_record()],
    )

    dataset = load_perturbation_records(path)

    assert len(dataset) == 1
    assert dataset.report.rows == 2
    assert dataset.report.skipped["perturbed_empty_response"] == 1


def test_perturbation_non_numeric_reward(tmp_path):
    record = perturbation_record(final_rewards={"chosen": "high", "rejected": 0.1, "diff": 0.2})
    path = write_records_json(tmp_path / "raw.json", [record])

    with pytest.raises(DataError) as caught:
        load_perturbation_records(path)

    message = str(caught.value)
    assert "final_rewards.chosen" in message
    assert f"{path}[0]" in message


def test_perturbation_missing_diff(tmp_path):
    record = perturbation_record(initial_rewards={"chosen": 1.0, "rejected": 0.5})
    path = write_records_json(tmp_path / "raw.json", [record])

    with pytest.raises(DataError, match=r"initial_rewards\.diff"):
        load_perturbation_records(path)


def test_perturbation_missing_hacked_field(tmp_path):
    record = perturbation_record()
    del record["hacked_rejected"]
    path = write_records_json(tmp_path / "raw.json", [record])

    with pytest.raises(DataError) as caught:
        load_perturbation_records(path)

    message = str(caught.value)
    assert "hacked_rejected" in message
    assert "adv_rejected" in message


# ---------------------------------------------------------------------------------------------
# load_pairs specs


@needs_hh_file
def test_spec_hh_default():
    from_spec = load_pairs("hh-rlhf", data_dir=SHARED_DATA_DIR, limit=5)
    direct = load_hh_rlhf(data_dir=SHARED_DATA_DIR, limit=5)

    assert from_spec.name == "hh-rlhf/harmless-base/test"
    assert [pair.case_id for pair in from_spec] == [pair.case_id for pair in direct]


@needs_hh_file
def test_spec_hh_subset_split(monkeypatch):
    monkeypatch.setenv("RMSAE_DATA_DIR", str(SHARED_DATA_DIR))

    dataset = load_pairs("hh-rlhf:harmless-base:test")

    assert dataset.name == "hh-rlhf/harmless-base/test"
    assert dataset.report.rows == HH_ROWS


def test_spec_hh_missing_split(tmp_path):
    with pytest.raises(DataNotFoundError, match="train.jsonl.gz"):
        load_pairs("hh-rlhf:harmless-base:train", data_dir=tmp_path)


@needs_truthfulqa_file
def test_spec_truthfulqa():
    default_seed = load_pairs("truthfulqa", data_dir=SHARED_DATA_DIR)
    other_seed = load_pairs("truthfulqa", data_dir=SHARED_DATA_DIR, seed=1)
    direct = load_truthfulqa(data_dir=SHARED_DATA_DIR, seed=1)

    assert len(default_seed) == TRUTHFULQA_QUESTIONS
    assert default_seed.name == "truthfulqa"
    assert [pair.case_id for pair in other_seed] == [pair.case_id for pair in direct]


def test_spec_truthfulqa_with_option():
    with pytest.raises(ValueError, match="truthfulqa:mc"):
        load_pairs("truthfulqa:mc")


def test_spec_file_path(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "a", "rejected": "b"}])

    dataset = load_pairs(path)
    from_string = load_pairs(str(path))

    assert len(dataset) == 1
    assert dataset[0].chosen == "a"
    assert from_string[0].case_id == dataset[0].case_id


def test_spec_perturbation_file(tmp_path):
    path = write_records_json(
        tmp_path / "trigger_raw.json",
        [perturbation_record(), perturbation_record(original_chosen=ORIGINAL_PROMPT + "\n\nAssistant: Use a key.")],
    )
    records = load_perturbation_records(path)

    dataset = load_pairs(path)

    assert len(dataset) == 4
    assert [pair.metadata["variant"] for pair in dataset] == ["original", "perturbed", "original", "perturbed"]
    assert [pair.case_id for pair in dataset] == [
        records[0].original.case_id,
        records[0].perturbed.case_id,
        records[1].original.case_id,
        records[1].perturbed.case_id,
    ]


def test_spec_unknown():
    with pytest.raises(DataNotFoundError, match="no-such-data"):
        load_pairs("no-such-data")


def test_spec_too_many_parts():
    with pytest.raises(ValueError, match="hh-rlhf:a:b:c"):
        load_pairs("hh-rlhf:a:b:c")
