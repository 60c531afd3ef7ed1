"""Detection: telling perturbed preference pairs from benign ones with pooled SAE or raw features.

A sample is one pair, original (label 0) or perturbed (label 1), and its input is
``|f(chosen) - f(rejected)|`` of pooled features at layer L: the pooled SAE code (``sae``) or the
pooled hidden state (``raw``). The split is by case id, so a case's original and perturbed pairs
never sit on two sides. The authors' split by sample stays available as ``mode="ungrouped"``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from .data import PerturbationRecord, PreferencePair
from .storage import atomic_write_json

logger = logging.getLogger(__name__)

FEATURE_TYPES = ("sae", "raw")
CASE_TYPES = ("successfully_attacked", "initial_classification")
SPLIT_MODES = ("grouped", "ungrouped")
SIDES = ("train", "validation", "test")


class DetectionError(ValueError):
    """The detection data, split or detector settings cannot give a meaningful result."""


# ---------------------------------------------------------------------------------------------
# Data set


@dataclass
class DetectionData:
    """Labelled pair samples with their features, one row per sample.

    ``features[feature_type]`` is a float32 array of shape (n_samples, d): ``d_sae`` for ``sae``,
    the hidden size for ``raw``. ``units`` names each sample for an ungrouped split.
    """

    case_ids: np.ndarray
    attack_types: np.ndarray
    variants: np.ndarray
    labels: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name in ("case_ids", "attack_types", "variants"):
            if len(getattr(self, name)) != n:
                raise DetectionError(f"DetectionData.{name} has {len(getattr(self, name))} entries, but there are {n} labels.")
        for name, values in self.features.items():
            if np.ndim(values) != 2 or len(values) != n:
                raise DetectionError(f"DetectionData.features[{name!r}] must have shape ({n}, width), got {np.shape(values)}.")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def units(self) -> np.ndarray:
        return np.array([f"{case}:{kind}:{variant}" for case, kind, variant in zip(self.case_ids, self.attack_types, self.variants)])

    def subset(self, mask: np.ndarray) -> "DetectionData":
        mask = np.asarray(mask)
        return DetectionData(
            case_ids=self.case_ids[mask],
            attack_types=self.attack_types[mask],
            variants=self.variants[mask],
            labels=self.labels[mask],
            features={name: values[mask] for name, values in self.features.items()},
        )

    def counts(self):
        """Samples per perturbation type and label, as a DataFrame."""
        import pandas as pd

        frame = pd.DataFrame({"attack_type": self.attack_types, "label": self.labels, "case_id": self.case_ids})
        return (
            frame.groupby("attack_type")
            .agg(cases=("case_id", "nunique"), benign=("label", lambda s: int((s == 0).sum())), perturbed=("label", "sum"))
            .reset_index()
        )


def attacked(record: PerturbationRecord, reward_threshold: float = 0.0) -> bool:
    """Apply the authors' "successfully attacked" filter to the stored rewards: initial gap > τ, final gap ≤ −τ."""
    if record.initial_rewards is None or record.final_rewards is None:
        return False
    return record.initial_rewards["diff"] > reward_threshold and record.final_rewards["diff"] <= -reward_threshold


def detection_samples(
    records: Sequence[PerturbationRecord],
    *,
    case_type: str = "successfully_attacked",
    reward_threshold: float = 0.0,
    balance: bool = True,
    seed: int = 0,
    model: str | None = None,
) -> list[tuple[str, str, str, int, PreferencePair]]:
    """Return ``(case_id, attack_type, variant, label, pair)`` per sample.

    ``successfully_attacked`` (the paper's detector): each attacked case gives its original pair
    (label 0) and its perturbed pair (label 1). ``initial_classification`` (the authors' secondary
    experiment): each distinct original pair, labelled 1 when the stored initial reward gap is at
    most τ (with τ = 0: when the RM ranks it wrongly). With ``balance`` the larger class is
    subsampled at random (seeded) to the size of the smaller one. ``model``, when given, must match the model
    recorded in the records.
    """
    if case_type not in CASE_TYPES:
        raise DetectionError(f"case_type must be one of {CASE_TYPES}, got {case_type!r}.")
    if isinstance(reward_threshold, bool) or not isinstance(reward_threshold, (int, float)) or not math.isfinite(reward_threshold) or reward_threshold < 0:
        raise DetectionError(f"reward_threshold must be a finite number >= 0, got {reward_threshold!r}.")
    records = list(records)
    if not records:
        raise DetectionError("No perturbation records were given; run the perturbations stage first.")
    if model is not None:
        others = sorted({str(r.extra.get("model")) for r in records if r.extra.get("model") not in (None, model)})
        if others:
            raise DetectionError(
                f"The records were generated with {', '.join(others)}, not {model}; detect on the records of the same model."
            )
    missing_rewards = sum(r.initial_rewards is None or r.final_rewards is None for r in records)
    if missing_rewards:
        logger.warning("Skipped %d record(s) without initial_rewards or final_rewards.", missing_rewards)

    samples: list[tuple[str, str, str, int, PreferencePair]] = []
    if case_type == "successfully_attacked":
        for record in records:
            if attacked(record, reward_threshold):
                kind = record.attack_type or "unknown"
                samples.append((record.case_id, kind, "original", 0, record.original))
                samples.append((record.case_id, kind, "perturbed", 1, record.perturbed))
        if not samples:
            raise DetectionError(
                f"None of the {len(records)} records is a successful perturbation (initial gap > {reward_threshold}, "
                f"final gap <= {-reward_threshold}), so there is nothing to detect. Perturb more pairs or lower reward_threshold."
            )
        return samples

    originals: dict[str, PerturbationRecord] = {}
    for record in records:
        if record.initial_rewards is not None and math.isfinite(record.initial_rewards["diff"]):
            originals.setdefault(record.case_id, record)
    if not originals:
        raise DetectionError(f"None of the {len(records)} records has a finite initial reward gap, so no original pair can be labelled.")
    for case_id, record in originals.items():
        label = int(record.initial_rewards["diff"] <= reward_threshold)
        samples.append((case_id, "original", "original", label, record.original))
    labels = np.array([sample[3] for sample in samples])
    if balance and len(set(labels.tolist())) == 2:
        rng = np.random.default_rng(seed)
        smaller = min((labels == 0).sum(), (labels == 1).sum())
        keep = np.concatenate([rng.choice(np.flatnonzero(labels == label), smaller, replace=False) for label in (0, 1)])
        samples = [samples[index] for index in sorted(keep)]
    return samples


def build_detection_data(
    reward_model,
    records: Sequence[PerturbationRecord],
    *,
    layer: int,
    sae=None,
    feature_types: Sequence[str] = FEATURE_TYPES,
    case_type: str = "successfully_attacked",
    reward_threshold: float = 0.0,
    balance: bool = True,
    pooling: str = "mean",
    seed: int = 0,
    batch_size: int = 16,
    cache=None,
    progress: bool = True,
) -> DetectionData:
    """Score every sample's pair once and return ``|f(chosen) - f(rejected)|`` per feature type.

    Features come from :meth:`RewardModel.score_pairs`, so with ``cache`` each text runs through the
    RM once across stages. ``sae`` is required for the ``sae`` feature type.
    """
    feature_types = [feature_types] if isinstance(feature_types, str) else list(dict.fromkeys(feature_types))
    unknown = [name for name in feature_types if name not in FEATURE_TYPES]
    if unknown or not feature_types:
        raise DetectionError(f"feature_types must be some of {FEATURE_TYPES}, got {list(feature_types)!r}.")
    if "sae" in feature_types:
        if sae is None:
            raise DetectionError("Feature type 'sae' needs an SAE; pass sae= (or use feature_types=['raw']).")
        if sae.layer != layer:
            raise DetectionError(f"The SAE reads layer {sae.layer}, but detection runs at layer {layer}; load the SAE of layer {layer}.")
    samples = detection_samples(
        records, case_type=case_type, reward_threshold=reward_threshold, balance=balance, seed=seed, model=reward_model.spec.tag
    )
    pairs = [sample[4] for sample in samples]
    scores = reward_model.score_pairs(
        pairs,
        layers=[layer] if "raw" in feature_types else [],
        saes=[sae] if "sae" in feature_types else [],
        poolings=[pooling],
        batch_size=batch_size,
        cache=cache,
        progress=progress,
        description="detection features",
    )
    features = {}
    for name in feature_types:
        if name == "sae":
            chosen, rejected = scores.chosen.codes(sae, pooling), scores.rejected.codes(sae, pooling)
        else:
            chosen, rejected = scores.chosen.pooled[(layer, pooling)], scores.rejected.pooled[(layer, pooling)]
        features[name] = np.abs(chosen - rejected).astype(np.float32)
    data = DetectionData(
        case_ids=np.array([s[0] for s in samples]),
        attack_types=np.array([s[1] for s in samples]),
        variants=np.array([s[2] for s in samples]),
        labels=np.array([s[3] for s in samples], dtype=np.int64),
        features=features,
    )
    logger.info("Detection data: %d samples from %d cases at layer %d.", len(data), len(set(data.case_ids)), layer)
    return data


# ---------------------------------------------------------------------------------------------
# Splits


@dataclass
class SplitManifest:
    """The side (train, validation, test) of each unit.

    ``mode="grouped"``: the unit is the case id, and cases are stratified by the set of perturbation
    types they were attacked with. ``mode="ungrouped"`` (the authors'): the unit is the sample,
    stratified by label, so a case's original and perturbed pairs can sit on different sides.
    """

    mode: str
    seed: int
    test_ratio: float
    validation_ratio: float
    assignments: dict[str, str]
    model: str | None = None

    def sides(self, data: DetectionData) -> np.ndarray:
        """Return each sample's side; a unit the manifest does not know is an error."""
        units = data.case_ids if self.mode == "grouped" else data.units
        unknown = sorted({str(unit) for unit in units if unit not in self.assignments})
        if unknown:
            raise DetectionError(
                f"{len(unknown)} sample(s) are not in the split manifest (first: {unknown[0]}); the perturbation "
                "records changed since the split was made. Rerun the detection stage to write a new split."
            )
        return np.array([self.assignments[unit] for unit in units])

    def covers(self, data: DetectionData) -> bool:
        units = set((data.case_ids if self.mode == "grouped" else data.units).tolist())
        return units == set(self.assignments)

    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "seed": self.seed, "test_ratio": self.test_ratio, "validation_ratio": self.validation_ratio,
                "model": self.model}

    def as_dict(self) -> dict[str, Any]:
        counts = {side: sum(1 for value in self.assignments.values() if value == side) for side in SIDES}
        return {**self.settings(), "units": "case" if self.mode == "grouped" else "sample", "counts": counts,
                "assignments": dict(sorted(self.assignments.items()))}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.as_dict())

    @classmethod
    def load(cls, path: str | Path) -> "SplitManifest":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"The split manifest {path} does not exist; the detection stage writes it (`rmsae run --profile PROFILE --models MODEL --layers LAYER --stages detection`).") from None
        except json.JSONDecodeError as error:
            raise DetectionError(f"The split manifest {path} is not valid JSON ({error}); delete it and rerun detection (`rmsae run --profile PROFILE --models MODEL --layers LAYER --stages detection --force`).") from None
        if not isinstance(raw, dict):
            raise DetectionError(f"The split manifest {path} must contain a JSON object, got {type(raw).__name__}; delete it and rerun detection (`rmsae run --profile PROFILE --models MODEL --layers LAYER --stages detection --force`).")
        missing = [key for key in ("mode", "seed", "test_ratio", "validation_ratio", "assignments") if key not in raw]
        if missing:
            raise DetectionError(f"The split manifest {path} lacks {', '.join(missing)}; delete it and rerun detection (`rmsae run --profile PROFILE --models MODEL --layers LAYER --stages detection --force`).")
        assignments = raw["assignments"]
        numbers_ok = all(isinstance(raw[key], (int, float)) and not isinstance(raw[key], bool) for key in ("seed", "test_ratio", "validation_ratio"))
        if not isinstance(assignments, dict) or not numbers_ok or not isinstance(raw.get("model"), (str, type(None))):
            raise DetectionError(
                f"The split manifest {path} is malformed (assignments must be an object, seed and ratios numbers, model text); "
                "delete it and rerun detection (`rmsae run --profile PROFILE --models MODEL --layers LAYER --stages detection --force`)."
            )
        bad = sorted({str(side) for side in assignments.values() if side not in SIDES})
        if raw["mode"] not in SPLIT_MODES or bad:
            raise DetectionError(f"The split manifest {path} has mode {raw['mode']!r} or sides {bad}; expected {SPLIT_MODES} and {SIDES}.")
        return cls(raw["mode"], int(raw["seed"]), float(raw["test_ratio"]), float(raw["validation_ratio"]), dict(assignments),
                   raw.get("model"))


def _check_ratios(test_ratio: float, validation_ratio: float) -> None:
    for name, value in (("test_ratio", test_ratio), ("validation_ratio", validation_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise DetectionError(f"{name} must be a number between 0 and 1, got {value!r}.")
    if test_ratio + validation_ratio >= 1:
        raise DetectionError(f"test_ratio + validation_ratio must leave cases to train on, got {test_ratio} + {validation_ratio}.")


def _allocate(units: list[str], rng: np.random.Generator, test_ratio: float, validation_ratio: float) -> dict[str, str]:
    units = [units[index] for index in rng.permutation(len(units))]
    n_test = int(round(len(units) * test_ratio))
    n_validation = int(round(len(units) * validation_ratio))
    if len(units) - n_test - n_validation < 1:  # tiny strata keep at least one unit to train on
        n_test, n_validation = max(0, len(units) - 1 - n_validation), min(n_validation, len(units) - 1)
    sides = ["test"] * n_test + ["validation"] * n_validation + ["train"] * (len(units) - n_test - n_validation)
    return dict(zip(units, sides))


def make_split(
    data: DetectionData,
    *,
    mode: str = "grouped",
    test_ratio: float = 0.3,
    validation_ratio: float = 0.15,
    seed: int = 0,
    model: str | None = None,
) -> SplitManifest:
    """Split seeded and stratified: by case (grouped) or by sample (the authors' ungrouped split).

    ``model`` records whose perturbation records were split, so a later stage can refuse a manifest
    of another model.
    """
    if mode not in SPLIT_MODES:
        raise DetectionError(f"mode must be one of {SPLIT_MODES}, got {mode!r}.")
    _check_ratios(test_ratio, validation_ratio)
    if len(data) == 0:
        raise DetectionError("There are no samples to split.")
    rng = np.random.default_rng(seed)
    if mode == "grouped":
        kinds: dict[str, set[str]] = {}
        for case, kind in zip(data.case_ids.tolist(), data.attack_types.tolist()):
            kinds.setdefault(case, set()).add(kind)
        strata: dict[str, list[str]] = {}
        for case in sorted(kinds):
            strata.setdefault("+".join(sorted(kinds[case])), []).append(case)
    else:
        strata = {}
        for unit, label in sorted(zip(data.units.tolist(), data.labels.tolist())):
            strata.setdefault(str(label), []).append(unit)
    assignments: dict[str, str] = {}
    for stratum in sorted(strata):
        assignments.update(_allocate(strata[stratum], rng, test_ratio, validation_ratio))
    return SplitManifest(mode, seed, float(test_ratio), float(validation_ratio), assignments, model)


def load_or_make_split(path: str | Path, data: DetectionData, **settings: Any) -> SplitManifest:
    """Reuse the manifest at ``path`` when it has these settings and covers exactly these samples, else write a new one."""
    path = Path(path)
    fresh = make_split(data, **settings)
    if path.is_file():
        try:
            saved = SplitManifest.load(path)
        except DetectionError as error:
            logger.warning("%s Writing a new split.", error)
        else:
            if saved.settings() == fresh.settings() and saved.covers(data):
                return saved
            logger.warning("The split manifest %s has other settings or samples, so a new one replaces it.", path)
    fresh.save(path)
    return fresh


# ---------------------------------------------------------------------------------------------
# Detectors


def _check_features(X: Any, name: str = "X") -> np.ndarray:
    array = np.asarray(X, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise DetectionError(f"{name} must be a non-empty 2-D array (samples x features), got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise DetectionError(f"{name} contains NaN or infinite values; check the features.")
    return array


def _check_labels(y: Any, n: int, name: str = "y") -> np.ndarray:
    labels = np.asarray(y)
    if labels.shape != (n,):
        raise DetectionError(f"{name} must have one label per sample ({n}), got shape {labels.shape}.")
    if not np.isin(labels, (0, 1)).all():
        raise DetectionError(f"{name} must hold labels 0 (benign) and 1 (perturbed), got {sorted(set(labels.tolist()))[:5]}.")
    labels = labels.astype(np.int64)
    if len(np.unique(labels)) < 2:
        raise DetectionError(
            f"{name} contains only label {int(labels[0])}; a detector needs benign and perturbed samples to learn from."
        )
    return labels


class MLPDetector(ClassifierMixin, BaseEstimator):
    """The paper's detector: Linear, BatchNorm, ReLU, Dropout per hidden layer, then one logit.

    Trained with binary cross-entropy and Adam. Early stopping (``patience`` epochs) and learning-rate
    decay (``ReduceLROnPlateau``) watch the validation loss, and the best epoch's weights are the ones
    kept. ``monitor="training"`` with ``restore_best=False`` is the authors' behaviour: both watch the
    training loss and the last epoch's weights are kept.

    Without a ``validation`` set, ``fit`` holds out ``validation_fraction`` of ``X``, stratified.
    """

    def __init__(
        self,
        hidden_dims: Sequence[int] = (128,),
        dropout: float = 0.3,
        learning_rate: float = 1e-3,
        batch_size: int = 32,
        max_epochs: int = 100,
        patience: int = 10,
        lr_patience: int = 5,
        lr_factor: float = 0.5,
        validation_fraction: float = 0.15,
        monitor: str = "validation",
        restore_best: bool = True,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        self.hidden_dims = hidden_dims
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.lr_patience = lr_patience
        self.lr_factor = lr_factor
        self.validation_fraction = validation_fraction
        self.monitor = monitor
        self.restore_best = restore_best
        self.seed = seed
        self.device = device

    def _check_settings(self) -> None:
        for name, minimum in (("batch_size", 2), ("max_epochs", 1), ("patience", 1), ("lr_patience", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                # Batch normalisation needs at least two samples per training batch.
                raise DetectionError(f"{name} must be an integer of at least {minimum}, got {value!r}.")
        dims = [self.hidden_dims] if isinstance(self.hidden_dims, numbers.Integral) else self.hidden_dims
        if (isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__") or not list(dims)
                or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dims)):
            raise DetectionError(f"hidden_dims must be a list of positive integers such as [128], got {self.hidden_dims!r}.")
        for name, value, low, high in (("dropout", self.dropout, 0.0, 1.0), ("lr_factor", self.lr_factor, 0.0, 1.0),
                                       ("validation_fraction", self.validation_fraction, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value < high or (name != "dropout" and value == 0):
                raise DetectionError(f"{name} must be a number in {'[' if name == 'dropout' else '('}{low}, {high}), got {value!r}.")
        if isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, numbers.Real) or not self.learning_rate > 0:
            raise DetectionError(f"learning_rate must be a number > 0, got {self.learning_rate!r}.")
        if self.monitor not in ("validation", "training"):
            raise DetectionError(f"monitor must be 'validation' or 'training', got {self.monitor!r}.")

    def _build(self, n_features: int) -> torch.nn.Module:
        layers: list[torch.nn.Module] = []
        width = n_features
        dims = [self.hidden_dims] if isinstance(self.hidden_dims, numbers.Integral) else self.hidden_dims
        for hidden in dims:
            hidden = int(hidden)
            layers += [torch.nn.Linear(width, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(), torch.nn.Dropout(float(self.dropout))]
            width = hidden
        layers.append(torch.nn.Linear(width, 1))
        return torch.nn.Sequential(*layers)

    def _batches(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        order = torch.randperm(n, generator=generator)
        batches = list(order.split(self.batch_size))
        if len(batches) > 1 and len(batches[-1]) == 1:  # BatchNorm cannot train on a batch of one
            last = batches.pop()
            batches[-1] = torch.cat([batches[-1], last])
        return batches

    def _loss(self, X: torch.Tensor, y: torch.Tensor) -> float:
        self.model_.eval()
        with torch.no_grad():
            return float(torch.nn.functional.binary_cross_entropy_with_logits(self.model_(X).squeeze(1), y))

    def fit(self, X: Any, y: Any, validation: tuple[Any, Any] | None = None) -> "MLPDetector":
        """Train on ``(X, y)``; ``validation=(X_val, y_val)`` is the set the early stopping watches."""
        self._check_settings()
        X = _check_features(X)
        y = _check_labels(y, len(X))
        if validation is None and self.monitor == "validation":
            from sklearn.model_selection import train_test_split

            n_held_out = math.ceil(self.validation_fraction * len(y))
            if min(np.bincount(y)) < 2 or n_held_out < 2 or len(y) - n_held_out < 2:
                raise DetectionError(
                    f"Holding out {self.validation_fraction:.0%} of {len(y)} samples for validation leaves too few on one side; "
                    "pass validation=(X_val, y_val), or use more cases."
                )
            X, X_val, y, y_val = train_test_split(X, y, test_size=n_held_out, stratify=y, random_state=self.seed)
        elif validation is not None:
            X_val = _check_features(validation[0], "X_val")
            y_val = np.asarray(validation[1])
            if X_val.shape[1] != X.shape[1] or y_val.shape != (len(X_val),) or not np.isin(y_val, (0, 1)).all():
                raise DetectionError(
                    f"The validation set must have {X.shape[1]} features and one 0/1 label per sample, got "
                    f"X_val {X_val.shape} and y_val {y_val.shape}."
                )
            y_val = y_val.astype(np.int64)
        else:
            X_val, y_val = X, y
        if len(X) < 2:
            raise DetectionError(f"A detector needs at least two training samples, got {len(X)}.")

        # Seed initial weights and dropout without changing the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._train(X, y, X_val, y_val)
        return self

    def _train(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        device = torch.device(self.device)
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.array([0, 1])
        self.model_ = self._build(X.shape[1]).to(device)
        optimiser = torch.optim.Adam(self.model_.parameters(), lr=self.learning_rate)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="min", factor=self.lr_factor, patience=self.lr_patience)
        X_train, y_train = torch.from_numpy(X).to(device), torch.from_numpy(y).float().to(device)
        X_check, y_check = torch.from_numpy(X_val).to(device), torch.from_numpy(y_val).float().to(device)

        self.history_: list[dict[str, float]] = []
        best_loss, best_state, best_epoch, stale = math.inf, None, 0, 0
        for epoch in range(1, self.max_epochs + 1):
            self.model_.train()
            total = 0.0
            for batch in self._batches(len(X_train), generator):
                optimiser.zero_grad()
                logits = self.model_(X_train[batch]).squeeze(1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_train[batch])
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(batch)
            train_loss = total / len(X_train)
            validation_loss = self._loss(X_check, y_check)
            watched = validation_loss if self.monitor == "validation" else train_loss
            self.history_.append({"epoch": epoch, "train_loss": train_loss, "validation_loss": validation_loss,
                                  "learning_rate": optimiser.param_groups[0]["lr"]})
            scheduler.step(watched)
            if watched < best_loss:
                best_loss, best_epoch, stale = watched, epoch, 0
                best_state = copy.deepcopy(self.model_.state_dict())  # a copy, not a view of the live weights
            else:
                stale += 1
                if stale >= self.patience:
                    break
        self.n_epochs_ = len(self.history_)
        self.best_epoch_ = best_epoch
        self.best_loss_ = best_loss
        if self.restore_best and best_state is not None:
            self.model_.load_state_dict(best_state)
        self.model_.eval()

    def decision_function(self, X: Any) -> np.ndarray:
        """Return the logit of "perturbed" per sample."""
        if not hasattr(self, "model_"):
            raise DetectionError("This detector is not fitted yet; call fit first.")
        X = _check_features(X)
        if X.shape[1] != self.n_features_in_:
            raise DetectionError(f"X has {X.shape[1]} features, but the detector was fitted on {self.n_features_in_}.")
        self.model_.eval()
        with torch.no_grad():
            return self.model_(torch.from_numpy(X).to(torch.device(self.device))).squeeze(1).cpu().numpy().astype(np.float64)

    def predict_proba(self, X: Any) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.stack([1 - p, p], axis=1)

    def predict(self, X: Any) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] > 0.5).astype(np.int64)


def logistic_baseline(seed: int = 0):
    """Logistic regression on standardised features: the linear baseline beside the MLP."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))


# ---------------------------------------------------------------------------------------------
# Metrics


METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")


def _metric_rows(
    weights: np.ndarray, y: np.ndarray, predicted: np.ndarray, comparison: np.ndarray, within: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Compute each metric for each row of sample weights (one row per bootstrap resample).

    ``within`` = (group weights, per-group sums of ``comparison`` and of positive × negative counts):
    a group drawn k times counts its own positive-negative comparisons k times rather than k², so
    that they keep the share they have in the point estimate.
    """
    tp = weights @ ((predicted == 1) & (y == 1))
    fp = weights @ ((predicted == 1) & (y == 0))
    fn = weights @ ((predicted == 0) & (y == 1))
    total = weights.sum(axis=1)
    correct = weights @ (predicted == y)
    positive, negative = weights[:, y == 1], weights[:, y == 0]
    concordant = np.einsum("rp,pn,rn->r", positive, comparison, negative)
    pair_mass = positive.sum(axis=1) * negative.sum(axis=1)
    if within is not None:
        group_weights, (group_concordant, group_pairs) = within
        excess = group_weights**2 - group_weights
        concordant = concordant - excess @ group_concordant
        pair_mass = pair_mass - excess @ group_pairs
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        auc = np.where(pair_mass > 0, concordant / pair_mass, np.nan)
    return {"accuracy": correct / total, "precision": precision, "recall": recall, "f1": f1, "roc_auc": auc}


def detection_metrics(
    y_true: Any,
    probabilities: Any,
    *,
    groups: Any = None,
    threshold: float = 0.5,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and ROC AUC (positive class: perturbed) with bootstrap intervals.

    With ``groups`` (case ids), the bootstrap resamples whole cases, because a case's two samples are
    not independent. ``roc_auc`` is NaN when only one label is present. Also returns the confusion
    matrix ``[[tn, fp], [fn, tp]]`` and the sample count.
    """
    y = np.asarray(y_true)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape or len(y) == 0:
        raise DetectionError(f"y_true and probabilities must be 1-D and of the same non-zero length, got {y.shape} and {p.shape}.")
    if not np.isin(y, (0, 1)).all():
        raise DetectionError(f"y_true must hold labels 0 (benign) and 1 (perturbed), got {sorted(set(y.tolist()))[:5]}.")
    if not np.isfinite(p).all():
        raise DetectionError("probabilities contain NaN or infinite values; check the detector's output.")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, numbers.Integral) or n_resamples < 1:
        raise DetectionError(f"n_resamples must be a positive integer, got {n_resamples!r}.")
    if not 0 < level < 1:
        raise DetectionError(f"level must be between 0 and 1, got {level!r}.")
    y = y.astype(np.int64)
    predicted = (p > threshold).astype(np.int64)
    positive, negative = p[y == 1], p[y == 0]
    comparison = (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])

    point = {name: float(values[0]) for name, values in _metric_rows(np.ones((1, len(y))), y, predicted, comparison).items()}
    rng = np.random.default_rng(seed)
    within = None
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != y.shape:
            raise DetectionError(f"groups must name the case of each sample ({len(y)}), got shape {groups.shape}.")
        group_index = np.unique(groups, return_inverse=True)[1]
        n_groups = int(group_index.max()) + 1
        same = group_index[y == 1][:, None] == group_index[y == 0][None, :]
        group_of_pair = np.broadcast_to(group_index[y == 1][:, None], same.shape)[same]
        group_sums = (np.bincount(group_of_pair, weights=comparison[same], minlength=n_groups),
                      np.bincount(group_of_pair, minlength=n_groups).astype(float))
    else:
        group_index, n_groups = np.arange(len(y)), len(y)
    drawn = rng.integers(0, n_groups, size=(n_resamples, n_groups))
    counts = np.zeros((n_resamples, n_groups))
    np.add.at(counts, (np.repeat(np.arange(n_resamples), n_groups), drawn.ravel()), 1.0)
    if groups is not None:
        within = (counts, group_sums)
    resampled = _metric_rows(counts[:, group_index], y, predicted, comparison, within)
    tail = (1 - level) / 2 * 100
    result: dict[str, Any] = {"n": int(len(y))}
    for name in METRICS:
        values = resampled[name][np.isfinite(resampled[name])]
        low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (np.nan, np.nan)
        result.update({name: point[name], f"{name}_low": float(low), f"{name}_high": float(high)})
    tn = int(((predicted == 0) & (y == 0)).sum())
    fp = int(((predicted == 1) & (y == 0)).sum())
    fn = int(((predicted == 0) & (y == 1)).sum())
    tp = int(((predicted == 1) & (y == 1)).sum())
    result["confusion_matrix"] = [[tn, fp], [fn, tp]]
    return result


# ---------------------------------------------------------------------------------------------
# Experiments


def _sides(data: DetectionData, manifest: SplitManifest) -> dict[str, np.ndarray]:
    sides = manifest.sides(data)
    return {side: sides == side for side in SIDES}


def fit_detector(
    data: DetectionData,
    manifest: SplitManifest,
    feature_type: str,
    *,
    kind: str = "mlp",
    detector_params: Mapping[str, Any] | None = None,
    train_mask: np.ndarray | None = None,
):
    """Fit an MLP (validated on the validation side) or the logistic baseline (on train and validation)."""
    if feature_type not in data.features:
        raise DetectionError(f"The data hold no {feature_type!r} features; they have {sorted(data.features)}.")
    masks = _sides(data, manifest)
    train, validation = masks["train"], masks["validation"]
    if train_mask is not None:
        train, validation = train & train_mask, validation & train_mask
    X, y = data.features[feature_type], data.labels
    for name, mask in (("training", train), ("validation", validation)):
        present = set(y[mask].tolist())
        if kind == "mlp" and present != {0, 1} and name == "training":
            raise DetectionError(f"The {name} side contains labels {sorted(present)} only; a detector needs both.")
    if kind == "logistic":
        both = train | validation
        if set(y[both].tolist()) != {0, 1}:
            raise DetectionError("The training and validation sides hold one label only; the baseline needs both.")
        return logistic_baseline(manifest.seed).fit(X[both], y[both])
    if kind != "mlp":
        raise DetectionError(f"kind must be 'mlp' or 'logistic', got {kind!r}.")
    detector = MLPDetector(**{"seed": manifest.seed, **dict(detector_params or {})})
    has_validation = set(y[validation].tolist()) == {0, 1}
    if detector.monitor == "validation" and not has_validation:
        logger.warning("The validation side lacks a label, so the detector holds out part of the training side instead.")
    return detector.fit(X[train], y[train], validation=(X[validation], y[validation]) if has_validation else None)


def evaluate_detector(
    detector, data: DetectionData, manifest: SplitManifest, feature_type: str, *, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Metrics on the test side, overall and per perturbation type, plus each test sample's probability."""
    test = _sides(data, manifest)["test"]
    if not test.any():
        raise DetectionError("The test side of the split is empty; lower validation_ratio or perturb more pairs.")
    subset = data.subset(test)
    probabilities = detector.predict_proba(subset.features[feature_type])[:, 1]
    overall = detection_metrics(subset.labels, probabilities, groups=subset.case_ids, n_resamples=n_resamples, seed=seed)
    per_type = {}
    for kind in sorted(set(subset.attack_types.tolist())):
        mask = subset.attack_types == kind
        per_type[kind] = detection_metrics(
            subset.labels[mask], probabilities[mask], groups=subset.case_ids[mask], n_resamples=n_resamples, seed=seed
        )
    samples = [
        {"case_id": case, "attack_type": kind, "variant": variant, "label": int(label), "probability": float(p)}
        for case, kind, variant, label, p in zip(subset.case_ids, subset.attack_types, subset.variants, subset.labels, probabilities)
    ]
    return {"overall": overall, "per_type": per_type, "samples": samples}


def transfer_matrix(
    data: DetectionData,
    manifest: SplitManifest,
    feature_type: str,
    *,
    detector_params: Mapping[str, Any] | None = None,
    min_cases: int = 5,
) -> dict[str, dict[str, float]]:
    """ROC AUC of a detector trained on one perturbation type's training cases, on each type's test cases.

    Types with fewer than ``min_cases`` training cases are not trained on (their row is NaN).
    """
    sides = manifest.sides(data)
    kinds = sorted(set(data.attack_types.tolist()))
    matrix: dict[str, dict[str, float]] = {}
    for source in kinds:
        matrix[source] = {target: math.nan for target in kinds}
        own = data.attack_types == source
        if len(set(data.case_ids[own & (sides == "train")].tolist())) < min_cases:
            logger.info("Transfer: %s has fewer than %d training cases; its row stays empty.", source, min_cases)
            continue
        detector = fit_detector(data, manifest, feature_type, detector_params=detector_params, train_mask=own)
        for target in kinds:
            mask = (data.attack_types == target) & (sides == "test")
            if len(set(data.labels[mask].tolist())) == 2:
                probabilities = detector.predict_proba(data.features[feature_type][mask])[:, 1]
                matrix[source][target] = detection_metrics(data.labels[mask], probabilities, n_resamples=1)["roc_auc"]
    return matrix


def run_detection(
    data: DetectionData,
    manifest: SplitManifest,
    *,
    feature_types: Iterable[str] | None = None,
    detector_params: Mapping[str, Any] | None = None,
    baseline: bool = True,
    transfer: bool = True,
    n_resamples: int = 1000,
) -> dict[str, Any]:
    """Fit and evaluate the MLP detector (and the logistic baseline) per feature type on one split."""
    results: dict[str, Any] = {"split": manifest.as_dict()["counts"], "split_mode": manifest.mode}
    for feature_type in feature_types or list(data.features):
        detector = fit_detector(data, manifest, feature_type, detector_params=detector_params)
        entry = evaluate_detector(detector, data, manifest, feature_type, n_resamples=n_resamples, seed=manifest.seed)
        entry["training"] = {"epochs": detector.n_epochs_, "best_epoch": detector.best_epoch_,
                             "best_loss": detector.best_loss_, "history": detector.history_}
        if baseline:
            logistic = fit_detector(data, manifest, feature_type, kind="logistic")
            entry["logistic"] = evaluate_detector(logistic, data, manifest, feature_type, n_resamples=n_resamples, seed=manifest.seed)
            entry["logistic"].pop("samples")
        if transfer:
            entry["transfer"] = transfer_matrix(data, manifest, feature_type, detector_params=detector_params)
        results[feature_type] = entry
    return results
