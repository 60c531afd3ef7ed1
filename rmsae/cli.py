"""The ``rmsae`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("rmsae")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmsae",
        description="Preference instability in reward models, detected and mitigated with sparse autoencoders.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser(
        "score",
        help="score preference pairs with a reward model",
        description="Score the chosen and rejected response of each pair and report the pair accuracy.",
    )
    score.add_argument("--model", required=True, help="registry tag, hub id or local checkpoint directory")
    score.add_argument(
        "--data",
        required=True,
        help="hh-rlhf[:SUBSET[:SPLIT]], truthfulqa, or a JSON/JSONL file of pairs or perturbation records",
    )
    score.add_argument("--out", required=True, type=Path, help="output JSON Lines file, one line per pair")
    score.add_argument("--limit", type=_non_negative_int, help="score at most this many pairs")
    score.add_argument("--batch-size", type=_positive_int, default=16, help="texts per forward pass (default 16)")
    score.add_argument("--max-length", type=_positive_int, help="token budget per text (default: the model's)")
    score.add_argument("--padding-side", choices=("left", "right"), default="right", help="side to pad batches on")
    score.add_argument("--input-format", help="override the model's input format")
    score.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="override the weight dtype")
    score.add_argument("--bf16-autocast", action="store_true", help="run the forward under bfloat16 autocast")
    score.add_argument("--fresh-head", action="store_true", help="allow a checkpoint without reward-head weights")
    score.add_argument("--seed", type=int, default=0, help="seed for a fresh head and for TruthfulQA pairing")
    score.add_argument("--device", default="cpu", help="torch device (default cpu)")
    score.add_argument("--data-dir", help="local data directory (default: $RMSAE_DATA_DIR, else the hub)")
    score.add_argument("--cache-dir", help="cache directory (default: $RMSAE_CACHE_DIR, else ~/.cache/rmsae)")
    score.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    score.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    score.set_defaults(handler=run_score)
    return parser


def run_score(args: argparse.Namespace) -> int:
    import numpy as np

    from .cache import ActivationCache
    from .data import load_pairs
    from .reward_model import load_reward_model
    from .storage import atomic_write_jsonl

    dataset = load_pairs(args.data, data_dir=args.data_dir, limit=args.limit, seed=args.seed)
    if len(dataset) == 0:
        logger.error("No pairs to score in %s (skipped: %s).", args.data, dict(dataset.report.skipped) or "none")
        return 1
    reward_model = load_reward_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        input_format=args.input_format,
        max_length=args.max_length,
        allow_fresh_head=args.fresh_head,
        fresh_head_seed=args.seed,
        autocast_dtype="bfloat16" if args.bf16_autocast else None,
    )
    cache = None if args.no_cache else ActivationCache(reward_model.cache_namespace(), args.cache_dir)
    try:
        scores = reward_model.score_pairs(
            dataset.pairs,
            batch_size=args.batch_size,
            padding_side=args.padding_side,
            cache=cache,
            progress=not args.no_progress,
        )
    finally:
        if cache is not None:
            cache.close()

    records = []
    for index, pair in enumerate(dataset.pairs):
        record = {
            "case_id": pair.case_id,
            "reward_chosen": float(scores.reward_chosen[index]),
            "reward_rejected": float(scores.reward_rejected[index]),
            "truncated": bool(scores.truncated[index]),
            "response_truncated": bool(scores.response_truncated[index]),
        }
        if "variant" in pair.metadata:
            record["variant"] = pair.metadata["variant"]
        records.append(record)
    atomic_write_jsonl(args.out, records)

    variants = sorted({record.get("variant", "all") for record in records})
    for variant in variants:
        selected = np.array([record.get("variant", "all") == variant for record in records])
        label = "" if variant == "all" else f" ({variant} pairs)"
        print(
            f"pair accuracy{label}: {scores.correct[selected].mean():.4f} "
            f"({int(scores.correct[selected].sum())}/{int(selected.sum())}, chosen reward > rejected reward)"
        )
    skipped = dict(dataset.report.skipped)
    print(f"pairs scored: {len(records)}; truncated: {int(scores.truncated.sum())} "
          f"(response cut: {int(scores.response_truncated.sum())}); "
          f"skipped while loading: {sum(skipped.values())}{' ' + str(skipped) if skipped else ''}")
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .data import DataError, DataNotFoundError
    from .reward_model import RewardHeadError

    try:
        return args.handler(args)
    except (DataError, DataNotFoundError, RewardHeadError, ValueError, TypeError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
