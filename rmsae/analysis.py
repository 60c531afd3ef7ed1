"""Statistics the notebooks report: bootstrap intervals, per-pair tables, SAE latent densities."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .data import PreferencePair


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Return ``(estimate, low, high)``: the statistic and its percentile bootstrap interval."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array, got shape {values.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level!r}.")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}.")
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(values), size=(n_resamples, len(values)))
    if statistic is np.mean:
        distribution = values[resamples].mean(axis=1)
    else:
        distribution = np.array([statistic(values[row]) for row in resamples])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(distribution, [tail, 100 - tail])
    return float(statistic(values)), float(low), float(high)


def pair_frame(pairs: Sequence[PreferencePair], scores):
    """Build one row per pair: rewards, reward gap, correctness, truncation and response lengths in words."""
    import pandas as pd

    return pd.DataFrame(
        {
            "case_id": scores.case_ids,
            "reward_chosen": scores.reward_chosen,
            "reward_rejected": scores.reward_rejected,
            "reward_gap": scores.reward_gap,
            "correct": scores.correct,
            "truncated": scores.truncated,
            "chosen_words": [len(pair.chosen.split()) for pair in pairs],
            "rejected_words": [len(pair.rejected.split()) for pair in pairs],
        }
    )


def records_frame(records, method: str | None = None):
    """Build one row per perturbation record: method, case id, reward gaps before and after, success, steps."""
    import pandas as pd

    rows = []
    for record in records:
        steps = [entry for entry in record.get("history", []) if entry.get("step") != "initial"]
        rows.append({
            "method": method or record.get("attack_type"),
            "case_id": record.get("case_id"),
            "initial_diff": record["initial_rewards"]["diff"],
            "final_diff": record["final_rewards"]["diff"],
            "success": record["initial_rewards"]["diff"] > 0 and record["final_rewards"]["diff"] <= 0,
            "steps": len(steps),
        })
    return pd.DataFrame(rows)


def meaning_scores(records):
    """Collect the meaning score and acceptance of every paraphrase candidate in gradient records."""
    import pandas as pd

    rows = []
    for record in records:
        for entry in record.get("history", []):
            for side in ("chosen", "rejected"):
                for candidate in entry.get(f"candidates_{side}", []):
                    rows.append({"side": side, "meaning": candidate["meaning"], "accepted": candidate["accepted"]})
    return pd.DataFrame(rows, columns=["side", "meaning", "accepted"])


def edit_gallery(records, n: int = 3) -> str:
    """HTML of up to ``n`` successful records: each perturbed response with removed words struck and added words marked."""
    import difflib
    import html

    def marked(before: str, after: str) -> str:
        old, new = before.split(), after.split()
        parts = []
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
            if tag in ("replace", "delete"):
                parts.append(f"<del style='color:#b00'>{html.escape(' '.join(old[i1:i2]))}</del>")
            if tag in ("replace", "insert"):
                parts.append(f"<ins style='color:#070'>{html.escape(' '.join(new[j1:j2]))}</ins>")
            if tag == "equal":
                parts.append(html.escape(" ".join(old[i1:i2])))
        return " ".join(parts)

    def last_turns(text: str) -> str:
        return text[text.rfind("\n\nHuman:"):].strip() if "\n\nHuman:" in text else text.strip()

    shown = [record for record in records if record["initial_rewards"]["diff"] > 0 and record["final_rewards"]["diff"] <= 0][:n]
    if not shown:
        return "<p>No successful perturbation to show.</p>"
    blocks = []
    for record in shown:
        initial, final = record["initial_rewards"]["diff"], record["final_rewards"]["diff"]
        blocks.append(
            f"<div style='margin-bottom:1em'><p><b>case {html.escape(str(record.get('case_id')))}</b>: reward gap "
            f"{initial:.3f} &rarr; {final:.3f}</p>"
            f"<p><i>chosen</i>: {marked(last_turns(record['original_chosen']), last_turns(record['hacked_chosen']))}</p>"
            f"<p><i>rejected</i>: {marked(last_turns(record['original_rejected']), last_turns(record['hacked_rejected']))}</p></div>"
        )
    return "\n".join(blocks)
