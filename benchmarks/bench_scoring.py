"""Benchmark: batched, length-sorted scoring against the authors' one-text-at-a-time loop.

Scores HH-RLHF harmless-base test pairs with the MiniLM encoder and a fresh reward head (the
figures measure throughput, not accuracy). Each method runs in its own subprocess so that its peak
resident memory is its own. Prints pairs per second, the speed-up over the one-at-a-time loop, peak
memory, and how closely bfloat16 autocast rewards and pair orderings agree with float32.

Usage: python benchmarks/bench_scoring.py [--pairs 256] [--max-length 256] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

METHODS = {
    "authors_loop": "one text per forward, padded to its pair partner's length, float32 (the authors' loop)",
    "one_at_a_time": "one text per forward, unpadded, float32",
    "batched_fp32": "length-sorted batches, float32",
    "batched_bf16": "length-sorted batches, bfloat16 autocast",
}


def run_method(method: str, pairs: int, max_length: int, batch_size: int, out_path: str) -> None:
    import torch

    from rmsae.data import load_hh_rlhf
    from rmsae.reward_model import load_reward_model

    dataset = load_hh_rlhf(limit=pairs)
    rm = load_reward_model(
        "all-minilm-l6-v2",
        allow_fresh_head=True,
        max_length=max_length,
        autocast_dtype="bfloat16" if method == "batched_bf16" else None,
    )
    # Warm-up so that one-time costs (allocation, kernel selection) do not count.
    rm.score_pairs(dataset.pairs[:4], batch_size=4, progress=False)

    start = time.perf_counter()
    if method in ("authors_loop", "one_at_a_time"):
        rewards_chosen, rewards_rejected = [], []
        for pair in dataset.pairs:
            encoded = {side: rm.encode(rm.render(pair.conversation(side))) for side in ("chosen", "rejected")}
            pair_length = max(len(item) for item in encoded.values()) if method == "authors_loop" else None
            for side, sink in (("chosen", rewards_chosen), ("rejected", rewards_rejected)):
                rewards, *_ = rm.forward_encoded([encoded[side]], pad_to=pair_length)
                sink.append(float(rewards[0]))
        chosen, rejected = np.array(rewards_chosen), np.array(rewards_rejected)
    else:
        scores = rm.score_pairs(dataset.pairs, batch_size=batch_size, progress=False)
        chosen, rejected = scores.reward_chosen, scores.reward_rejected
    seconds = time.perf_counter() - start

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(out_path, "w") as handle:
        json.dump(
            {
                "seconds": seconds,
                "pairs": len(dataset),
                "peak_mib": peak_mib,
                "threads": torch.get_num_threads(),
                "chosen": chosen.tolist(),
                "rejected": rejected.tolist(),
            },
            handle,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256, help="HH pairs to score (default 256)")
    parser.add_argument("--max-length", type=int, default=256, help="token budget per text (default 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per batch for batched methods")
    parser.add_argument("--method", choices=sorted(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.method:
        run_method(args.method, args.pairs, args.max_length, args.batch_size, args.result)
        return

    results = {}
    for method in METHODS:
        with tempfile.NamedTemporaryFile(suffix=".json") as handle:
            command = [
                sys.executable, __file__, "--method", method, "--result", handle.name,
                "--pairs", str(args.pairs), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
            ]
            subprocess.run(command, check=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
            with open(handle.name) as result_file:
                results[method] = json.load(result_file)

    base = results["authors_loop"]
    print(f"HH-RLHF harmless-base test, {base['pairs']} pairs, MiniLM-L6 with a fresh head, "
          f"max length {args.max_length}, batch size {args.batch_size}, {base['threads']} threads")
    print(f"{'method':<16} {'pairs/s':>8} {'speed-up':>9} {'peak MiB':>9}  description")
    for method, description in METHODS.items():
        result = results[method]
        rate = result["pairs"] / result["seconds"]
        speedup = base["seconds"] / result["seconds"]
        print(f"{method:<16} {rate:8.1f} {speedup:8.2f}x {result['peak_mib']:9.0f}  {description}")

    reference = results["batched_fp32"]
    reference_rewards = np.array(reference["chosen"] + reference["rejected"])
    reference_gap = np.array(reference["chosen"]) - np.array(reference["rejected"])
    for method in ("authors_loop", "batched_bf16"):
        rewards = np.array(results[method]["chosen"] + results[method]["rejected"])
        gap = np.array(results[method]["chosen"]) - np.array(results[method]["rejected"])
        max_error = np.abs(rewards - reference_rewards).max()
        agree = np.sign(gap) == np.sign(reference_gap)
        # Pairs whose float32 gap is far above the rounding error must keep their ordering.
        clear = np.abs(reference_gap) > 2 * max_error
        print(
            f"{method} vs batched_fp32: max |reward difference| {max_error:.2e} "
            f"(reward std {reference_rewards.std():.2e}); pair orderings agree on {agree.mean():.2%} of pairs, "
            f"on {agree[clear].mean() if clear.any() else float('nan'):.2%} of the {int(clear.sum())} pairs "
            f"whose |gap| exceeds twice that difference"
        )


if __name__ == "__main__":
    main()
