"""Training Gated SAEs with SAELens on a reward model's residual stream, and measuring their fidelity.

The reward models are plain transformers models, not TransformerLens ones, so activations come from
our own forward hooks (:meth:`RewardModel.token_activations`, on the RM's formatted inputs) and feed
SAELens's :class:`~sae_lens.SAETrainer` through an iterator of shuffled token batches. The trained
SAE is saved in the SAELens layout with the model, layer and hook in ``cfg.json``'s metadata, so it
loads through :func:`rmsae.sae.load_sae` like the released checkpoints.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .storage import atomic_write_json, staged_folder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SAETrainingConfig:
    """Gated SAE training settings, with defaults from the SAELens configuration in the authors' code release.

    That configuration uses width 16,384, L1 coefficient 5 warmed up over
    the first 5% of steps, Adam lr 5e-5 decaying over the last 20% of steps, 4,000 steps of 4,096
    tokens, no input centring, activations scaled to a fixed expected norm (folded into the weights
    at the end).
    """

    d_sae: int = 16384
    l1_coefficient: float = 5.0
    lr: float = 5e-5
    training_steps: int = 4000
    batch_size_tokens: int = 4096
    l1_warm_up_fraction: float = 0.05
    lr_decay_fraction: float = 0.2
    lr_end_ratio: float = 0.1
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "expected_average_only_in"
    dead_feature_window: int = 1000
    seed: int = 42

    def __post_init__(self) -> None:
        for name in ("d_sae", "training_steps", "batch_size_tokens", "dead_feature_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SAETrainingConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("l1_coefficient", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"SAETrainingConfig.{name} must be a positive number, got {value!r}.")
        for name in ("l1_warm_up_fraction", "lr_decay_fraction", "lr_end_ratio"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"SAETrainingConfig.{name} must be between 0 and 1, got {value!r}.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def shuffled_batches(activations: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Yield (batch_size, d_in) batches forever, reshuffling the tokens every pass."""
    if len(activations) < batch_size:
        raise ValueError(
            f"Only {len(activations)} activation vectors for a batch size of {batch_size}; "
            "collect more tokens or lower batch_size_tokens."
        )
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(activations), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield activations[order[start : start + batch_size]]


def check_output_folder(out_dir: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Raise unless ``out_dir`` is free, or contains an SAE checkpoint that ``overwrite`` allows replacing."""
    out_dir = Path(out_dir)
    if out_dir.is_file():
        raise ValueError(f"SAE output folder {out_dir} is an existing file; choose a folder path.")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not (out_dir / "cfg.json").is_file():
        raise ValueError(
            f"SAE output folder {out_dir} exists and is not an SAE checkpoint; choose an empty or new folder."
        )
    if not overwrite:
        raise ValueError(
            f"SAE output folder {out_dir} already contains an SAE checkpoint, and training would replace the whole "
            "folder; choose a new folder or pass --overwrite."
        )


def train_sae(
    activations: torch.Tensor,
    config: SAETrainingConfig,
    out_dir: str | os.PathLike,
    *,
    metadata: Mapping[str, Any],
    device: str = "cpu",
):
    """Train a Gated SAE on (n_tokens, d_in) activations and save it to ``out_dir`` in the SAELens layout.

    ``metadata`` goes into ``cfg.json`` (model name, hook name, layer, ...). The folder appears only
    once complete: it is written beside ``out_dir`` and renamed into place. Returns the trained
    SAELens training SAE, with the activation scaling already folded into its weights.
    """
    from sae_lens import GatedTrainingSAE, GatedTrainingSAEConfig, LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    check_output_folder(out_dir)
    if activations.ndim != 2:
        raise ValueError(f"activations must be a (n_tokens, d_in) matrix, got shape {tuple(activations.shape)}.")
    d_in = int(activations.shape[1])
    torch.manual_seed(config.seed)
    steps = config.training_steps
    sae_config = GatedTrainingSAEConfig(
        d_in=d_in,
        d_sae=config.d_sae,
        l1_coefficient=config.l1_coefficient,
        l1_warm_up_steps=int(config.l1_warm_up_fraction * steps),
        apply_b_dec_to_input=config.apply_b_dec_to_input,
        normalize_activations=config.normalize_activations,
        device=device,
        metadata=SAEMetadata(**dict(metadata)),
    )
    training_sae = GatedTrainingSAE(sae_config)
    window = min(config.dead_feature_window, max(1, steps // 4))
    with tempfile.TemporaryDirectory(prefix="rmsae-sae-checkpoints-") as checkpoint_dir:
        trainer_config = SAETrainerConfig(
            total_training_samples=steps * config.batch_size_tokens,
            train_batch_size_samples=config.batch_size_tokens,
            lr=config.lr,
            lr_end=config.lr * config.lr_end_ratio,
            lr_scheduler_name="constant",
            lr_warm_up_steps=0,
            lr_decay_steps=int(config.lr_decay_fraction * steps),
            n_restart_cycles=1,
            adam_beta1=0.9,
            adam_beta2=0.999,
            device=device,
            autocast=False,
            dead_feature_window=window,
            feature_sampling_window=window,
            n_checkpoints=0,
            checkpoint_path=checkpoint_dir,
            save_final_checkpoint=False,
            logger=LoggingConfig(log_to_wandb=False),
            n_batches_for_norm_estimate=min(100, max(1, len(activations) // config.batch_size_tokens)),
        )
        provider = shuffled_batches(activations, config.batch_size_tokens, config.seed)
        trained = SAETrainer(cfg=trainer_config, sae=training_sae, data_provider=provider).fit()

    with staged_folder(out_dir) as staging:
        trained.save_inference_model(staging)
        atomic_write_json(staging / "rmsae_training.json", {"config": config.as_dict(), "training_tokens": len(activations)})
    logger.info("Saved SAE (d_in %d, d_sae %d, %d steps) to %s.", d_in, config.d_sae, steps, out_dir)
    return trained


@torch.no_grad()
def sae_fidelity(loaded, activations: torch.Tensor, *, batch_size: int = 4096, return_density: bool = False):
    """Measure an SAE on held-out (n_tokens, d_in) activations.

    Returns explained variance (1 - residual sum of squares / total sum of squares around the mean
    vector), mean L0 (active latents per token), the dead-latent fraction (latents never active on
    these tokens), the mean squared error per token and the number of tokens (``eval_tokens``).
    With ``return_density``, returns ``(metrics, density)``, where ``density`` (d_sae,) is the
    fraction of tokens on which each latent fires.
    """
    if len(activations) == 0:
        raise ValueError("sae_fidelity needs at least one activation vector.")
    mean = activations.mean(dim=0)
    residual, total, l0_sum = 0.0, 0.0, 0.0
    fire_counts = torch.zeros(loaded.d_sae, dtype=torch.float64)
    for start in range(0, len(activations), batch_size):
        x = activations[start : start + batch_size].float()
        codes = loaded.encode(x)
        x_hat = loaded.sae.decode(codes).float()
        residual += float(((x - x_hat) ** 2).sum())
        total += float(((x - mean) ** 2).sum())
        active = codes > 0
        l0_sum += float(active.sum())
        fire_counts += active.sum(dim=0).double().cpu()
    n = len(activations)
    metrics = {
        "explained_variance": 1.0 - residual / total,
        "l0": l0_sum / n,
        "dead_fraction": float((fire_counts == 0).double().mean()),
        "mse": residual / n,
        "eval_tokens": n,
    }
    return (metrics, (fire_counts / n).numpy()) if return_density else metrics
