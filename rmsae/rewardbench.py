"""RewardBench 2: loading prompts, scoring their completions, and the official and authors' scoring rules.

The official rules follow ``allenai/reward-bench`` at commit a0096928eb1d54edd3f6361374708cc68e738b79,
``rewardbench/utils.py``: ``reroll_and_score_dataset`` for the non-Ties subsets and
``process_single_model`` for Ties (``scripts/run_v2.py`` applies them per subset).

- Non-Ties prompt: credit ``1/k`` when the first chosen completion's score equals the maximum over
  all the prompt's completions and ``k`` completions share that maximum, else 0. The subset score
  is the mean credit.
- Ties: prompts come in ``ref:<n>`` / ``tied:<n>`` id pairs. A prompt is accurate when its worst
  correct completion outscores its best incorrect one. The subset score is
  ``0.3 * tied accuracy + 0.3 * ref accuracy + 0.2 * P(tied correct-incorrect margin > spread of the
  correct scores) + 0.2 * P(min(ref margin, tied margin) > that spread) + 0.01 * mean tanh(min margin
  / spread - 1)``, where a NaN ratio counts as 0. As in the official code, the correctness terms and
  so the score are NaN when no ``ref:<n>`` prompt has its ``tied:<n>`` partner among the prompts.
- Overall: the unweighted mean of the subset scores, the leaderboard's convention (``run_v2.py``
  itself prints the subset scores only).

The authors' rule (their ``evaluate_rb2.py``): a prompt is correct when every chosen completion
outscores every rejected one, and the overall accuracy is micro-averaged over all prompts.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .data import DataError, DataNotFoundError, PreferencePair, Turn, read_json_records
from .paths import resolve_data_dir

logger = logging.getLogger(__name__)

REWARDBENCH2_HUB_ID = "allenai/reward-bench-2"
REWARDBENCH2_SUBSETS = ("Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties")
TIES_SUBSET = "Ties"
_TIES_ID = re.compile(r"^(ref|tied):(\d+)$")


@dataclass(frozen=True)
class BenchmarkPrompt:
    """One prompt with its correct (``chosen``) and incorrect (``rejected``) completions, in RewardBench 2's layout."""

    prompt_id: str
    subset: str
    prompt: tuple[Turn, ...]
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.chosen or not self.rejected:
            raise DataError(f"Prompt {self.prompt_id!r} needs at least one chosen and one rejected completion.")
        if not self.prompt or self.prompt[-1].role != "user":
            raise DataError(f"Prompt {self.prompt_id!r} must end with a user turn.")
        if self.subset == TIES_SUBSET and not _TIES_ID.match(self.prompt_id):
            raise DataError(f"Ties prompt id {self.prompt_id!r} must have the form 'ref:<number>' or 'tied:<number>'.")

    @property
    def completions(self) -> tuple[str, ...]:
        """Chosen completions first, then rejected ones: the order of :meth:`conversations` and of score arrays."""
        return self.chosen + self.rejected

    def conversations(self) -> list[tuple[Turn, ...]]:
        return [self.prompt + (Turn("assistant", completion),) for completion in self.completions]


def prompts_from_pairs(pairs: Sequence[PreferencePair], subset: str) -> list[BenchmarkPrompt]:
    """Turn preference pairs into one-chosen, one-rejected prompts of ``subset`` (ids are the case ids)."""
    return [BenchmarkPrompt(pair.case_id, subset, pair.prompt, (pair.chosen,), (pair.rejected,)) for pair in pairs]


def prompts_from_truthfulqa(
    *, data_dir: str | Path | None = None, limit: int | None = None, rejected_per_question: int = 3, seed: int = 0,
    subset: str = "TruthfulQA",
) -> list[BenchmarkPrompt]:
    """Build RewardBench-style prompts from TruthfulQA: the best answer against up to ``rejected_per_question`` incorrect ones.

    That is the layout of RewardBench 2's non-Ties subsets (one correct and three incorrect
    completions). :func:`rmsae.data.load_truthfulqa` draws the incorrect completions, seeded by ``seed``.
    """
    from .data import load_truthfulqa

    if isinstance(rejected_per_question, bool) or not isinstance(rejected_per_question, int) or rejected_per_question < 1:
        raise ValueError(f"rejected_per_question must be a positive integer, got {rejected_per_question!r}.")
    pairs = load_truthfulqa(data_dir=data_dir, pairs_per_question=rejected_per_question, seed=seed)
    grouped: dict[tuple[tuple[Turn, ...], str], list[str]] = {}
    for pair in pairs:
        grouped.setdefault((pair.prompt, pair.chosen), []).append(pair.rejected)
    prompts = [
        BenchmarkPrompt(f"truthfulqa:{index}", subset, prompt, (chosen,), tuple(rejected))
        for index, ((prompt, chosen), rejected) in enumerate(grouped.items())
    ]
    return prompts[:limit] if limit is not None else prompts


def load_rewardbench2(
    path: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    subsets: Sequence[str] | None = None,
) -> list[BenchmarkPrompt]:
    """Load RewardBench 2's test split: from ``path`` (JSON or JSON Lines in the hub schema), a local copy, or the hub.

    Without ``path``, ``<data dir>/reward-bench-2/test.jsonl`` is read when a data directory is set
    (``data_dir`` or ``RMSAE_DATA_DIR``), else ``allenai/reward-bench-2`` from the hub. Each record
    needs ``id``, ``prompt`` (a string), ``chosen`` and ``rejected`` (lists of strings) and
    ``subset``; ``num_correct``, when present, must equal the number of chosen completions.
    ``subsets`` keeps only those subsets and ``limit`` the first prompts after that.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}.")
    if path is None:
        local_dir = resolve_data_dir(data_dir)
        if local_dir is not None:
            path = local_dir / "reward-bench-2" / "test.jsonl"
            if not path.is_file():
                raise DataNotFoundError(
                    f"RewardBench 2 not found at {path}. Save the hub data set {REWARDBENCH2_HUB_ID} (split test) there as "
                    "JSON Lines, pass its path, or unset the data directory to load it from the hub."
                )
    if path is not None:
        records = read_json_records(path)
    else:
        from .data import _load_from_hub

        rows = _load_from_hub("RewardBench 2", REWARDBENCH2_HUB_ID, expected="$RMSAE_DATA_DIR/reward-bench-2/test.jsonl", split="test")
        records = ((f"{REWARDBENCH2_HUB_ID}[{index}]", row) for index, row in enumerate(rows))

    selected_subsets = set(subsets) if subsets is not None else None
    prompts: list[BenchmarkPrompt] = []
    seen: set[str] = set()
    for location, record in records:
        prompt = _parse_record(record, location)
        if selected_subsets is not None and prompt.subset not in selected_subsets:
            continue
        if prompt.prompt_id in seen:
            raise DataError(f"{location}: prompt id {prompt.prompt_id!r} appears twice; ids must be unique.")
        seen.add(prompt.prompt_id)
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        source = path if path is not None else REWARDBENCH2_HUB_ID
        raise DataError(f"No RewardBench 2 prompt was loaded from {source}"
                        f"{f' for subsets {sorted(selected_subsets)}' if selected_subsets else ''}.")
    logger.info("Loaded %d RewardBench 2 prompts (%d completions).", len(prompts), sum(len(p.completions) for p in prompts))
    return prompts


def _parse_record(record: Any, location: str) -> BenchmarkPrompt:
    if not isinstance(record, Mapping):
        raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}.")
    missing = [key for key in ("id", "prompt", "chosen", "rejected", "subset") if key not in record]
    if missing:
        raise DataError(f"{location}: missing field(s) {missing}; RewardBench 2 records have id, prompt, chosen, rejected and subset.")
    prompt, subset = record["prompt"], record["subset"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{location}: prompt must be a non-empty string, got {prompt!r:.60}.")
    if not isinstance(subset, str) or not subset:
        raise DataError(f"{location}: subset must be a non-empty string, got {subset!r}.")
    completions = {}
    for side in ("chosen", "rejected"):
        values = record[side]
        if not isinstance(values, (list, tuple)) or not values or not all(isinstance(value, str) for value in values):
            raise DataError(f"{location}: {side} must be a non-empty list of strings.")
        completions[side] = tuple(values)
    num_correct = record.get("num_correct")
    if num_correct is not None and num_correct != len(completions["chosen"]):
        raise DataError(f"{location}: num_correct is {num_correct}, but chosen has {len(completions['chosen'])} completions.")
    try:
        return BenchmarkPrompt(str(record["id"]), subset, (Turn("user", prompt),), completions["chosen"], completions["rejected"])
    except DataError as error:
        raise DataError(f"{location}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Scores per prompt


def flatten_conversations(prompts: Sequence[BenchmarkPrompt]) -> list[tuple[Turn, ...]]:
    """Return every completion of every prompt as a conversation, prompt by prompt (chosen before rejected)."""
    return [conversation for prompt in prompts for conversation in prompt.conversations()]


def split_scores(prompts: Sequence[BenchmarkPrompt], flat_scores: np.ndarray) -> list[np.ndarray]:
    """Cut a flat score array (ordered as :func:`flatten_conversations`) into one array per prompt."""
    flat_scores = np.asarray(flat_scores, dtype=np.float64)
    sizes = [len(prompt.completions) for prompt in prompts]
    if flat_scores.shape != (sum(sizes),):
        raise ValueError(f"Expected {sum(sizes)} scores for {len(prompts)} prompts, got an array of shape {flat_scores.shape}.")
    return np.split(flat_scores, np.cumsum(sizes)[:-1]) if prompts else []


def _check_scores(prompts: Sequence[BenchmarkPrompt], scores: Sequence[np.ndarray]) -> None:
    if len(prompts) != len(scores):
        raise ValueError(f"Got {len(scores)} score arrays for {len(prompts)} prompts; pass one array per prompt "
                         "(split_scores cuts a flat array of all completions' scores).")
    for prompt, values in zip(prompts, scores):
        if len(values) != len(prompt.completions):
            raise ValueError(f"Prompt {prompt.prompt_id!r} has {len(prompt.completions)} completions but {len(values)} scores.")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"Prompt {prompt.prompt_id!r} has a NaN or infinite score: {np.asarray(values)}.")


# ---------------------------------------------------------------------------------------------
# Official scoring


def best_of_credit(scores: np.ndarray) -> float:
    """Official non-Ties credit: ``1/k`` when the first (chosen) score is the maximum, shared by ``k`` completions; else 0."""
    scores = np.asarray(scores, dtype=np.float64)
    maximum = scores.max()
    return float(1.0 / np.sum(scores == maximum)) if scores[0] == maximum else 0.0


def ties_score(prompts: Sequence[BenchmarkPrompt], scores: Sequence[np.ndarray]) -> dict[str, float]:
    """Official Ties subset score with its five terms (see the module docstring)."""
    stats: dict[str, dict[int, tuple[bool, float, float]]] = {"ref": {}, "tied": {}}
    for prompt, values in zip(prompts, scores):
        kind, number = _TIES_ID.match(prompt.prompt_id).groups()  # type: ignore[union-attr]
        correct = np.asarray(values[: len(prompt.chosen)], dtype=np.float64)
        incorrect = np.asarray(values[len(prompt.chosen) :], dtype=np.float64)
        # A single correct completion has no spread; the official code stores None there, which we keep as NaN.
        spread = float(correct.max() - correct.min()) if len(correct) > 1 else math.nan
        margin = float(correct.min() - incorrect.max())
        stats[kind][int(number)] = (margin > 0, spread, margin)

    def accuracy(kind: str) -> float:
        return float(np.mean([item[0] for item in stats[kind].values()])) if stats[kind] else 0.0

    shared = sorted(set(stats["ref"]) & set(stats["tied"]))
    if not shared:
        logger.warning("No Ties prompt has both its ref: and tied: version here (%d prompts), so the Ties score is NaN.", len(prompts))
    spread = np.array([stats["tied"][n][1] for n in shared], dtype=np.float64)
    tied_margin = np.array([stats["tied"][n][2] for n in shared], dtype=np.float64)
    hard_margin = np.minimum(np.array([stats["ref"][n][2] for n in shared], dtype=np.float64), tied_margin)
    with np.errstate(divide="ignore", invalid="ignore"):
        preferred = float(np.mean(tied_margin > spread)) if shared else math.nan
        preferred_hard = float(np.mean(hard_margin > spread)) if shared else math.nan
        margin_term = float(np.mean(np.nan_to_num(np.tanh(hard_margin / spread - 1), nan=0.0))) if shared else math.nan
    terms = {"tied_accuracy": accuracy("tied"), "ref_accuracy": accuracy("ref"), "correctness_preferred": preferred,
             "correctness_preferred_hard": preferred_hard, "correctness_margin": margin_term}
    terms["score"] = (0.30 * terms["tied_accuracy"] + 0.30 * terms["ref_accuracy"] + 0.20 * preferred
                      + 0.20 * preferred_hard + 0.01 * margin_term)
    return terms


def official_scores(prompts: Sequence[BenchmarkPrompt], scores: Sequence[np.ndarray]) -> dict[str, Any]:
    """Official RewardBench 2 scores: ``{"subsets": {name: {"score", "prompts"}}, "overall": mean of subset scores}``."""
    _check_scores(prompts, scores)
    by_subset: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_subset.setdefault(prompt.subset, []).append(index)
    subsets: dict[str, dict[str, Any]] = {}
    for subset, indices in by_subset.items():
        if subset == TIES_SUBSET:
            terms = ties_score([prompts[i] for i in indices], [scores[i] for i in indices])
            subsets[subset] = {"prompts": len(indices), **terms}
        else:
            subsets[subset] = {"prompts": len(indices), "score": float(np.mean([best_of_credit(scores[i]) for i in indices]))}
    return {"subsets": subsets, "overall": float(np.mean([item["score"] for item in subsets.values()]))}


def authors_scores(prompts: Sequence[BenchmarkPrompt], scores: Sequence[np.ndarray]) -> dict[str, Any]:
    """Score with the authors' rule: a prompt is correct when every chosen score exceeds every rejected one.

    The overall accuracy is micro-averaged over prompts.
    """
    _check_scores(prompts, scores)
    subsets: dict[str, dict[str, Any]] = {}
    for prompt, values in zip(prompts, scores):
        entry = subsets.setdefault(prompt.subset, {"correct": 0, "total": 0})
        entry["correct"] += int(np.min(values[: len(prompt.chosen)]) > np.max(values[len(prompt.chosen) :]))
        entry["total"] += 1
    for entry in subsets.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
    correct, total = sum(e["correct"] for e in subsets.values()), sum(e["total"] for e in subsets.values())
    return {"subsets": subsets, "overall": {"accuracy": correct / total, "correct": correct, "total": total}}


def score_table(prompts: Sequence[BenchmarkPrompt], scores_by_method: Mapping[str, Sequence[np.ndarray]]):
    """Tabulate the official score and the authors' accuracy: one row per (method, subset) and an ``Overall`` row per method."""
    import pandas as pd

    rows = []
    for method, scores in scores_by_method.items():
        official, authors = official_scores(prompts, scores), authors_scores(prompts, scores)
        for subset, entry in official["subsets"].items():
            rows.append({"method": method, "subset": subset, "prompts": entry["prompts"], "official": entry["score"],
                         "authors_rule": authors["subsets"][subset]["accuracy"]})
        rows.append({"method": method, "subset": "Overall", "prompts": len(prompts), "official": official["overall"],
                     "authors_rule": authors["overall"]["accuracy"]})
    return pd.DataFrame(rows)
