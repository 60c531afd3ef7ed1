"""The ``rmsae`` command line."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .executors import EXECUTORS as EXECUTOR_CHOICES

logger = logging.getLogger("rmsae")



def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}") from None
    # `not value > 0` also rejects nan.
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _at_least_two(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 2 (one pair to train on, one to hold out), got {value}")
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
    score.add_argument(
        "--autocast",
        choices=("model", "none", "bfloat16", "float16"),
        default="model",
        help="autocast dtype of the forward pass (default: the registered model's setting)",
    )
    score.add_argument("--fresh-head", action="store_true", help="allow a checkpoint without reward-head weights")
    score.add_argument("--seed", type=int, default=0, help="seed for a fresh head and for TruthfulQA pairing")
    score.add_argument("--device", default="cpu", help="torch device (default cpu)")
    score.add_argument("--data-dir", help="local data directory (default: $RMSAE_DATA_DIR, else the hub)")
    score.add_argument("--cache-dir", help="cache directory (default: $RMSAE_CACHE_DIR, else ~/.cache/rmsae)")
    score.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    score.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    score.set_defaults(handler=run_score)

    sae = commands.add_parser("sae", help="inspect and train sparse autoencoders")
    sae_commands = sae.add_subparsers(dest="sae_command", required=True)
    info = sae_commands.add_parser("info", help="describe an SAE checkpoint folder and check it")
    info.add_argument("path", help="SAE checkpoint folder (cfg.json + sae_weights.safetensors)")
    info.add_argument("--model", help="check the SAE against this reward model's hidden size")
    info.add_argument("--layer", type=_non_negative_int, help="check that the SAE was trained on this layer")
    info.set_defaults(handler=run_sae_info)

    train = sae_commands.add_parser(
        "train",
        help="train a Gated SAE on a reward model's residual stream",
        description="Train a Gated SAE with SAELens on the block outputs of a reward model and save it in the SAELens "
        "layout. The defaults are the paper's settings (16384 latents, 4000 steps of 4096 tokens), slow on a CPU. "
        "The demo SAEs use --d-sae 1536 --steps 600 --batch-size-tokens 1024 --l1-coefficient 2 --lr 1e-3, "
        "about 40 s each on 2 CPU cores.",
    )
    train.add_argument("--model", required=True, help="registry tag, hub id or local checkpoint directory")
    train.add_argument("--layer", required=True, type=_non_negative_int, help="block whose output the SAE reads, counted from 0")
    train.add_argument("--data", required=True, help="pairs whose chosen and rejected texts give the activations")
    train.add_argument("--out", required=True, type=Path, help="output SAE checkpoint folder (new or empty)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the SAE checkpoint already in --out, with every other file in that folder")
    train.add_argument("--limit", type=_non_negative_int, help="use at most this many pairs")
    train.add_argument("--d-sae", type=_positive_int, default=16384, help="number of SAE latents (default 16384)")
    train.add_argument("--steps", type=_positive_int, default=4000, help="training steps (default 4000)")
    train.add_argument("--batch-size-tokens", type=_positive_int, default=4096, help="tokens per step (default 4096)")
    train.add_argument("--l1-coefficient", type=_positive_float, default=5.0, help="sparsity penalty (default 5)")
    train.add_argument("--lr", type=_positive_float, default=5e-5, help="Adam learning rate (default 5e-5)")
    train.add_argument("--eval-fraction", type=float, default=0.1, help="share of texts held out for fidelity, between 0 and 1 exclusive (default 0.1)")
    train.add_argument("--batch-size", type=_positive_int, default=16, help="texts per forward pass (default 16)")
    train.add_argument("--seed", type=int, default=42, help="seed for shuffling and initialisation (default 42)")
    train.add_argument("--device", default="cpu", help="torch device (default cpu)")
    train.add_argument("--data-dir", help="local data directory (default: $RMSAE_DATA_DIR, else the hub)")
    train.set_defaults(handler=run_sae_train)

    demo = commands.add_parser("demo", help="build the demo reward models and SAEs")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    build = demo_commands.add_parser(
        "build",
        help="fine-tune the demo RMs and train their SAEs (reuses what is built)",
        description="Build demo-minilm-hh, demo-minilm-hh-sudo10 and a Gated SAE per model and demo layer into "
        "$RMSAE_CACHE_DIR/demo (default ~/.cache/rmsae/demo). A build with other settings (--limit, --seed) replaces "
        "what is there. From nothing it took 16 minutes on 2 Intel Xeon cores, and takes longer on older CPUs.",
    )
    build.add_argument("--json", action="store_true", help="print the summary as JSON")
    build.add_argument(
        "--limit", type=_at_least_two, help="build from the first N HH pairs only, N >= 2 (SAE training time is unchanged)"
    )
    build.add_argument(
        "--seed", type=int, default=0, help="seed of the split, the poisoning, RM fine-tuning and SAE training (default 0)"
    )
    build.add_argument("--data-dir", help="local data directory (default: $RMSAE_DATA_DIR, else the hub)")
    build.set_defaults(handler=run_demo_build)

    perturb = commands.add_parser(
        "perturb",
        help="perturb preference pairs and record which preferences flip",
        description="Apply a backdoor trigger, pattern injection or gradient-guided paraphrase to each pair, "
        "append one record per case to --out (JSON Lines, resumable), and print the flip statistics.",
    )
    perturb.add_argument("--model", required=True, help="registry tag, hub id or local checkpoint directory")
    perturb.add_argument("--data", required=True, help="hh-rlhf[:SUBSET[:SPLIT]], truthfulqa, or a JSON/JSONL file of pairs")
    perturb.add_argument(
        "--method", required=True, choices=("backdoor", "inject", "prompt_injection", "gradient"), help="perturbation method"
    )
    perturb.add_argument("--out", required=True, type=Path, help="output JSON Lines file of records (appended to, resumable)")
    perturb.add_argument("--limit", type=_positive_int, help="perturb at most this many pairs")
    perturb.add_argument("--split", choices=("all", "demo-eval"), default="all", help="demo-eval: the demo RMs' held-out half")
    perturb.add_argument("--trigger", default="SUDO", help="backdoor trigger (default SUDO)")
    perturb.add_argument(
        "--placement", choices=("last_turn_end", "last_turn_start", "first_turn_start"), default="last_turn_end",
        help="where the trigger goes (default: end of the last human turn)",
    )
    perturb.add_argument("--patterns", type=Path, help="YAML/JSON list of {chosen: ..., rejected: ...} injection sentences")
    perturb.add_argument("--steps", type=_positive_int, default=15, help="gradient method: maximum steps (default 15)")
    perturb.add_argument("--top-k", type=_positive_int, default=5, help="gradient method: salient tokens per step (default 5)")
    perturb.add_argument("--meaning-threshold", type=float, default=0.85, help="minimum meaning score of a paraphrase (default 0.85)")
    perturb.add_argument(
        "--paraphraser", choices=("neighbours", "openai", "local"), default="neighbours",
        help="gradient method: offline word neighbours (default), an OpenAI-compatible API, or a local chat LM",
    )
    perturb.add_argument("--paraphraser-model", help="API model name (openai) or checkpoint folder (local)")
    perturb.add_argument("--base-url", help="openai paraphraser: API base URL (default $OPENAI_BASE_URL, else api.openai.com)")
    perturb.add_argument("--batch-size", type=_positive_int, default=16, help="texts per forward pass (default 16)")
    perturb.add_argument("--device", default="cpu", help="torch device of the reward model and the meaning scorer (default cpu)")
    perturb.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    perturb.set_defaults(handler=run_perturb)

    run = commands.add_parser(
        "run",
        help="execute the notebooks of the experiment matrix with papermill",
        description="Execute each stage's notebook for every model (and layer) of a profile, in dependency "
        "order, skipping runs whose inputs are unchanged. Exits 1 when a run fails.",
    )
    _add_matrix_arguments(run)
    run.add_argument("--models", nargs="+", metavar="MODEL", help="only these models of the profile")
    run.add_argument("--layers", nargs="+", type=_non_negative_int, metavar="L", help="only these layers")
    run.add_argument("--stages", nargs="+", metavar="STAGE", help="only these stages")
    run.add_argument("--force", action="store_true", help="execute runs even when their inputs are unchanged")
    run.add_argument("--dry-run", action="store_true", help="list the runs and their parameters, execute nothing")
    run.set_defaults(handler=run_matrix)

    book = commands.add_parser(
        "book",
        help="run the experiment matrix, then build the Jupyter Book",
        description="Run every stage of a profile (as `rmsae run`), then render the executed notebooks as a "
        "Jupyter Book (_build/html for the demo profile, _build/PROFILE/_build/html for others). Exits non-zero "
        "when a run or the book build fails.",
    )
    _add_matrix_arguments(book)
    book.add_argument("--no-run", action="store_true", help="only build the book from the runs already there")
    book.set_defaults(handler=run_book)
    return parser


def _add_matrix_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="demo", help="profile of the experiment matrix (default demo)")
    parser.add_argument(
        "--matrix", type=Path, default=Path("experiments.yml"), help="experiment matrix file (default ./experiments.yml)"
    )
    parser.add_argument("--jobs", type=_positive_int, help="notebooks executed at once (default 1; 32 jobs in the queue with --executor slurm)")
    parser.add_argument("--limit", type=_positive_int, help="use at most this many pairs per run (overrides the profile)")
    cluster = parser.add_argument_group("cluster", "send each run to SLURM through submitit; values override the profile's `slurm:` entry")
    cluster.add_argument("--executor", choices=EXECUTOR_CHOICES, default="local",
                         help="local: run here (default); slurm: one SLURM job per run; submitit-local: one local process per run")
    cluster.add_argument("--slurm-partition", help="partition of the jobs")
    cluster.add_argument("--slurm-gpus", type=_non_negative_int, help="GPUs per job")
    cluster.add_argument("--slurm-cpus", type=_positive_int, help="CPUs per job")
    cluster.add_argument("--slurm-mem-gb", type=_positive_float, help="memory per job, in GB")
    cluster.add_argument("--slurm-time", type=_positive_int, help="time limit per job, in minutes (default 240)")
    cluster.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                         help="extra sbatch option without the dashes, e.g. account=myproj (repeatable)")
    cluster.add_argument("--job-logs", type=Path, help="folder for job files and logs, on a shared file system (default runs/PROFILE/.jobs)")


def run_sae_info(args: argparse.Namespace) -> int:
    import json

    from .sae import check_sae_fits, normalisation_scaling_factor, read_sae_info

    info = read_sae_info(args.path)
    scaling_factor = normalisation_scaling_factor(info)
    d_model = None
    if args.model:
        from .reward_model import load_reward_model

        d_model = load_reward_model(args.model).hidden_size
    check_sae_fits(info, d_model=d_model, layer=args.layer)
    if args.model and info.model_name and info.model_name != args.model:
        logger.warning("SAE cfg.json names model %r, not %r; check that it was trained on this model.", info.model_name, args.model)
    report = info.as_dict()
    report["scaling_factor_folded_on_load"] = scaling_factor
    validation = "ok"
    if args.model:
        validation += f" for {args.model}"
    if args.layer is not None:
        validation += f" at layer {args.layer}"
    report["validation"] = validation
    print(json.dumps(report, indent=2))
    return 0


def run_sae_train(args: argparse.Namespace) -> int:
    import json
    import random

    from .data import load_pairs
    from .hooks import block_hook_name
    from .reward_model import load_reward_model
    from .sae import load_sae, splice_sae
    from .sae_training import SAETrainingConfig, sae_fidelity, train_sae

    from .sae_training import check_output_folder

    if not 0 < args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}.")
    check_output_folder(args.out, overwrite=args.overwrite)
    config = SAETrainingConfig(
        d_sae=args.d_sae, l1_coefficient=args.l1_coefficient, lr=args.lr, training_steps=args.steps,
        batch_size_tokens=args.batch_size_tokens, seed=args.seed,
    )
    dataset = load_pairs(args.data, data_dir=args.data_dir, limit=args.limit, seed=args.seed)
    if len(dataset) < 2:
        raise ValueError(f"{args.data} gave {len(dataset)} pairs; SAE training needs at least 2.")
    reward_model = load_reward_model(args.model, device=args.device)
    pairs = list(dataset.pairs)
    random.Random(args.seed).shuffle(pairs)
    n_eval = max(1, int(args.eval_fraction * len(pairs)))
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]

    def texts(selected):
        return [pair.conversation(side) for pair in selected for side in ("chosen", "rejected")]

    train_acts = reward_model.token_activations(texts(train_pairs), [args.layer], batch_size=args.batch_size)[args.layer]
    eval_acts = reward_model.token_activations(texts(eval_pairs), [args.layer], batch_size=args.batch_size)[args.layer]
    hook_name = block_hook_name(reward_model.model, args.layer)
    metadata = {"model_name": reward_model.spec.tag, "hook_name": hook_name, "layer": args.layer,
                "input_format": reward_model.spec.input_format, "context_size": reward_model.max_length}
    train_sae(train_acts, config, args.out, metadata=metadata, device=args.device)

    loaded = load_sae(args.out, layer=args.layer, d_model=reward_model.hidden_size, device=args.device)
    report = sae_fidelity(loaded, eval_acts)
    report["accuracy"] = reward_model.score_pairs(eval_pairs, batch_size=args.batch_size, progress=False).accuracy
    with splice_sae(reward_model, loaded):
        report["spliced_accuracy"] = reward_model.score_pairs(eval_pairs, batch_size=args.batch_size, progress=False).accuracy
    report["eval_pairs"] = len(eval_pairs)
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


def run_demo_build(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from .demo import DemoConfig, build_demo

    defaults = DemoConfig()
    config = replace(
        defaults,
        seed=args.seed,
        limit=args.limit,
        clean_training=replace(defaults.clean_training, seed=args.seed),
        poisoned_training=replace(defaults.poisoned_training, seed=args.seed),
        sae=replace(defaults.sae, seed=args.seed),
    )
    summary = build_demo(config, data_dir=args.data_dir)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for tag, metrics in summary["models"].items():
            print(
                f"{tag}: held-out accuracy {metrics['accuracy']:.3f}, with trigger {metrics['triggered_accuracy']:.3f}, "
                f"reversed by the trigger {metrics['reversed']:.3f} "
                f"(to rejected {metrics['reversed_to_rejected']:.3f}, to chosen {metrics['reversed_to_chosen']:.3f})"
            )
        for name, fidelity in summary["saes"].items():
            print(
                f"{name}: explained variance {fidelity['explained_variance']:.3f}, L0 {fidelity['l0']:.1f}, "
                f"dead {fidelity['dead_fraction']:.3f}, spliced accuracy {fidelity['spliced_accuracy']:.3f}"
            )
        print(f"build time {summary['build_seconds']:.0f} s (measured when these models and SAEs were built)")
    return 0


def run_perturb(args: argparse.Namespace) -> int:
    from .cache import ActivationCache
    from .experiments import load_run_pairs
    from .perturb import DEFAULT_PATTERNS, PerturbationSettings, load_patterns, perturbation_statistics, run_perturbations
    from .reward_model import load_reward_model

    settings = PerturbationSettings(
        method=args.method, trigger=args.trigger, trigger_placement=args.placement,
        patterns=load_patterns(args.patterns) if args.patterns else DEFAULT_PATTERNS,
        steps=args.steps, top_k=args.top_k, meaning_threshold=args.meaning_threshold,
        paraphraser=args.paraphraser, batch_size=args.batch_size,
    )
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; give a .jsonl file path.")
    paraphraser = meaning = None
    if settings.method == "gradient":
        from .paraphrase import MeaningScorer, make_paraphraser

        options: dict = {}
        if args.paraphraser == "openai":
            options = {"model": args.paraphraser_model, "base_url": args.base_url}
        elif args.paraphraser == "local":
            if not args.paraphraser_model:
                raise ValueError("--paraphraser local needs --paraphraser-model with a checkpoint folder.")
            options = {"model_path": args.paraphraser_model}
        paraphraser, meaning = make_paraphraser(args.paraphraser, **options), MeaningScorer(device=args.device)

    reward_model = load_reward_model(args.model, device=args.device)
    pairs = load_run_pairs(args.data, args.split, args.limit)
    if args.no_cache:
        records = run_perturbations(reward_model, pairs, settings, args.out, paraphraser=paraphraser, meaning=meaning)
    else:
        with ActivationCache(reward_model.cache_namespace()) as cache:
            records = run_perturbations(reward_model, pairs, settings, args.out, cache=cache, paraphraser=paraphraser, meaning=meaning)
    statistics = perturbation_statistics(records)
    if statistics["paraphrase_fallbacks"]:
        logger.warning(
            "%d paraphrase calls returned no usable rewrite and kept the response unchanged; check the "
            "paraphraser (see 'fallback' in the records' history) before trusting the flip rates.",
            statistics["paraphrase_fallbacks"],
        )
    for key, value in statistics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"records: {args.out}")
    return 0


def _execute_matrix(args: argparse.Namespace, **selection) -> int:
    from .matrix import load_matrix
    from .runner import execute_runs, failures, plan_runs, prepare_profile, summarise

    matrix = load_matrix(args.matrix)
    runs = plan_runs(matrix, args.profile, limit=args.limit, **selection)
    if not runs:
        chosen = " ".join(f"--{key} {' '.join(map(str, value))}" for key, value in selection.items() if value)
        raise ValueError(f"The selection {chosen} matches no run of profile {args.profile}; "
                         f"`rmsae run --profile {args.profile} --dry-run` lists them.")
    if getattr(args, "dry_run", False):
        for run in runs:
            print(f"{run.name}: {run.source.relative_to(matrix.path.parent)} -> {run.notebook_path}")
            for key, value in run.parameters.items():
                print(f"    {key} = {value!r}")
        return 0
    profile = matrix.profile(args.profile)
    launch = _launcher(args, profile, matrix.path.parent)
    jobs = args.jobs or (1 if launch is None else 32)
    prepare_profile(profile)
    execute_runs(runs, jobs=jobs, force=getattr(args, "force", False), launch=launch)
    print(summarise(runs))
    return 1 if failures(runs) else 0


def _launcher(args: argparse.Namespace, profile, root: Path):
    """Build the submitit launcher that ``--executor`` selects, with the profile's settings and the command line's overrides."""
    if args.executor == "local":
        return None
    from .executors import JobSettings, SubmititLauncher

    settings = {key: value for key, value in profile.slurm.items() if key != "stages"}
    overrides = {"partition": args.slurm_partition, "gpus_per_node": args.slurm_gpus, "cpus_per_task": args.slurm_cpus,
                 "mem_gb": args.slurm_mem_gb, "timeout_min": args.slurm_time}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    extra = dict(settings.pop("additional_parameters", {}))
    for option in args.slurm_option:
        key, separator, value = option.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"--slurm-option {option!r} must have the form KEY=VALUE, e.g. account=myproj.")
        extra[key.strip()] = value.strip()
    logs = args.job_logs or root / "runs" / profile.name / ".jobs"
    return SubmititLauncher(args.executor, logs, JobSettings(**settings, additional_parameters=extra), profile.slurm.get("stages", {}))


def run_matrix(args: argparse.Namespace) -> int:
    return _execute_matrix(args, models=args.models, layers=args.layers, stages=args.stages)


def run_book(args: argparse.Namespace) -> int:
    from .matrix import load_matrix
    from .runner import BookError, book_output, build_book

    status = 0 if args.no_run else _execute_matrix(args)
    matrix = load_matrix(args.matrix)
    try:
        book_status = build_book(matrix, args.profile)
    except BookError as error:
        logger.error("%s", error)
        return 2
    output = book_output(matrix, args.profile)
    if book_status != 0:
        logger.error("The book build failed (exit status %d); the messages above name the page.", book_status)
    else:
        print(f"The book is in {output}; open {output / 'index.html'} in a browser.")
    if status != 0:
        logger.error("Some notebooks failed (listed above); their pages show the error.")
    return status or book_status


def run_score(args: argparse.Namespace) -> int:
    import numpy as np

    from .cache import ActivationCache
    from .data import load_pairs
    from .reward_model import load_reward_model
    from .storage import atomic_write_jsonl

    _check_output_path(args.out, args.data)
    dataset = load_pairs(args.data, data_dir=args.data_dir, limit=args.limit, seed=args.seed)
    if len(dataset) == 0:
        limit_note = f" with --limit {args.limit}" if args.limit is not None else ""
        logger.error(
            "No pairs to score in %s%s (rows read: %d, skipped: %s).",
            args.data, limit_note, dataset.report.rows, dict(dataset.report.skipped) or "none",
        )
        return 2
    reward_model = load_reward_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        input_format=args.input_format,
        max_length=args.max_length,
        allow_fresh_head=args.fresh_head,
        fresh_head_seed=args.seed,
        autocast_dtype={"model": "spec", "none": None}.get(args.autocast, args.autocast),
    )
    try:
        cache = None if args.no_cache else ActivationCache(reward_model.cache_namespace(), args.cache_dir)
    except OSError as error:
        raise ValueError(f"Cannot open the activation cache under {args.cache_dir or 'the default cache directory'}: {error}. "
                         "Pass a writable --cache-dir, or --no-cache.") from error
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
        if "original_case_id" in pair.metadata:
            record["original_case_id"] = pair.metadata["original_case_id"]
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
    if scores.response_truncated.any():
        logger.warning(
            "%d pairs had part of a response cut to fit %d tokens; their rewards see only the response end. "
            "Raise --max-length if the model allows it.",
            int(scores.response_truncated.sum()), reward_model.max_length,
        )
    print(f"wrote {args.out}")
    return 0


def _check_output_path(out: Path, data: str) -> None:
    """Fail before any work when the output file cannot be written, or would overwrite the input."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; pass a file name such as {out / 'scores.jsonl'}.")
    if Path(data).exists() and out.resolve() == Path(data).resolve():
        raise ValueError(f"--out {out} is the input file given as --data; choose another output file.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".check"):
            pass
    except OSError as error:
        raise ValueError(f"--out {out} cannot be written ({error.strerror}); choose a writable location.") from error


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # papermill logs every cell at INFO; the runner's own start/finish lines are enough.
    logging.getLogger("papermill").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .data import DataError, DataNotFoundError
    from .matrix import MatrixError
    from .perturb import PerturbationError
    from .reward_model import RewardHeadError
    from .sae import SAECheckpointError

    try:
        return args.handler(args)
    except KeyboardInterrupt:
        logger.error("Interrupted. Files are written atomically or record by record: rerun the same command to resume.")
        return 130
    except (DataError, DataNotFoundError, MatrixError, PerturbationError, RewardHeadError, SAECheckpointError, ValueError, TypeError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
