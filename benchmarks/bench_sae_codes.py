"""Benchmark: SAE encoding throughput and the size of cached pooled SAE codes, dense against sparse.

Runs the demo reward model ``demo-minilm-hh`` (build it first with ``rmsae demo build``) on HH-RLHF
texts with its SAE at one demo layer. It prints tokens per second of the forward pass with and
without SAE encoding and pooling, and the bytes the activation cache holds for the pooled codes
(stored sparse where smaller) against what dense float32 vectors would take.

Usage: python benchmarks/bench_sae_codes.py [--pairs 128] [--layer 2] [--model demo-minilm-hh]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=128, help="HH pairs whose texts are encoded (default 128)")
    parser.add_argument("--layer", type=int, default=2, help="demo layer of the SAE (default 2)")
    parser.add_argument("--model", default="demo-minilm-hh", help="demo model tag (default demo-minilm-hh)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    args = parser.parse_args()

    from rmsae.cache import ActivationCache
    from rmsae.data import load_hh_rlhf
    from rmsae.registry import demo_dir
    from rmsae.reward_model import load_reward_model
    from rmsae.sae import load_sae

    pairs = load_hh_rlhf(limit=args.pairs).pairs
    conversations = [p.conversation(side) for p in pairs for side in ("chosen", "rejected")]
    rm = load_reward_model(args.model)
    sae = load_sae(demo_dir() / "saes" / f"{args.model}_layer{args.layer}", layer=args.layer, d_model=rm.hidden_size)
    n_tokens = sum(len(rm.encode(rm.render(c))) for c in conversations)
    rm.score_conversations(conversations[:8], saes=[sae], progress=False)  # warm-up

    timings = {}
    for label, saes in (("forward only", []), ("forward + SAE codes", [sae])):
        start = time.perf_counter()
        result = rm.score_conversations(conversations, saes=saes, batch_size=args.batch_size, progress=False)
        timings[label] = time.perf_counter() - start

    codes = result.codes(sae)
    with tempfile.TemporaryDirectory() as cache_dir:
        with ActivationCache(rm.cache_namespace(), cache_dir) as cache:
            rm.score_conversations(conversations, saes=[sae], batch_size=args.batch_size, cache=cache, progress=False)
            sizes = cache.size_report()

    print(f"{args.model}, SAE layer {args.layer} (d_sae {sae.d_sae}), {len(conversations)} texts, {n_tokens} tokens, "
          f"batch size {args.batch_size}, autocast {rm.autocast_dtype}")
    for label, seconds in timings.items():
        print(f"{label:<22} {n_tokens / seconds:9.0f} tokens/s  ({seconds:.2f} s)")
    print(f"SAE encoding and pooling cost: {timings['forward + SAE codes'] / timings['forward only']:.2f}x the plain forward")
    nonzero = (codes > 0).sum(axis=1)
    print(f"pooled codes: {np.mean(nonzero):.0f} nonzero latents per text on average (of {sae.d_sae})")
    dense, stored = sizes["sae_code_bytes_dense"], sizes["sae_code_bytes"]
    print(f"cached codes: {stored / 1024:.0f} KiB stored against {dense / 1024:.0f} KiB dense ({dense / stored:.2f}x smaller)")


if __name__ == "__main__":
    main()
