"""Benchmark: Bradley-Terry training steps of the demo RM, by allocator and precision.

Trains the MiniLM encoder with a fresh reward head on HH-RLHF harmless-base test pairs with the demo's
recipe (length-grouped batches of 16, max length 256, AdamW) and times whole steps. Each variant
runs in its own subprocess: glibc's malloc or tcmalloc (preloaded through LD_PRELOAD), bfloat16
autocast or float32. Prints seconds per step, user and system CPU time, peak resident memory, and
the speed-up over glibc with bfloat16 (the setting without `make`).

Watch the system time. With glibc, each batch's large tensors go back to the kernel when freed, and
the next batch faults them in again as zeroed pages. tcmalloc keeps them for reuse.

Usage: python benchmarks/bench_rm_training.py [--pairs 384] [--max-length 256] [--tcmalloc PATH]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "glibc_bf16": ("glibc malloc, bfloat16 autocast", False, True),
    "tcmalloc_bf16": ("tcmalloc, bfloat16 autocast (make's default where tcmalloc is installed)", True, True),
    "glibc_fp32": ("glibc malloc, float32", False, False),
}
TCMALLOC_GLOBS = (
    "/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)
WARMUP_PAIRS = 32


def run_variant(bf16: bool, pairs: int, max_length: int, out_path: str) -> None:
    from rmsae.data import load_hh_rlhf
    from rmsae.reward_model import load_reward_model
    from rmsae.rm_training import RMTrainingConfig, train_bradley_terry

    dataset = load_hh_rlhf(limit=pairs + WARMUP_PAIRS)
    timed_pairs = dataset.pairs[WARMUP_PAIRS:]
    if not timed_pairs:
        raise SystemExit(
            f"The HH-RLHF data gave only {len(dataset.pairs)} pairs, and the benchmark needs more than the "
            f"{WARMUP_PAIRS} warm-up pairs. Check RMSAE_DATA_DIR."
        )
    rm = load_reward_model("all-minilm-l6-v2", allow_fresh_head=True, max_length=max_length)
    config = RMTrainingConfig(epochs=1, bf16_autocast=bf16)
    # Warm-up steps, so that one-time costs (kernel selection, first allocations) do not count.
    train_bradley_terry(rm, dataset.pairs[:WARMUP_PAIRS], config, progress=False)

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    train_bradley_terry(rm, timed_pairs, config, progress=False)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    steps = -(-len(timed_pairs) // config.batch_size)
    with open(out_path, "w") as handle:
        json.dump(
            {
                "seconds_per_step": seconds / steps,
                "steps": steps,
                "user_seconds": after.ru_utime - before.ru_utime,
                "system_seconds": after.ru_stime - before.ru_stime,
                "page_faults": after.ru_minflt - before.ru_minflt,
                "peak_rss_mb": after.ru_maxrss / 1024,
            },
            handle,
        )


def find_tcmalloc() -> str | None:
    for pattern in TCMALLOC_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def variant_env(tcmalloc: str | None) -> dict[str, str]:
    """Return the current environment with tcmalloc removed from LD_PRELOAD, or put first in it."""
    env = dict(os.environ)
    # ld.so separates LD_PRELOAD entries by spaces or colons.
    entries = [entry for entry in re.split(r"[:\s]+", env.get("LD_PRELOAD", "")) if entry]
    preloads = [entry for entry in entries if "tcmalloc" not in os.path.basename(entry)]
    if tcmalloc:
        preloads.insert(0, tcmalloc)
        env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    if preloads:
        env["LD_PRELOAD"] = " ".join(preloads)
    else:
        env.pop("LD_PRELOAD", None)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=384, help="timed training pairs (default 384, 24 steps)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--tcmalloc", help="path of libtcmalloc_minimal.so.4 (default: searched under /usr/lib and /usr/lib64)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1, got {args.pairs}.")
    if args.max_length < 16:
        parser.error(f"--max-length must be at least 16 tokens, got {args.max_length}.")
    if args.variant:
        run_variant(VARIANTS[args.variant][2], args.pairs, args.max_length, args.out)
        return

    if args.tcmalloc and not os.path.isfile(args.tcmalloc):
        parser.error(f"--tcmalloc {args.tcmalloc!r} is not a file; give the path of libtcmalloc_minimal.so.4.")
    tcmalloc = args.tcmalloc or find_tcmalloc()
    print(f"MiniLM reward model, {args.pairs} training pairs after {WARMUP_PAIRS} warm-up pairs, max length {args.max_length}, "
          f"{os.cpu_count()} CPU(s)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (description, uses_tcmalloc, _) in VARIANTS.items():
            if uses_tcmalloc and not tcmalloc:
                print(f"{name}: skipped, no libtcmalloc_minimal.so.4 found "
                      "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4; or pass --tcmalloc PATH)")
                continue
            out = os.path.join(tmp, f"{name}.json")
            command = [sys.executable, __file__, "--variant", name, "--out", out,
                       "--pairs", str(args.pairs), "--max-length", str(args.max_length)]
            subprocess.run(command, check=True, env=variant_env(tcmalloc if uses_tcmalloc else None))
            with open(out) as handle:
                results[name] = json.load(handle)
            print(f"  done: {description}", flush=True)

    reference = results["glibc_bf16"]["seconds_per_step"]
    print(f"{'variant':<15}{'s/step':>8}{'user s':>9}{'sys s':>8}{'page faults':>13}{'peak MB':>9}{'speed-up':>10}")
    for name, row in results.items():
        print(f"{name:<15}{row['seconds_per_step']:>8.2f}{row['user_seconds']:>9.1f}{row['system_seconds']:>8.1f}"
              f"{row['page_faults']:>13,}{row['peak_rss_mb']:>9.0f}{reference / row['seconds_per_step']:>9.2f}x")


if __name__ == "__main__":
    main()
