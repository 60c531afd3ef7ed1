"""Preference pairs and their loaders.

A :class:`PreferencePair` is (prompt turns, chosen response, rejected response) with a stable
``case_id``, a hash of that content. Dialogue text in the Anthropic HH-RLHF layout
(``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) is parsed into turns once, here, and rendered per model
input format by :mod:`rmsae.formats`.

Treatment of irregular HH rows (each counted in the :class:`LoadReport` and logged):

* A turn starts only at a role marker (``Human:`` or ``Assistant:``) that opens the text or follows
  a blank line. Paragraphs inside a turn keep their blank lines.
* A role marker inside a turn (``"Assistant: Human: ..."``, a marker after a single newline) stays
  part of that turn's text, and the pair is *flagged* ``embedded_role_marker``.
* A marker with no space after it (``"Assistant:text"``) parses like one with a space and is
  flagged ``no_space_after_marker``.
* Consecutive turns of one role stay separate turns and are flagged ``consecutive_same_role``.
* Pairs are *skipped* when the chosen and rejected texts do not share the prompt before the final
  Assistant turn (``prompt_mismatch``), when a text does not end with an Assistant turn
  (``no_final_response``), when the prompt does not end with a Human turn
  (``prompt_not_ending_with_user``), when a text holds no role marker at all (``no_role_marker``),
  or when text precedes the first marker (``text_before_first_turn``). Pairs whose final response
  is empty are skipped (``empty_response``) unless ``keep_empty_responses=True``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

from .paths import DATA_DIR_ENV, resolve_data_dir
from .storage import sha256_json

logger = logging.getLogger(__name__)

Role = Literal["user", "assistant"]
ROLES: tuple[str, ...] = ("user", "assistant")

HH_MARKERS = {"Human": "user", "Assistant": "assistant"}
# A role marker opens a turn when it starts the text (after optional whitespace) or follows a blank line.
_TURN_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_EMBEDDED_MARKER = re.compile(r"(?:^|\n|\s)(Human|Assistant):")


class DataError(ValueError):
    """Malformed preference data: the message names the file, line or record, and the field."""


class DataNotFoundError(FileNotFoundError):
    """A data set is neither at its local path nor reachable on the hub."""


@dataclass(frozen=True)
class Turn:
    """One message of a dialogue."""

    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Turn role must be one of {ROLES}, got {self.role!r}.")
        if not isinstance(self.content, str):
            raise TypeError(f"Turn content must be a string, got {type(self.content).__name__}.")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (turns ending with a user turn) with a chosen and a rejected response.

    ``case_id`` is the first 16 hex digits of a SHA-256 over the prompt turns and both responses,
    so the same content gets the same id whichever file or loader it came from.
    """

    prompt: tuple[Turn, ...]
    chosen: str
    rejected: str
    source: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)
    case_id: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        prompt = tuple(self.prompt)
        if not prompt:
            raise ValueError("PreferencePair.prompt must hold at least one turn.")
        if not all(isinstance(turn, Turn) for turn in prompt):
            raise TypeError("PreferencePair.prompt must be a sequence of Turn objects.")
        if prompt[-1].role != "user":
            raise ValueError(f"PreferencePair.prompt must end with a user turn, got {prompt[-1].role!r}.")
        for name in ("chosen", "rejected"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"PreferencePair.{name} must be a string, got {type(value).__name__}.")
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "case_id", compute_case_id(prompt, self.chosen, self.rejected))

    def conversation(self, which: Literal["chosen", "rejected"]) -> tuple[Turn, ...]:
        """Return the prompt turns followed by the chosen or rejected response as an assistant turn."""
        if which not in ("chosen", "rejected"):
            raise ValueError(f"which must be 'chosen' or 'rejected', got {which!r}.")
        return self.prompt + (Turn("assistant", getattr(self, which)),)

    def to_hh_text(self, which: Literal["chosen", "rejected"]) -> str:
        """Render one side as HH-RLHF dialogue text (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``)."""
        return render_hh_text(self.conversation(which))


def compute_case_id(prompt: Sequence[Turn], chosen: str, rejected: str) -> str:
    content = {
        "prompt": [[turn.role, turn.content] for turn in prompt],
        "chosen": chosen,
        "rejected": rejected,
    }
    return sha256_json(content)[:16]


def render_hh_text(turns: Sequence[Turn]) -> str:
    names = {role: marker for marker, role in HH_MARKERS.items()}
    return "".join(f"\n\n{names[turn.role]}: {turn.content}" for turn in turns)


# ---------------------------------------------------------------------------------------------
# HH dialogue parsing


@dataclass(frozen=True)
class ParsedDialogue:
    """Turns parsed from HH text, with the irregularities found on the way."""

    turns: tuple[Turn, ...]
    flags: frozenset[str]
    leading_text: str = ""


def parse_hh_dialogue(text: str) -> ParsedDialogue:
    """Split HH-RLHF dialogue text into turns (see the module docstring for irregular text)."""
    if not isinstance(text, str):
        raise TypeError(f"HH dialogue must be a string, got {type(text).__name__}.")
    flags: set[str] = set()
    matches = list(_TURN_MARKER.finditer(text))
    if not matches:
        return ParsedDialogue((), frozenset({"no_role_marker"}), leading_text=text.strip())

    leading_text = text[: matches[0].start()].strip()
    turns: list[Turn] = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        raw_content = text[match.end() : end]
        if raw_content and not raw_content[0].isspace():
            flags.add("no_space_after_marker")
        content = raw_content.strip()
        if _EMBEDDED_MARKER.search(content) or content.startswith(("Human:", "Assistant:")):
            flags.add("embedded_role_marker")
        role = HH_MARKERS[match.group(1)]
        if turns and turns[-1].role == role:
            flags.add("consecutive_same_role")
        turns.append(Turn(role, content))
    return ParsedDialogue(tuple(turns), frozenset(flags), leading_text)


def pair_from_hh_texts(
    chosen_text: str,
    rejected_text: str,
    *,
    source: str = "",
    metadata: Mapping[str, Any] | None = None,
    keep_empty_responses: bool = False,
) -> tuple[PreferencePair | None, str | None, frozenset[str]]:
    """Build a pair from two HH dialogue texts.

    Returns ``(pair, skip_reason, flags)``: ``pair`` is None and ``skip_reason`` names why when
    the texts do not form a valid pair.
    """
    chosen = parse_hh_dialogue(chosen_text)
    rejected = parse_hh_dialogue(rejected_text)
    flags = chosen.flags | rejected.flags
    for parsed in (chosen, rejected):
        if "no_role_marker" in parsed.flags:
            return None, "no_role_marker", flags
        if parsed.leading_text:
            return None, "text_before_first_turn", flags
        if parsed.turns[-1].role != "assistant":
            return None, "no_final_response", flags
    prompt = chosen.turns[:-1]
    if prompt != rejected.turns[:-1]:
        return None, "prompt_mismatch", flags
    if not prompt or prompt[-1].role != "user":
        return None, "prompt_not_ending_with_user", flags
    chosen_response = chosen.turns[-1].content
    rejected_response = rejected.turns[-1].content
    if not keep_empty_responses and (not chosen_response or not rejected_response):
        return None, "empty_response", flags
    meta = dict(metadata or {})
    if flags:
        meta["flags"] = sorted(flags)
    pair = PreferencePair(prompt, chosen_response, rejected_response, source=source, metadata=meta)
    return pair, None, flags


# ---------------------------------------------------------------------------------------------
# Loaded data sets


@dataclass
class LoadReport:
    """Counts of what a loader kept, skipped (by reason) and flagged (by irregularity)."""

    source: str
    rows: int = 0
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)
    flagged: Counter = field(default_factory=Counter)

    def log(self) -> None:
        skipped = ", ".join(f"{reason}={count}" for reason, count in sorted(self.skipped.items()))
        flagged = ", ".join(f"{flag}={count}" for flag, count in sorted(self.flagged.items()))
        logger.info(
            "Loaded %d of %d rows from %s; skipped: %s; flagged: %s",
            self.loaded,
            self.rows,
            self.source,
            skipped or "none",
            flagged or "none",
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "loaded": self.loaded,
            "skipped": dict(self.skipped),
            "flagged": dict(self.flagged),
        }


@dataclass
class PairDataset(Sequence[PreferencePair]):
    """Loaded preference pairs with the report of how they were loaded."""

    name: str
    pairs: list[PreferencePair]
    report: LoadReport

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):  # type: ignore[override]
        return self.pairs[index]

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)


def _build_hh_dataset(
    name: str,
    rows: Iterable[tuple[str, dict[str, Any]]],
    *,
    limit: int | None,
    keep_empty_responses: bool,
) -> PairDataset:
    """Turn (location, row) items with ``chosen``/``rejected`` HH texts into a PairDataset."""
    report = LoadReport(name)
    pairs: list[PreferencePair] = []
    for location, row in rows:
        if limit is not None and len(pairs) >= limit:
            break
        report.rows += 1
        chosen_text = _require_str(row, "chosen", location)
        rejected_text = _require_str(row, "rejected", location)
        pair, reason, flags = pair_from_hh_texts(
            chosen_text,
            rejected_text,
            source=name,
            metadata={"row": location},
            keep_empty_responses=keep_empty_responses,
        )
        report.flagged.update(flags)
        if pair is None:
            report.skipped[reason] += 1
            logger.debug("Skipped %s: %s", location, reason)
            continue
        pairs.append(pair)
    report.loaded = len(pairs)
    report.log()
    return PairDataset(name, pairs, report)


def _require_str(row: Mapping[str, Any], key: str, location: str) -> str:
    if not isinstance(row, Mapping):
        raise DataError(f"{location}: expected a JSON object, got {type(row).__name__}.")
    if key not in row:
        raise DataError(f"{location}: missing field {key!r} (fields present: {sorted(row)}).")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{location}: field {key!r} must be a string, got {type(value).__name__}.")
    return value


def _check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}.")
    return limit


# ---------------------------------------------------------------------------------------------
# JSON / JSONL reading with line numbers in errors


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_json_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)`` from a JSON Lines file, or a JSON file holding a list.

    ``location`` is ``"FILE:LINE"`` for JSON Lines and ``"FILE[INDEX]"`` for a JSON list, so errors
    can point at the bad record. Gzip-compressed files (``.gz``) are read transparently.
    """
    path = Path(path)
    if path.is_dir():
        raise DataNotFoundError(f"{path} is a folder; pass the JSON or JSON Lines file inside it.")
    if not path.is_file():
        raise DataNotFoundError(f"Data file not found: {path}")
    stem = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    with _open_text(path) as handle:
        try:
            if stem.endswith(".jsonl"):
                for line_number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{path}:{line_number}", json.loads(line)
                    except json.JSONDecodeError as error:
                        raise DataError(f"{path}:{line_number}: invalid JSON ({error.msg}).") from error
            elif stem.endswith(".json"):
                try:
                    document = json.load(handle)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg}).") from error
                if not isinstance(document, list):
                    raise DataError(
                        f"{path}: expected a JSON list of records, got {type(document).__name__}."
                    )
                for index, record in enumerate(document):
                    yield f"{path}[{index}]", record
            else:
                raise DataError(f"{path}: unknown file type; use .json, .jsonl or their .gz forms.")
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as error:
            raise DataError(f"{path}: cannot be read as UTF-8 JSON text ({error}).") from error


# ---------------------------------------------------------------------------------------------
# HH-RLHF


HH_HUB_ID = "Anthropic/hh-rlhf"
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled", "red-team-attempts")


def hh_local_path(data_dir: Path, subset: str, split: str) -> Path:
    return data_dir / "hh-rlhf" / subset / f"{split}.jsonl.gz"


def load_hh_rlhf(
    subset: str = "harmless-base",
    split: str = "test",
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    keep_empty_responses: bool = False,
) -> PairDataset:
    """Load Anthropic HH-RLHF pairs from ``data_dir`` (or ``$RMSAE_DATA_DIR``), else from the hub.

    The local layout is ``<data_dir>/hh-rlhf/<subset>/<split>.jsonl.gz`` (a plain ``.jsonl`` works
    too). Irregular rows are treated as the module docstring describes.
    """
    limit = _check_limit(limit)
    if subset not in HH_SUBSETS:
        raise ValueError(f"Unknown HH-RLHF subset {subset!r}; expected one of {HH_SUBSETS}.")
    name = f"hh-rlhf/{subset}/{split}"
    local_dir = resolve_data_dir(data_dir)
    if local_dir is not None:
        path = hh_local_path(local_dir, subset, split)
        if not path.is_file() and path.with_suffix("").is_file():
            path = path.with_suffix("")
        if not path.is_file():
            raise DataNotFoundError(
                f"HH-RLHF {subset}/{split} not found at {path} (data directory {local_dir}, from "
                f"{'the data_dir argument' if data_dir else DATA_DIR_ENV}). Place the file there, or point "
                f"data_dir or {DATA_DIR_ENV} at a folder that has it; with neither set, {HH_HUB_ID} loads from the hub."
            )
        return _build_hh_dataset(
            name, read_json_records(path), limit=limit, keep_empty_responses=keep_empty_responses
        )

    rows = _load_from_hub(
        "HH-RLHF",
        HH_HUB_ID,
        expected=f"${DATA_DIR_ENV}/hh-rlhf/{subset}/{split}.jsonl.gz",
        data_dir=subset,
        split=split,
    )
    located = ((f"{HH_HUB_ID}/{subset}/{split}[{index}]", row) for index, row in enumerate(rows))
    return _build_hh_dataset(name, located, limit=limit, keep_empty_responses=keep_empty_responses)


def _load_from_hub(display_name: str, hub_id: str, *, expected: str, **kwargs: Any):
    import datasets

    try:
        return datasets.load_dataset(hub_id, **kwargs)
    except Exception as error:  # offline, missing credentials, renamed data set: all end here
        raise DataNotFoundError(
            f"Could not load {display_name} from the hub ({hub_id}): {type(error).__name__}: {error}. "
            f"Offline, set {DATA_DIR_ENV} to a folder holding a local copy at {expected}."
        ) from error


# ---------------------------------------------------------------------------------------------
# TruthfulQA


TRUTHFULQA_HUB_ID = "truthfulqa/truthful_qa"
TRUTHFULQA_COLUMNS = ("Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers")


def split_answers(field_value: str) -> list[str]:
    """Split a TruthfulQA ``;``-separated answer list, dropping stray spaces and empty entries."""
    return [answer.strip() for answer in field_value.split(";") if answer.strip()]


def load_truthfulqa(
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    chosen: Literal["best", "random"] = "best",
    pairs_per_question: int = 1,
    seed: int = 0,
) -> PairDataset:
    """Load TruthfulQA as preference pairs: a question, a correct answer (chosen), an incorrect one.

    Pairing rule: ``chosen="best"`` takes the question's *Best Answer*; ``chosen="random"`` draws
    from its *Correct Answers*. The rejected answer is drawn from its *Incorrect Answers*. Up to
    ``pairs_per_question`` distinct (chosen, rejected) combinations are drawn without replacement,
    with a random generator seeded by ``seed`` and the question text, so one question's pairs do
    not change when others are added or removed. Questions without an incorrect answer are skipped
    (``no_incorrect_answer``).
    """
    limit = _check_limit(limit)
    if chosen not in ("best", "random"):
        raise ValueError(f"chosen must be 'best' or 'random', got {chosen!r}.")
    if isinstance(pairs_per_question, bool) or not isinstance(pairs_per_question, int) or pairs_per_question < 1:
        raise ValueError(f"pairs_per_question must be a positive integer, got {pairs_per_question!r}.")

    local_dir = resolve_data_dir(data_dir)
    if local_dir is not None:
        path = local_dir / "truthfulqa" / "TruthfulQA.csv"
        if not path.is_file():
            raise DataNotFoundError(
                f"TruthfulQA not found at {path} (data directory {local_dir}, from "
                f"{'the data_dir argument' if data_dir else DATA_DIR_ENV}). Place TruthfulQA.csv there, or point "
                f"data_dir or {DATA_DIR_ENV} at a folder that has it; with neither set, {TRUTHFULQA_HUB_ID} loads "
                "from the hub."
            )
        rows = list(_read_truthfulqa_csv(path))
    else:
        hub_rows = _load_from_hub(
            "TruthfulQA",
            TRUTHFULQA_HUB_ID,
            expected=f"${DATA_DIR_ENV}/truthfulqa/TruthfulQA.csv",
            name="generation",
            split="validation",
        )
        rows = [
            (
                f"{TRUTHFULQA_HUB_ID}[{index}]",
                {
                    "Type": row["type"],
                    "Category": row["category"],
                    "Question": row["question"],
                    "Best Answer": row["best_answer"],
                    "Correct Answers": list(row["correct_answers"]),
                    "Incorrect Answers": list(row["incorrect_answers"]),
                    "Source": row.get("source", ""),
                },
            )
            for index, row in enumerate(hub_rows)
        ]

    report = LoadReport("truthfulqa")
    pairs: list[PreferencePair] = []
    for location, row in rows:
        if limit is not None and len(pairs) >= limit:
            break
        report.rows += 1
        missing = [column for column in TRUTHFULQA_COLUMNS if row.get(column) is None]
        if missing:
            raise DataError(f"{location}: row has no value for column(s) {missing}; is the row cut short?")
        question = row["Question"].strip()
        best = row["Best Answer"].strip()
        correct = row["Correct Answers"]
        incorrect = row["Incorrect Answers"]
        correct = split_answers(correct) if isinstance(correct, str) else [a.strip() for a in correct if a.strip()]
        incorrect = split_answers(incorrect) if isinstance(incorrect, str) else [a.strip() for a in incorrect if a.strip()]
        if not question:
            report.skipped["empty_question"] += 1
            continue
        if not incorrect:
            report.skipped["no_incorrect_answer"] += 1
            continue
        if chosen == "best" and best:
            chosen_pool = [best]
        elif correct:
            chosen_pool = correct
        else:
            chosen_pool = [best] if best else []
        if not chosen_pool:
            report.skipped["no_correct_answer"] += 1
            continue
        combos = [(c, r) for c in dict.fromkeys(chosen_pool) for r in dict.fromkeys(incorrect)]
        rng = random.Random(f"{seed}:{question}")
        drawn = rng.sample(combos, k=min(pairs_per_question, len(combos)))
        for chosen_answer, rejected_answer in drawn:
            if limit is not None and len(pairs) >= limit:
                break
            metadata = {"row": location, "type": row.get("Type", ""), "category": row.get("Category", "")}
            pairs.append(
                PreferencePair((Turn("user", question),), chosen_answer, rejected_answer, "truthfulqa", metadata)
            )
    report.loaded = len(pairs)
    report.log()
    return PairDataset("truthfulqa", pairs, report)


def _read_truthfulqa_csv(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    with open(path, "r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in TRUTHFULQA_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing TruthfulQA column(s) {missing}; found {reader.fieldnames}.")
        for row in reader:
            yield f"{path}:{reader.line_num}", row


# ---------------------------------------------------------------------------------------------
# Generic JSON / JSONL pairs


def load_pairs_file(
    path: str | Path,
    *,
    limit: int | None = None,
    keep_empty_responses: bool = False,
) -> PairDataset:
    """Load pairs from a JSON list or JSON Lines file of records with ``chosen`` and ``rejected``.

    Without a ``prompt`` field, ``chosen`` and ``rejected`` are whole HH dialogues. With one, they
    are the responses, and ``prompt`` is either a string (one user turn, or an HH dialogue when it
    contains role markers) or a list of ``{"role", "content"}`` messages ending with a user message.
    Other fields are kept in the pair's metadata.
    """
    limit = _check_limit(limit)
    path = Path(path)
    report = LoadReport(str(path))
    pairs: list[PreferencePair] = []
    for location, record in read_json_records(path):
        if limit is not None and len(pairs) >= limit:
            break
        report.rows += 1
        chosen_text = _require_str(record, "chosen", location)
        rejected_text = _require_str(record, "rejected", location)
        extra = {key: value for key, value in record.items() if key not in ("chosen", "rejected", "prompt")}
        extra["row"] = location
        if "prompt" not in record:
            pair, reason, flags = pair_from_hh_texts(
                chosen_text, rejected_text, source=str(path), metadata=extra,
                keep_empty_responses=keep_empty_responses,
            )
            report.flagged.update(flags)
            if pair is None:
                report.skipped[reason] += 1
                continue
            pairs.append(pair)
            continue

        prompt, reason = _parse_prompt_field(record["prompt"], location)
        if prompt is None:
            report.skipped[reason] += 1
            continue
        if not keep_empty_responses and (not chosen_text.strip() or not rejected_text.strip()):
            report.skipped["empty_response"] += 1
            continue
        pairs.append(PreferencePair(prompt, chosen_text.strip(), rejected_text.strip(), str(path), extra))
    report.loaded = len(pairs)
    report.log()
    return PairDataset(path.name, pairs, report)


def _parse_prompt_field(prompt: Any, location: str) -> tuple[tuple[Turn, ...] | None, str | None]:
    """Parse a ``prompt`` field; return (turns, None), or (None, skip reason) for irregular HH text."""
    if isinstance(prompt, str):
        if _TURN_MARKER.search(prompt):
            parsed = parse_hh_dialogue(prompt)
            if parsed.leading_text:
                return None, "text_before_first_turn"
            turns = parsed.turns
            # A trailing empty Assistant marker ("...\n\nAssistant:") only announces the response.
            if turns and turns[-1].role == "assistant" and not turns[-1].content:
                turns = turns[:-1]
        else:
            turns = (Turn("user", prompt.strip()),)
    elif isinstance(prompt, list):
        turns_list = []
        for index, message in enumerate(prompt):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise DataError(f"{location}: prompt[{index}] must be an object with 'role' and 'content'.")
            role = {"human": "user", "user": "user", "assistant": "assistant"}.get(str(message["role"]).lower())
            if role is None:
                raise DataError(
                    f"{location}: prompt[{index}].role must be 'user' or 'assistant', got {message['role']!r}."
                )
            if not isinstance(message["content"], str):
                raise DataError(f"{location}: prompt[{index}].content must be a string.")
            turns_list.append(Turn(role, message["content"].strip()))
        turns = tuple(turns_list)
    else:
        raise DataError(f"{location}: field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}.")
    if not turns or turns[-1].role != "user":
        raise DataError(f"{location}: field 'prompt' must end with a user turn.")
    return turns, None


# ---------------------------------------------------------------------------------------------
# Perturbation records (the authors' format)


@dataclass(frozen=True)
class PerturbationRecord:
    """One perturbed case: the original pair, the perturbed pair and the rewards recorded with them.

    ``initial_rewards`` and ``final_rewards`` hold ``chosen``, ``rejected`` and ``diff`` as written
    at generation time (None when the record has none). ``extra`` keeps every other field.
    """

    original: PreferencePair
    perturbed: PreferencePair
    attack_type: str | None
    initial_rewards: Mapping[str, float] | None
    final_rewards: Mapping[str, float] | None
    history: tuple[Mapping[str, Any], ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def case_id(self) -> str:
        return self.original.case_id


ATTACK_TYPE_ALIASES = {"inject": "prompt_injection"}


@dataclass
class PerturbationDataset(Sequence[PerturbationRecord]):
    name: str
    records: list[PerturbationRecord]
    report: LoadReport

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):  # type: ignore[override]
        return self.records[index]

    def __iter__(self) -> Iterator[PerturbationRecord]:
        return iter(self.records)


def is_perturbation_record(record: Any) -> bool:
    return isinstance(record, Mapping) and "original_chosen" in record


def load_perturbation_records(path: str | Path, *, limit: int | None = None) -> PerturbationDataset:
    """Load perturbation records from a JSON list (the authors' ``*_raw.json``) or JSON Lines file.

    Required fields: ``original_chosen``, ``original_rejected`` and the perturbed texts as
    ``hacked_chosen``/``hacked_rejected`` or ``adv_chosen``/``adv_rejected``. Optional:
    ``initial_rewards``, ``final_rewards`` (objects with numeric ``chosen``, ``rejected``, ``diff``),
    ``history`` (a list) and ``attack_type`` (``inject`` is read as ``prompt_injection``).
    Records whose original or perturbed texts do not form a valid pair are skipped and counted.
    """
    limit = _check_limit(limit)
    path = Path(path)
    report = LoadReport(str(path))
    records: list[PerturbationRecord] = []
    for location, raw in read_json_records(path):
        if limit is not None and len(records) >= limit:
            break
        report.rows += 1
        original_chosen = _require_str(raw, "original_chosen", location)
        original_rejected = _require_str(raw, "original_rejected", location)
        perturbed_chosen = _require_str(raw, _first_present(raw, ("hacked_chosen", "adv_chosen"), location), location)
        perturbed_rejected = _require_str(
            raw, _first_present(raw, ("hacked_rejected", "adv_rejected"), location), location
        )
        attack_type = raw.get("attack_type")
        if attack_type is not None and not isinstance(attack_type, str):
            raise DataError(f"{location}: field 'attack_type' must be a string, got {type(attack_type).__name__}.")
        attack_type = ATTACK_TYPE_ALIASES.get(attack_type, attack_type)
        initial_rewards = _parse_rewards(raw, "initial_rewards", location)
        final_rewards = _parse_rewards(raw, "final_rewards", location)
        history = raw.get("history", [])
        if not isinstance(history, list):
            raise DataError(f"{location}: field 'history' must be a list, got {type(history).__name__}.")

        metadata = {"row": location, "attack_type": attack_type}
        original, reason, flags = pair_from_hh_texts(
            original_chosen, original_rejected, source=str(path), metadata={**metadata, "variant": "original"}
        )
        report.flagged.update(flags)
        if original is None:
            report.skipped[f"original_{reason}"] += 1
            continue
        perturbed, reason, flags = pair_from_hh_texts(
            perturbed_chosen,
            perturbed_rejected,
            source=str(path),
            metadata={**metadata, "variant": "perturbed", "original_case_id": original.case_id},
        )
        report.flagged.update(flags)
        if perturbed is None:
            report.skipped[f"perturbed_{reason}"] += 1
            continue
        known = {
            "original_chosen", "original_rejected", "hacked_chosen", "hacked_rejected", "adv_chosen",
            "adv_rejected", "attack_type", "initial_rewards", "final_rewards", "history",
        }
        extra = {key: value for key, value in raw.items() if key not in known}
        records.append(
            PerturbationRecord(original, perturbed, attack_type, initial_rewards, final_rewards, tuple(history), extra)
        )
    report.loaded = len(records)
    report.log()
    return PerturbationDataset(path.name, records, report)


def _first_present(record: Mapping[str, Any], keys: Sequence[str], location: str) -> str:
    if not isinstance(record, Mapping):
        raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}.")
    for key in keys:
        if key in record:
            return key
    raise DataError(f"{location}: missing field {' or '.join(repr(k) for k in keys)}.")


def _parse_rewards(record: Mapping[str, Any], key: str, location: str) -> dict[str, float] | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise DataError(f"{location}: field {key!r} must be an object, got {type(value).__name__}.")
    rewards: dict[str, float] = {}
    for name in ("chosen", "rejected", "diff"):
        if name not in value:
            raise DataError(f"{location}: field '{key}.{name}' is missing.")
        number = value[name]
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise DataError(f"{location}: field '{key}.{name}' must be a number, got {type(number).__name__}.")
        rewards[name] = float(number)
    return rewards


# ---------------------------------------------------------------------------------------------
# One entry point for the command line and notebooks


def load_pairs(
    spec: str | Path,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> PairDataset:
    """Load pairs named by ``spec``.

    ``spec`` is ``hh-rlhf`` (harmless-base, test split), ``hh-rlhf:SUBSET[:SPLIT]``, ``truthfulqa``,
    or the path of a JSON/JSONL file. A file of perturbation records yields each case's original
    and perturbed pair, tagged ``metadata["variant"]``. For such a file ``limit`` counts cases
    (records), so up to ``2 * limit`` pairs come back, and the report counts records.
    """
    spec_text = str(spec)
    name, _, rest = spec_text.partition(":")
    if name == "hh-rlhf":
        parts = rest.split(":") if rest else []
        if len(parts) > 2:
            raise ValueError(f"Invalid data spec {spec_text!r}; expected hh-rlhf[:SUBSET[:SPLIT]].")
        subset = parts[0] if parts and parts[0] else "harmless-base"
        split = parts[1] if len(parts) > 1 and parts[1] else "test"
        return load_hh_rlhf(subset, split, data_dir=data_dir, limit=limit)
    if name == "truthfulqa":
        if rest:
            raise ValueError(f"Invalid data spec {spec_text!r}; truthfulqa takes no options.")
        return load_truthfulqa(data_dir=data_dir, limit=limit, seed=seed)

    path = Path(spec_text)
    if not path.exists():
        raise DataNotFoundError(
            f"Unknown data spec {spec_text!r}: not a file, and not one of 'hh-rlhf[:SUBSET[:SPLIT]]' or 'truthfulqa'."
        )
    first = next(read_json_records(path), (None, None))[1]
    if is_perturbation_record(first):
        records = load_perturbation_records(path, limit=limit)
        pairs = [pair for record in records for pair in (record.original, record.perturbed)]
        return PairDataset(records.name, pairs, records.report)
    return load_pairs_file(path, limit=limit)
