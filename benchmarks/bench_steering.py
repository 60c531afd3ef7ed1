"""Benchmark: steered scoring (SAE Feature Steering, Raw Feature Steering), full forwards against partial ones.

Scores HH-RLHF harmless-base test pairs with the MiniLM encoder and a fresh reward head, with a
randomly initialised Gated SAE of width 1536 (the figures measure throughput, not what the steering
does). Full forwards run all six blocks per steered scoring; partial forwards replay block L's
stored per-token output and run blocks L + 1 onward only. Prints pairs per second for each way of
scoring, its time relative to unsteered batched scoring, and the partial forward's speed-up over
the full one at each layer, with the one-off cost of storing block L's outputs. The "pairwise" way
scores each pair as its own batch of two, as the authors' steering scripts do.

Usage: python benchmarks/bench_steering.py [--pairs 128] [--max-length 128] [--batch-size 32] [--layers 1 4]
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
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4], help="blocks to steer (default 1 4)")
    args = parser.parse_args()

    from sae_lens import GatedSAE, GatedSAEConfig

    from rmsae.data import load_hh_rlhf
    from rmsae.mitigation import RawFeatureSteering, SAEFeatureSteering, steer
    from rmsae.partial_forward import capture_block_outputs, rewards_from_block_outputs
    from rmsae.reward_model import load_reward_model
    from rmsae.sae import load_sae

    pairs = load_hh_rlhf(limit=args.pairs).pairs
    texts = [pair.conversation("chosen") for pair in pairs] + [pair.conversation("rejected") for pair in pairs]
    rm = load_reward_model("all-minilm-l6-v2", allow_fresh_head=True, max_length=args.max_length)
    rm.score_pairs(pairs[:4], batch_size=4, progress=False)  # warm-up

    def timed(function) -> float:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    unsteered = timed(lambda: rm.score_pairs(pairs, batch_size=args.batch_size, progress=False))
    print(f"HH-RLHF harmless-base test, {len(pairs)} pairs, MiniLM-L6 ({rm.num_layers} blocks) with a fresh head, "
          f"max length {args.max_length}, batch size {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"unsteered: {len(pairs) / unsteered:.1f} pairs/s")
    print(f"{'layer':>5} {'scoring':<26} {'full pairs/s':>12} {'vs unsteered':>12} {'partial pairs/s':>15} {'speed-up':>8}")
    for layer in args.layers:
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            GatedSAE(GatedSAEConfig(d_in=rm.hidden_size, d_sae=4 * rm.hidden_size)).save_model(Path(folder) / "sae")
            sae = load_sae(Path(folder) / "sae", layer=layer, d_model=rm.hidden_size)
        latents = torch.arange(200)
        ways = {
            "sae_fs_replace": SAEFeatureSteering(sae, latents, -0.001, "replace"),
            "sae_fs_error_preserving": SAEFeatureSteering(sae, latents, -0.001, "error_preserving"),
            "raw_fs": RawFeatureSteering(torch.randn(rm.hidden_size), layer, 5.0),
        }
        outputs = {}
        capture = timed(lambda: outputs.setdefault("stored", capture_block_outputs(rm, texts, layer, batch_size=args.batch_size, progress=False)))
        print(f"{layer:>5} {'store block outputs':<26} {len(pairs) / capture:12.1f} {capture / unsteered:11.2f}x "
              f"{'':>15} {'':>8}  ({outputs['stored'].nbytes / 2**20:.0f} MB)")
        for name, intervention in ways.items():
            with steer(rm, intervention):
                full = timed(lambda: rm.score_pairs(pairs, batch_size=args.batch_size, progress=False))
                partial = timed(lambda: rewards_from_block_outputs(rm, outputs["stored"]))
            print(f"{layer:>5} {name:<26} {len(pairs) / full:12.1f} {full / unsteered:11.2f}x {len(pairs) / partial:15.1f} {full / partial:7.2f}x")
        with steer(rm, ways["sae_fs_replace"]):
            pairwise = timed(lambda: [rm.score_pairs([pair], batch_size=2, progress=False) for pair in pairs])
        print(f"{layer:>5} {'sae_fs_replace_pairwise':<26} {len(pairs) / pairwise:12.1f} {pairwise / unsteered:11.2f}x")


if __name__ == "__main__":
    main()
