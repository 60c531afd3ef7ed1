"""Mitigation: SAE Feature Steering, SAE Residual Correction and Raw Feature Steering.

None of the three changes the reward model's weights. Steering edits block L's output during the
forward pass (:func:`steer`). Residual Correction adds a learned linear function of the pooled SAE
codes to the reward and needs no new forward. Each method is fitted on the training cases of the
detection stage's split manifest, saved (safetensors plus a JSON of its settings), and evaluated on
the manifest's test cases, benign and perturbed pairs, before and after.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .analysis import bootstrap_ci
from .data import PerturbationRecord, PreferencePair
from .detection import DetectionError, SplitManifest, attacked, detection_samples
from .hooks import edit_block_output
from .partial_forward import BlockOutputs, PartialForwardError, capture_block_outputs, rewards_from_block_outputs
from .storage import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

RANKINGS = ("mean_diff", "median_diff", "ttest", "effect_size")
STEERING_MODES = ("replace", "error_preserving")
TOKEN_SCOPES = ("all", "response")
# Diff-recovery buckets: (name, lower bound inclusive, upper bound exclusive). They do not overlap.
DRR_BUCKETS = (
    ("wrong (< 0)", -math.inf, 0.0),
    ("partial [0, 0.8)", 0.0, 0.8),
    ("good [0.8, 0.99)", 0.8, 0.99),
    ("recovered [0.99, 1.01)", 0.99, 1.01),
    ("over (>= 1.01)", 1.01, math.inf),
)


class MitigationError(ValueError):
    """A mitigation method cannot be fitted or applied with these inputs."""


# ---------------------------------------------------------------------------------------------
# Cases and their features


@dataclass
class MitigationCases:
    """Successfully perturbed cases on one side of the split: original and perturbed pair of each."""

    case_ids: list[str]
    attack_types: list[str]
    originals: list[PreferencePair]
    perturbed: list[PreferencePair]

    def __len__(self) -> int:
        return len(self.case_ids)


def split_cases(
    records: Sequence[PerturbationRecord],
    manifest: SplitManifest,
    *,
    model: str | None = None,
    reward_threshold: float = 0.0,
) -> dict[str, MitigationCases]:
    """Sort the successfully perturbed records into the manifest's train, validation and test sides.

    The manifest must be a grouped one (by case) made for ``model``'s records.
    """
    try:  # the same checks of the threshold and of the records' model as in detection
        detection_samples(records, reward_threshold=reward_threshold, model=model)
    except DetectionError as error:
        raise MitigationError(str(error)) from None
    if manifest.mode != "grouped":
        raise MitigationError(f"Mitigation needs a split by case; this manifest splits by {manifest.mode!r} samples.")
    if model is not None and manifest.model is not None and manifest.model != model:
        raise MitigationError(
            f"The split manifest was made for {manifest.model}, not {model}; use the detection_split.json of this model's run."
        )
    sides = {side: MitigationCases([], [], [], []) for side in ("train", "validation", "test")}
    unknown = set()
    for record in records:
        if not attacked(record, reward_threshold):
            continue
        side = manifest.assignments.get(record.case_id)
        if side is None:
            unknown.add(record.case_id)
            continue
        cases = sides[side]
        cases.case_ids.append(record.case_id)
        cases.attack_types.append(record.attack_type or "unknown")
        cases.originals.append(record.original)
        cases.perturbed.append(record.perturbed)
    if unknown:
        raise MitigationError(
            f"{len(unknown)} successfully perturbed case(s) are not in the split manifest; the records changed since "
            "the detection stage split them. Rerun detection, then mitigation."
        )
    if not len(sides["train"]):
        raise MitigationError("The training side of the split contains no successfully perturbed case, so there is nothing to fit on.")
    return sides


@dataclass
class PairFeatures:
    """Rewards and pooled features of both sides of a list of pairs."""

    reward_chosen: np.ndarray
    reward_rejected: np.ndarray
    sae_chosen: np.ndarray | None = None
    sae_rejected: np.ndarray | None = None
    raw_chosen: np.ndarray | None = None
    raw_rejected: np.ndarray | None = None

    @property
    def gap(self) -> np.ndarray:
        return self.reward_chosen - self.reward_rejected


def pair_features(reward_model, pairs: Sequence[PreferencePair], *, layer: int, sae=None, raw: bool = True, **scoring: Any) -> PairFeatures:
    """Score pairs once (through the activation cache when ``cache=`` is given) with mean-pooled codes and hidden states.

    Other keyword arguments (``batch_size``, ``cache``, ``progress``) go to :meth:`RewardModel.score_pairs`.
    """
    if sae is not None and sae.layer != layer:
        raise MitigationError(f"The SAE reads layer {sae.layer}, but the features are requested at layer {layer}; load the SAE of layer {layer}.")
    if "poolings" in scoring or "layers" in scoring or "saes" in scoring:
        raise MitigationError("pair_features sets layers, saes and poolings itself (mean pooling); pass layer= and sae= instead.")
    scores = reward_model.score_pairs(pairs, layers=[layer] if raw else [], saes=[sae] if sae is not None else [], poolings=["mean"], **scoring)
    features = PairFeatures(scores.reward_chosen, scores.reward_rejected)
    if sae is not None:
        features.sae_chosen, features.sae_rejected = scores.chosen.codes(sae), scores.rejected.codes(sae)
    if raw:
        features.raw_chosen, features.raw_rejected = scores.chosen.pooled[(layer, "mean")], scores.rejected.pooled[(layer, "mean")]
    return features


# ---------------------------------------------------------------------------------------------
# Interventions on block L


def _scope_mask(reward_model, scope: str, hidden: torch.Tensor) -> torch.Tensor:
    masks = reward_model.token_masks
    if masks is None:
        raise MitigationError("Steering needs the token masks of the batch; score through RewardModel.score_pairs or score_conversations.")
    return masks[scope].to(hidden.device)


@dataclass
class SAEFeatureSteering:
    """Scale the chosen SAE latents by ``eta`` inside block ``sae.layer``.

    ``replace`` (the paper's): the block output becomes the SAE reconstruction with the scaled
    latents, at every position, so even ``eta = 1`` moves the rewards. ``error_preserving``: the
    block output keeps the SAE's reconstruction error and only the change of the reconstruction is
    added, so ``eta = 1`` is the identity. Latents are scaled at the tokens of ``token_scope``.
    """

    sae: Any
    latents: torch.Tensor
    eta: float = -0.001
    mode: str = "replace"
    token_scope: str = "all"

    def __post_init__(self) -> None:
        latents = torch.as_tensor(np.asarray(self.latents))
        if latents.dtype == torch.bool or latents.is_floating_point() or latents.is_complex():
            raise MitigationError(
                f"latents must be integer latent indices, got a {latents.dtype} array; for a boolean mask pass mask.nonzero()[0]."
            )
        self.latents = latents.to(torch.long).flatten()
        if self.mode not in STEERING_MODES:
            raise MitigationError(f"mode must be one of {STEERING_MODES}, got {self.mode!r}.")
        if self.token_scope not in TOKEN_SCOPES:
            raise MitigationError(f"token_scope must be one of {TOKEN_SCOPES}, got {self.token_scope!r}.")
        if isinstance(self.eta, bool) or not isinstance(self.eta, numbers.Real) or not math.isfinite(self.eta):
            raise MitigationError(f"eta must be a finite number, got {self.eta!r}.")
        self.eta = float(self.eta)
        if len(self.latents) and (int(self.latents.min()) < 0 or int(self.latents.max()) >= self.sae.d_sae):
            raise MitigationError(f"Latent indices must lie in 0..{self.sae.d_sae - 1}, got {self.latents.min()}..{self.latents.max()}.")

    @property
    def layer(self) -> int:
        return self.sae.layer

    @property
    def name(self) -> str:
        latents = hashlib.sha256(self.latents.numpy().tobytes()).hexdigest()[:12]
        return f"sae_fs:{self.sae.fingerprint[:12]}@{self.layer}:{self.mode}:{self.token_scope}:eta={self.eta!r}:latents={latents}"

    def save(self, path: str | Path, fitted_on: Mapping[str, Any], scores: np.ndarray | None = None) -> Path:
        """Save the latents (and their ranking scores) with the settings and what they were fitted on."""
        tensors = {"latents": self.latents} | ({"scores": np.asarray(scores, dtype=np.float32)} if scores is not None else {})
        settings = {"method": "sae_feature_steering", "eta": self.eta, "mode": self.mode, "token_scope": self.token_scope,
                    "layer": self.layer, "sae": str(self.sae.info.path), "sae_fingerprint": self.sae.fingerprint, "fitted_on": dict(fitted_on)}
        return save_fitted(path, tensors, settings)

    @classmethod
    def load(cls, path: str | Path, sae, **overrides: Any) -> "SAEFeatureSteering":
        """Reload saved latents for ``sae`` (the SAE they were selected with); ``overrides`` replace eta, mode or token_scope."""
        weights, settings = load_fitted(path)
        _check_method(path, settings, "sae_feature_steering")
        if settings.get("sae_fingerprint") != sae.fingerprint:
            raise MitigationError(f"{path} was fitted with the SAE {settings.get('sae')}, not {sae.info.path}; load it with that SAE.")
        options = {key: settings[key] for key in ("eta", "mode", "token_scope")} | overrides
        return cls(sae, weights["latents"], **options)

    @torch.no_grad()
    def edit(self, reward_model, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.sae.info.d_in:
            raise MitigationError(f"The SAE {self.sae.info.path} reads width {self.sae.info.d_in}, but block {self.layer} outputs {hidden.shape[-1]}.")
        mask = _scope_mask(reward_model, self.token_scope, hidden)
        sae = self.sae.sae
        with torch.autocast(hidden.device.type, enabled=False):
            codes = sae.encode(hidden.to(device=sae.device, dtype=sae.dtype))
            scale = torch.ones(codes.shape[-1], dtype=codes.dtype, device=codes.device)
            scale[self.latents.to(codes.device)] = self.eta
            steered = torch.where(mask.to(codes.device)[..., None], codes * scale, codes)
            if self.mode == "replace":
                return sae.decode(steered).to(device=hidden.device, dtype=hidden.dtype)
            # Only the change of the reconstruction is added, in the block's dtype, so that eta = 1 adds exactly zero.
            return hidden + (sae.decode(steered) - sae.decode(codes)).to(device=hidden.device, dtype=hidden.dtype)


@dataclass
class RawFeatureSteering:
    """Subtract ``beta * direction`` from block ``layer``'s output at the tokens of ``token_scope``."""

    direction: torch.Tensor
    layer: int
    beta: float = 5.0
    token_scope: str = "all"

    def __post_init__(self) -> None:
        self.direction = torch.as_tensor(np.asarray(self.direction), dtype=torch.float32).flatten()
        if not len(self.direction) or not torch.isfinite(self.direction).all():
            raise MitigationError("The steering direction is empty or contains NaN or infinite values; fit it on non-empty benign and perturbed sets.")
        if self.token_scope not in TOKEN_SCOPES:
            raise MitigationError(f"token_scope must be one of {TOKEN_SCOPES}, got {self.token_scope!r}.")
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real) or not math.isfinite(self.beta):
            raise MitigationError(f"beta must be a finite number, got {self.beta!r}.")
        self.beta = float(self.beta)
        self.layer = int(self.layer)

    @property
    def name(self) -> str:
        direction = hashlib.sha256(self.direction.numpy().tobytes()).hexdigest()[:12]
        return f"raw_fs@{self.layer}:{self.token_scope}:beta={self.beta!r}:direction={direction}"

    def save(self, path: str | Path, fitted_on: Mapping[str, Any]) -> Path:
        """Save the unscaled direction with beta, layer, token scope and what it was fitted on."""
        settings = {"method": "raw_feature_steering", "beta": self.beta, "layer": self.layer, "token_scope": self.token_scope,
                    "fitted_on": dict(fitted_on)}
        return save_fitted(path, {"direction": self.direction}, settings)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> "RawFeatureSteering":
        """Reload a saved direction; ``overrides`` replace beta or token_scope."""
        weights, settings = load_fitted(path)
        _check_method(path, settings, "raw_feature_steering")
        options = {key: settings[key] for key in ("beta", "token_scope")} | overrides
        return cls(weights["direction"], settings["layer"], **options)

    @torch.no_grad()
    def edit(self, reward_model, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != len(self.direction):
            raise MitigationError(f"The steering direction has {len(self.direction)} dimensions, but block {self.layer} outputs {hidden.shape[-1]}.")
        mask = _scope_mask(reward_model, self.token_scope, hidden)
        shift = (self.beta * self.direction).to(hidden.device, hidden.dtype)
        return hidden - mask[..., None].to(hidden.dtype) * shift


@contextlib.contextmanager
def steer(reward_model, intervention) -> Iterator[None]:
    """Apply a steering intervention to the reward model's forward passes while the context is open.

    Scores computed inside belong to the steered model: open an activation cache inside the context
    (its namespace then names the intervention) or score without one.
    """
    with reward_model.intervention(intervention.name):
        with edit_block_output(reward_model.model, intervention.layer, lambda hidden: intervention.edit(reward_model, hidden)):
            yield


# ---------------------------------------------------------------------------------------------
# Fitting the steering methods


def rank_latents(perturbed_codes: np.ndarray, benign_codes: np.ndarray, method: str = "mean_diff") -> np.ndarray:
    """Score each latent by how much more it fires on perturbed texts than on benign ones (higher = more).

    ``mean_diff`` and ``median_diff``: the difference of means or medians. ``ttest``: the mean
    difference over the two-sample t-test p-value, −inf where the perturbed mean is not higher.
    ``effect_size``: Cohen's d with the pooled standard deviation sqrt((σ_A² + σ_B²) / 2).
    """
    perturbed_codes, benign_codes = np.asarray(perturbed_codes, dtype=np.float64), np.asarray(benign_codes, dtype=np.float64)
    if perturbed_codes.ndim != 2 or benign_codes.ndim != 2 or perturbed_codes.shape[1] != benign_codes.shape[1]:
        raise MitigationError(f"Codes must be (texts, latents) arrays of equal width, got {perturbed_codes.shape} and {benign_codes.shape}.")
    if len(perturbed_codes) == 0 or len(benign_codes) == 0:
        raise MitigationError("Ranking latents needs perturbed and benign texts; one of the sets is empty.")
    difference = perturbed_codes.mean(axis=0) - benign_codes.mean(axis=0)
    if method == "mean_diff":
        return difference
    if method == "median_diff":
        return np.median(perturbed_codes, axis=0) - np.median(benign_codes, axis=0)
    if method == "ttest":
        from scipy.stats import ttest_ind

        # Latents that never fire give constant samples and a NaN p-value, read as 1 (no evidence).
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p_values = np.nan_to_num(ttest_ind(perturbed_codes, benign_codes, axis=0).pvalue, nan=1.0)
        return np.where(difference > 0, difference / (p_values + 1e-10), -np.inf)
    if method == "effect_size":
        pooled = np.sqrt((perturbed_codes.var(axis=0, ddof=1) + benign_codes.var(axis=0, ddof=1)) / 2) if min(len(perturbed_codes), len(benign_codes)) > 1 else 0.0
        return difference / (pooled + 1e-10)
    raise MitigationError(f"ranking must be one of {RANKINGS}, got {method!r}.")


def select_latents(scores: np.ndarray, top_k: int, *, positive_only: bool = True) -> np.ndarray:
    """Return the indices of the ``top_k`` highest scores, best first; with ``positive_only``, only scores > 0."""
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise MitigationError(f"scores must be one score per latent (1-D), got shape {scores.shape}.")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise MitigationError(f"top_k must be a positive integer, got {top_k!r}.")
    if top_k > len(scores):
        raise MitigationError(f"top_k={top_k} is larger than the SAE's {len(scores)} latents; choose at most {len(scores)}.")
    order = np.argsort(-np.asarray(scores), kind="stable")[:top_k]
    if positive_only:
        order = order[np.asarray(scores)[order] > 0]
        if len(order) < top_k:
            logger.info("Only %d latents fire more on perturbed texts; steering those instead of %d.", len(order), top_k)
    return order


def text_codes(features: PairFeatures, feature_type: str) -> np.ndarray:
    """Stack the chosen and rejected texts' pooled ``sae`` or ``raw`` features, because the authors pool both sides together."""
    chosen, rejected = getattr(features, f"{feature_type}_chosen"), getattr(features, f"{feature_type}_rejected")
    if chosen is None:
        remedy = "an SAE" if feature_type == "sae" else "raw=True"
        raise MitigationError(f"These pair features contain no {feature_type!r} features; score the pairs with {remedy}.")
    return np.concatenate([chosen, rejected])


def steering_direction(perturbed: PairFeatures, benign: PairFeatures) -> np.ndarray:
    """Return the Raw Feature Steering direction: mean pooled hidden state of perturbed texts minus that of benign ones."""
    if not len(perturbed.gap) or not len(benign.gap):
        raise MitigationError("The steering direction needs perturbed and benign training pairs; one of the sets is empty.")
    return (text_codes(perturbed, "raw").mean(axis=0) - text_codes(benign, "raw").mean(axis=0)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Residual Correction


@dataclass
class CorrectionData:
    """Pairs for Residual Correction: pooled codes, base rewards, and which pairs are benign."""

    codes_chosen: np.ndarray
    codes_rejected: np.ndarray
    reward_chosen: np.ndarray
    reward_rejected: np.ndarray
    benign: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.benign)
        for name in ("codes_chosen", "codes_rejected", "reward_chosen", "reward_rejected"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if len(value) != n or (name.startswith("codes") and value.ndim != 2):
                raise MitigationError(f"CorrectionData.{name} must have {n} rows{' of codes' if name.startswith('codes') else ''}, got shape {value.shape}.")
            if not np.isfinite(value).all():
                raise MitigationError(f"CorrectionData.{name} contains NaN or infinite values; check the scored features.")
        if np.shape(self.codes_chosen)[1:] != np.shape(self.codes_rejected)[1:]:
            raise MitigationError(f"Chosen and rejected codes differ in width: {np.shape(self.codes_chosen)} and {np.shape(self.codes_rejected)}.")

    @classmethod
    def from_features(cls, benign: PairFeatures, perturbed: PairFeatures) -> "CorrectionData":
        for features in (benign, perturbed):
            if features.sae_chosen is None:
                raise MitigationError("Residual Correction needs pooled SAE codes; score the pairs with the SAE.")
        return cls(
            np.concatenate([benign.sae_chosen, perturbed.sae_chosen]),
            np.concatenate([benign.sae_rejected, perturbed.sae_rejected]),
            np.concatenate([benign.reward_chosen, perturbed.reward_chosen]),
            np.concatenate([benign.reward_rejected, perturbed.reward_rejected]),
            np.concatenate([np.ones(len(benign.gap), bool), np.zeros(len(perturbed.gap), bool)]),
        )

    def __len__(self) -> int:
        return len(self.benign)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.as_tensor(np.asarray(value), dtype=torch.float32) for value in
                     (self.codes_chosen, self.codes_rejected, self.reward_chosen, self.reward_rejected, self.benign))


class ResidualCorrection:
    """A linear head g(z) = wᵀz + b on pooled SAE codes; the corrected reward is r + g(z).

    Loss per pair: max(0, m − corrected gap), plus ``reg_weight`` · (g(z_c)² + g(z_r)²) on benign
    pairs, vectorised over the batch. Adam, a cosine schedule over ``epochs``, gradient clipping;
    the epoch with the lowest validation loss is kept. ``standardize`` scales the codes to unit
    variance first. ``margin_in_std`` reads ``margin`` in units of the standard deviation of the
    training benign reward gaps, because RMs differ in reward scale. Both are off by default, as in the
    authors' code.
    """

    def __init__(
        self,
        margin: float = 1.0,
        reg_weight: float = 0.05,
        learning_rate: float = 1e-3,
        epochs: int = 100,
        batch_size: int = 32,
        max_grad_norm: float = 1.0,
        standardize: bool = False,
        margin_in_std: bool = False,
        seed: int = 0,
    ) -> None:
        for name, value in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise MitigationError(f"{name} must be a positive integer, got {value!r}.")
        for name, value in (("margin", margin), ("reg_weight", reg_weight), ("learning_rate", learning_rate), ("max_grad_norm", max_grad_norm)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise MitigationError(f"{name} must be a finite number >= 0, got {value!r}.")
        epochs, batch_size = int(epochs), int(batch_size)
        self.margin, self.reg_weight, self.learning_rate = margin, reg_weight, learning_rate
        self.epochs, self.batch_size, self.max_grad_norm = epochs, batch_size, max_grad_norm
        self.standardize, self.margin_in_std, self.seed = standardize, margin_in_std, seed

    def settings(self) -> dict[str, Any]:
        return {"margin": self.margin, "reg_weight": self.reg_weight, "learning_rate": self.learning_rate, "epochs": self.epochs,
                "batch_size": self.batch_size, "max_grad_norm": self.max_grad_norm, "standardize": self.standardize,
                "margin_in_std": self.margin_in_std, "seed": self.seed}

    def _losses(self, linear: torch.nn.Linear, data: tuple[torch.Tensor, ...], margin: float) -> torch.Tensor:
        codes_chosen, codes_rejected, reward_chosen, reward_rejected, benign = data
        delta_chosen = linear((codes_chosen - self.mean_) / self.scale_).squeeze(-1)
        delta_rejected = linear((codes_rejected - self.mean_) / self.scale_).squeeze(-1)
        ranking = torch.relu(margin - ((reward_chosen + delta_chosen) - (reward_rejected + delta_rejected)))
        return ranking + self.reg_weight * benign * (delta_chosen**2 + delta_rejected**2)

    def fit(self, train: CorrectionData, validation: CorrectionData | None = None) -> "ResidualCorrection":
        if len(train) == 0:
            raise MitigationError("Residual Correction got no training pairs.")
        data = train.tensors()
        width = data[0].shape[1]
        self.mean_ = data[0].new_zeros(width)
        self.scale_ = data[0].new_ones(width)
        if self.standardize:
            stacked = torch.cat([data[0], data[1]])
            self.mean_, self.scale_ = stacked.mean(dim=0), stacked.std(dim=0).clamp_min(1e-6)
        benign_gaps = (data[2] - data[3])[data[4].bool()]
        self.margin_used_ = float(self.margin * benign_gaps.std()) if self.margin_in_std and len(benign_gaps) > 1 else float(self.margin)
        checked = validation.tensors() if validation is not None and len(validation) else data
        if checked[0].shape[1] != width:
            raise MitigationError(f"The validation codes have {checked[0].shape[1]} columns, but the training codes {width}.")

        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        linear = torch.nn.Linear(width, 1)
        with torch.no_grad():
            linear.weight.normal_(0.0, 0.001)
            linear.bias.zero_()
        optimiser = torch.optim.Adam(linear.parameters(), lr=self.learning_rate)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=self.epochs)
        self.history_: list[dict[str, float]] = []
        best = (math.inf, 0, None)
        for epoch in range(1, self.epochs + 1):
            total = 0.0
            for batch in torch.randperm(len(train), generator=generator).split(self.batch_size):
                optimiser.zero_grad()
                loss = self._losses(linear, tuple(t[batch] for t in data), self.margin_used_).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(linear.parameters(), self.max_grad_norm)
                optimiser.step()
                total += float(loss.detach()) * len(batch)
            schedule.step()
            with torch.no_grad():
                validation_loss = float(self._losses(linear, checked, self.margin_used_).mean())
            self.history_.append({"epoch": epoch, "train_loss": total / len(train), "validation_loss": validation_loss})
            if validation_loss < best[0]:
                best = (validation_loss, epoch, copy.deepcopy(linear.state_dict()))
        self.best_loss_, self.best_epoch_ = best[0], best[1]
        linear.load_state_dict(best[2])
        self.weight_ = linear.weight.detach()[0].clone()
        self.bias_ = float(linear.bias.detach()[0])
        return self

    def corrections(self, codes: np.ndarray) -> np.ndarray:
        """Return g(z) per row of pooled codes."""
        if not hasattr(self, "weight_"):
            raise MitigationError("This Residual Correction is not fitted yet; call fit first.")
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.float32)
        if codes.ndim != 2 or codes.shape[1] != len(self.weight_):
            raise MitigationError(f"Codes must have {len(self.weight_)} columns (the SAE width it was fitted on), got shape {tuple(codes.shape)}.")
        return (((codes - self.mean_) / self.scale_) @ self.weight_ + self.bias_).numpy().astype(np.float64)

    def corrected_gap(self, features: PairFeatures) -> np.ndarray:
        """Return the reward gap with the correction added to both sides."""
        if features.sae_chosen is None or features.sae_rejected is None:
            raise MitigationError("Residual Correction needs the pooled SAE codes of both sides; score the pairs with the SAE.")
        return features.gap + self.corrections(features.sae_chosen) - self.corrections(features.sae_rejected)

    def save(self, path: str | Path, fitted_on: Mapping[str, Any], sae=None) -> Path:
        """Save the fitted head (weight, bias, standardisation) with its settings, what it was fitted on and its SAE."""
        if not hasattr(self, "weight_"):
            raise MitigationError("This Residual Correction is not fitted yet; call fit first.")
        tensors = {"weight": self.weight_, "bias": torch.tensor([self.bias_]), "mean": self.mean_, "scale": self.scale_}
        settings = {"method": "residual_correction", **self.settings(), "margin_used": self.margin_used_,
                    "best_epoch": self.best_epoch_, "fitted_on": dict(fitted_on),
                    "sae": str(sae.info.path) if sae is not None else None, "sae_fingerprint": sae.fingerprint if sae is not None else None}
        return save_fitted(path, tensors, settings)

    @classmethod
    def load(cls, path: str | Path, sae=None) -> "ResidualCorrection":
        """Reload a saved head; with ``sae``, check that it is the SAE whose codes the head was fitted on."""
        weights, settings = load_fitted(path)
        _check_method(path, settings, "residual_correction")
        if sae is not None and settings.get("sae_fingerprint") not in (None, sae.fingerprint):
            raise MitigationError(f"{path} was fitted on codes of the SAE {settings.get('sae')}, not {sae.info.path}; load it with that SAE.")
        correction = cls(**{key: settings[key] for key in cls().settings()})
        correction.weight_, correction.bias_ = weights["weight"], float(weights["bias"][0])
        correction.mean_, correction.scale_ = weights["mean"], weights["scale"]
        correction.margin_used_, correction.best_epoch_ = settings["margin_used"], settings["best_epoch"]
        return correction


# ---------------------------------------------------------------------------------------------
# Saving and loading fitted methods


def save_fitted(path: str | Path, tensors: Mapping[str, torch.Tensor | np.ndarray], settings: Mapping[str, Any]) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` (settings and what the method was fitted on)."""
    from safetensors.torch import save

    weights_path, settings_path = _fitted_paths(path)
    weights = {name: torch.as_tensor(np.asarray(value)).contiguous() for name, value in tensors.items()}
    atomic_write_bytes(weights_path, save(weights))
    atomic_write_json(settings_path, dict(settings))
    return Path(path)


def _fitted_paths(path: str | Path) -> tuple[Path, Path]:
    # Suffixes are appended, not swapped, so that names with dots (sae_fs_eta-0.001) stay apart.
    path = Path(path)
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _check_method(path: str | Path, settings: Mapping[str, Any], method: str) -> None:
    if settings.get("method") != method:
        raise MitigationError(f"{path} contains a fitted {settings.get('method')!r}, not {method!r}; load it with the matching class.")


def load_fitted(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what :func:`save_fitted` wrote."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path, settings_path = _fitted_paths(path)
    for required in (weights_path, settings_path):
        if not required.is_file():
            raise FileNotFoundError(f"{required} is missing; fit the method first (the mitigation stage saves it).")
    try:
        settings = json.loads(settings_path.read_text(encoding="utf-8"))
        weights = load_file(str(weights_path))
    except (json.JSONDecodeError, SafetensorError, UnicodeDecodeError) as error:
        raise MitigationError(f"The saved method {path} is unreadable ({error}); delete both files and fit it again.") from None
    if not isinstance(settings, dict):
        raise MitigationError(f"{settings_path} must contain a JSON object; delete both files and fit the method again.")
    return weights, settings


# ---------------------------------------------------------------------------------------------
# Evaluation


def recovery_rate(gap: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Diff-recovery rate: ``gap / reference``, 0 where ``abs(reference) < 1e-6``."""
    gap, reference = np.asarray(gap, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    safe = np.abs(reference) >= 1e-6
    return np.where(safe, gap / np.where(safe, reference, 1.0), 0.0)


def recovery_buckets(rates: np.ndarray) -> dict[str, float]:
    """Share of pairs in each diff-recovery bucket, among pairs with a defined (non-NaN) rate.

    The buckets do not overlap and cover every number including ±inf, so the shares sum to 1.
    """
    rates = np.asarray(rates, dtype=np.float64)
    rates = rates[~np.isnan(rates)]
    if len(rates) == 0:
        return {name: math.nan for name, _, _ in DRR_BUCKETS}
    return {name: float(((rates >= low) & ((rates < high) | (high == math.inf))).mean()) for name, low, high in DRR_BUCKETS}


@dataclass
class GapsBeforeAfter:
    """Reward gaps of the test cases' benign and perturbed pairs, before and after a method."""

    attack_types: np.ndarray
    benign_before: np.ndarray
    benign_after: np.ndarray
    perturbed_before: np.ndarray
    perturbed_after: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.attack_types = np.asarray(self.attack_types)
        n = len(self.attack_types)
        for name in ("benign_before", "benign_after", "perturbed_before", "perturbed_after"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape != (n,):
                raise MitigationError(f"GapsBeforeAfter.{name} must have one gap per case ({n}), got shape {value.shape}.")
            setattr(self, name, value)


def _accuracy(correct: np.ndarray, n_resamples: int, seed: int) -> tuple[float, float, float]:
    if len(correct) == 0:
        return math.nan, math.nan, math.nan
    return bootstrap_ci(correct.astype(float), n_resamples=n_resamples, seed=seed)


def summarise_gaps(gaps: GapsBeforeAfter, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy before and after with bootstrap intervals, flips repaired and introduced, and diff recovery."""
    result: dict[str, Any] = {"cases": int(len(gaps.benign_before))}
    reference = gaps.benign_before
    for variant in ("benign", "perturbed"):
        before, after = getattr(gaps, f"{variant}_before") > 0, getattr(gaps, f"{variant}_after") > 0
        for label, values in (("before", before), ("after", after)):
            estimate, low, high = _accuracy(values, n_resamples, seed)
            result.update({f"{variant}_accuracy_{label}": estimate, f"{variant}_accuracy_{label}_low": low,
                           f"{variant}_accuracy_{label}_high": high})
        result[f"{variant}_repaired"] = int((~before & after).sum())
        result[f"{variant}_introduced"] = int((before & ~after).sum())
        rates = recovery_rate(getattr(gaps, f"{variant}_after"), reference)
        result[f"{variant}_recovery_mean"] = float(rates.mean()) if len(rates) else math.nan
        result[f"{variant}_recovery_median"] = float(np.median(rates)) if len(rates) else math.nan
        result[f"{variant}_recovery_buckets"] = recovery_buckets(rates)
    result["perturbed_recovery_before_mean"] = float(recovery_rate(gaps.perturbed_before, reference).mean()) if len(reference) else math.nan
    return result


def evaluate_gaps(gaps: GapsBeforeAfter, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """:func:`summarise_gaps` overall and per perturbation type."""
    result = {"overall": summarise_gaps(gaps, n_resamples=n_resamples, seed=seed), "per_type": {}}
    for kind in sorted(set(gaps.attack_types.tolist())):
        mask = gaps.attack_types == kind
        subset = GapsBeforeAfter(gaps.attack_types[mask], gaps.benign_before[mask], gaps.benign_after[mask],
                                 gaps.perturbed_before[mask], gaps.perturbed_after[mask])
        result["per_type"][kind] = summarise_gaps(subset, n_resamples=n_resamples, seed=seed)
    return result


def case_conversations(cases: MitigationCases) -> list:
    """Return the cases' texts in the order :func:`steered_gaps` scores them: chosen sides, then rejected sides.

    Within each side the original pairs come first, then the perturbed ones.
    """
    pairs = list(cases.originals) + list(cases.perturbed)
    return [pair.conversation("chosen") for pair in pairs] + [pair.conversation("rejected") for pair in pairs]


def try_capture_block_outputs(reward_model, conversations: Sequence, layer: int, *, batch_size: int = 16,
                              max_bytes: int | None = None, progress: bool = False) -> BlockOutputs | None:
    """Store block ``layer``'s per-token outputs of ``conversations``, for steered scoring to resume from.

    Returns None, with a warning, when the model's forward cannot be resumed from a block output or
    the outputs would take more than ``max_bytes``. Steering then runs full forwards.
    """
    try:
        return capture_block_outputs(reward_model, conversations, layer, batch_size=batch_size, max_bytes=max_bytes,
                                     progress=progress)
    except PartialForwardError as error:
        logger.warning("Steered scoring will run full forwards: %s", error)
        return None


def capture_case_outputs(reward_model, cases: MitigationCases, layer: int, *, batch_size: int = 16, max_bytes: int | None = None,
                         progress: bool = False) -> BlockOutputs | None:
    """Store block ``layer``'s per-token outputs of the cases' texts for :func:`steered_gaps`, or return None as :func:`try_capture_block_outputs` does."""
    return try_capture_block_outputs(reward_model, case_conversations(cases), layer, batch_size=batch_size, max_bytes=max_bytes,
                                     progress=progress)


def steered_rewards(reward_model, intervention, conversations: Sequence, *, batch_size: int = 16,
                    block_outputs: BlockOutputs | None = None, cache_factory=None) -> np.ndarray:
    """Rewards of ``conversations`` with ``intervention`` applied.

    With ``block_outputs`` captured for these texts at the intervention's layer, only the blocks
    after it are run; otherwise every text gets a full forward. ``cache_factory``, when given, is
    called inside the intervention context and returns an open activation cache for the steered
    model (``lambda: ActivationCache(reward_model.cache_namespace())``). Only full forwards use it.
    """
    if block_outputs is not None:
        if block_outputs.layer != intervention.layer:
            raise MitigationError(
                f"The block outputs were captured at layer {block_outputs.layer}, but {intervention.name} steers layer {intervention.layer}; "
                "capture them at the intervention's layer."
            )
        keys = [reward_model.text_key(reward_model.render(turns)) for turns in conversations]
        if keys != block_outputs.text_keys:
            raise MitigationError("The block outputs were captured for other texts than these; capture them for the texts being scored.")
        with steer(reward_model, intervention):
            return rewards_from_block_outputs(reward_model, block_outputs)
    with steer(reward_model, intervention):
        with (cache_factory() if cache_factory else contextlib.nullcontext()) as cache:
            return reward_model.score_conversations(conversations, batch_size=batch_size, cache=cache, progress=False).rewards


def steered_gaps(reward_model, intervention, cases: MitigationCases, *, batch_size: int = 16, cache_factory=None,
                 block_outputs: BlockOutputs | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reward gaps of the cases' benign and perturbed pairs with ``intervention`` applied.

    ``block_outputs`` come from :func:`capture_case_outputs` for these cases and ``cache_factory``
    is as in :func:`steered_rewards`.
    """
    n = len(cases)
    rewards = steered_rewards(reward_model, intervention, case_conversations(cases), batch_size=batch_size,
                              block_outputs=block_outputs, cache_factory=cache_factory)
    gaps = rewards[: 2 * n] - rewards[2 * n :]
    return gaps[:n], gaps[n:]
