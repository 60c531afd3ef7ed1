"""Benchmark: steered scoring (SAE Feature Steering, Raw Feature Steering) against unsteered scoring.

Scores HH-RLHF harmless-base test pairs with the MiniLM encoder and a fresh reward head, with a
randomly initialised Gated SAE of width 1536 on block 2 (the figures measure throughput, not what
the steering does). Steering needs full forwards: a partial forward from block L would need every
token's block-L input, and the activation cache keeps pooled vectors only. Prints pairs per second
for each way of scoring and its time relative to unsteered batched scoring. The "pairwise" way
scores each pair as its own batch of two, as the authors' steering scripts do.

Usage: python benchmarks/bench_steering.py [--pairs 128] [--max-length 128] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=128, help="HH pairs to score (default 128)")
    parser.add_argument("--max-length", type=int, default=128, help="token budget per text (default 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch (default 32)")
    parser.add_argument("--layer", type=int, default=2, help="block to steer (default 2)")
    args = parser.parse_args()

    from sae_lens import GatedSAE, GatedSAEConfig

    from rmsae.data import load_hh_rlhf
    from rmsae.mitigation import RawFeatureSteering, SAEFeatureSteering, steer
    from rmsae.reward_model import load_reward_model
    from rmsae.sae import load_sae

    pairs = load_hh_rlhf(limit=args.pairs).pairs
    rm = load_reward_model("all-minilm-l6-v2", allow_fresh_head=True, max_length=args.max_length)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        GatedSAE(GatedSAEConfig(d_in=rm.hidden_size, d_sae=4 * rm.hidden_size)).save_model(Path(folder) / "sae")
        sae = load_sae(Path(folder) / "sae", layer=args.layer, d_model=rm.hidden_size)
    latents = torch.arange(200)
    ways = {
        "unsteered": (None, args.batch_size),
        "sae_fs_replace": (SAEFeatureSteering(sae, latents, -0.001, "replace"), args.batch_size),
        "sae_fs_error_preserving": (SAEFeatureSteering(sae, latents, -0.001, "error_preserving"), args.batch_size),
        "raw_fs": (RawFeatureSteering(torch.randn(rm.hidden_size), args.layer, 5.0), args.batch_size),
        "sae_fs_replace_pairwise": (SAEFeatureSteering(sae, latents, -0.001, "replace"), 2),
    }
    rm.score_pairs(pairs[:4], batch_size=4, progress=False)  # warm-up
    seconds = {}
    for name, (intervention, batch_size) in ways.items():
        start = time.perf_counter()
        if intervention is None:
            rm.score_pairs(pairs, batch_size=batch_size, progress=False)
        elif batch_size == 2:
            with steer(rm, intervention):
                for pair in pairs:
                    rm.score_pairs([pair], batch_size=2, progress=False)
        else:
            with steer(rm, intervention):
                rm.score_pairs(pairs, batch_size=batch_size, progress=False)
        seconds[name] = time.perf_counter() - start

    print(f"HH-RLHF harmless-base test, {len(pairs)} pairs, MiniLM-L6 with a fresh head, max length {args.max_length}, "
          f"SAE width {sae.d_sae} on block {args.layer}, {torch.get_num_threads()} threads")
    print(f"{'scoring':<26} {'pairs/s':>8} {'time vs unsteered':>18}")
    for name, value in seconds.items():
        print(f"{name:<26} {len(pairs) / value:8.1f} {value / seconds['unsteered']:17.2f}x")


if __name__ == "__main__":
    main()
