"""Loading and validating SAELens sparse autoencoders for a reward model's residual stream.

A checkpoint is a folder holding ``cfg.json`` and ``sae_weights.safetensors`` in the SAELens
layout. The authors' released SAEs live in the hub repo ``Shunchang/sae-rm-checkpoints`` in
subfolders ``<tag>_layer<L>``, and their scripts take the folder from the environment variable
``SAE_CHECKPOINT``. The SAE math is SAELens's own (``SAE.load_from_disk`` dispatches on
``cfg.json["architecture"]``); this module only finds, checks, encodes per token and pools.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .storage import fingerprint_file, sha256_json

logger = logging.getLogger(__name__)

SAE_CHECKPOINT_ENV = "SAE_CHECKPOINT"
RELEASED_SAE_REPO = "Shunchang/sae-rm-checkpoints"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"

# Block-list patterns in hook names: "model.layers.12", "blocks.12.hook_resid_post", "encoder.layer.3", "h.5".
_HOOK_LAYER = re.compile(r"(?:layers|blocks|layer|h)\.(\d+)(?:\.|$)")
_FOLDER_LAYER = re.compile(r"_layer(\d+)$")
# normalize_activations values that SAELens applies itself at inference time.
_RUNTIME_NORMALISATIONS = ("none", "constant_norm_rescale", "layer_norm")


class SAECheckpointError(ValueError):
    """An SAE checkpoint is missing, malformed, or does not fit the reward model it is used with."""


@dataclass(frozen=True)
class SAEInfo:
    """Fields of an SAE checkpoint's ``cfg.json``, read without loading its weights."""

    path: Path
    architecture: str
    d_in: int
    d_sae: int
    hook_name: str | None
    layer: int | None
    layer_source: str
    model_name: str | None
    normalize_activations: str
    has_scaler_file: bool
    dtype: str
    metadata: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "hook_name": self.hook_name,
            "layer": self.layer,
            "layer_source": self.layer_source,
            "model_name": self.model_name,
            "normalize_activations": self.normalize_activations,
            "dtype": self.dtype,
        }


def resolve_sae_path(
    path: str | os.PathLike | None = None,
    *,
    subfolder: str | None = None,
    repo_id: str = RELEASED_SAE_REPO,
    revision: str | None = None,
) -> Path:
    """Return the local folder of an SAE checkpoint.

    Order: ``path``, else ``$SAE_CHECKPOINT``; either may be the checkpoint folder itself or a folder
    of checkpoints combined with ``subfolder``. With neither set, ``subfolder`` is downloaded from
    the hub repo ``repo_id``.
    """
    base = path if path is not None and str(path) != "" else os.environ.get(SAE_CHECKPOINT_ENV) or None
    if base is not None:
        folder = Path(base).expanduser()
        if subfolder and not (folder / CFG_FILE).is_file():
            folder = folder / subfolder
        if not folder.is_dir():
            origin = "path" if path else f"${SAE_CHECKPOINT_ENV}"
            raise SAECheckpointError(f"SAE checkpoint folder {folder} (from {origin}) does not exist.")
        return folder
    if not subfolder:
        raise SAECheckpointError(
            f"No SAE checkpoint given: pass a path, set {SAE_CHECKPOINT_ENV}, or name a subfolder "
            f"such as 'llama-3-8b_layer12' of the hub repo {repo_id}."
        )
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{subfolder}/*"])
    except Exception as error:  # offline or unknown repo
        raise SAECheckpointError(
            f"Could not download {subfolder} from {repo_id} ({type(error).__name__}: {error}). Offline, "
            f"download the checkpoint elsewhere and set {SAE_CHECKPOINT_ENV} to its folder."
        ) from error
    folder = Path(root) / subfolder
    if not (folder / CFG_FILE).is_file():
        raise SAECheckpointError(f"{repo_id} has no subfolder {subfolder!r} holding {CFG_FILE}.")
    return folder


def read_sae_info(path: str | os.PathLike) -> SAEInfo:
    """Read and check ``cfg.json`` of an SAE checkpoint folder."""
    folder = Path(path)
    cfg_path = folder / CFG_FILE
    if not folder.is_dir():
        raise SAECheckpointError(f"SAE checkpoint folder {folder} does not exist or is not a folder.")
    if not cfg_path.is_file():
        raise SAECheckpointError(f"{folder} is not an SAE checkpoint: {CFG_FILE} is missing.")
    if not (folder / WEIGHTS_FILE).is_file():
        raise SAECheckpointError(f"{folder} is not an SAE checkpoint: {WEIGHTS_FILE} is missing.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as error:
        raise SAECheckpointError(
            f"{cfg_path}: invalid JSON ({error.msg} at line {error.lineno}); restore the file from the checkpoint's source."
        ) from error
    if not isinstance(cfg, dict):
        raise SAECheckpointError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}.")

    from sae_lens.registry import SAE_CLASS_REGISTRY

    architecture = cfg.get("architecture", "standard")
    if architecture not in SAE_CLASS_REGISTRY:
        raise SAECheckpointError(
            f"{cfg_path}: unknown SAE architecture {architecture!r}; this SAELens version supports "
            f"{sorted(SAE_CLASS_REGISTRY)}."
        )
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] < 1:
            raise SAECheckpointError(f"{cfg_path}: field {key!r} must be a positive integer, got {cfg.get(key)!r}.")

    _check_weights(folder, cfg["d_in"], cfg["d_sae"])

    metadata = cfg.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise SAECheckpointError(f"{cfg_path}: field 'metadata' must be a JSON object, got {metadata!r}.")
    hook_name = metadata.get("hook_name") or cfg.get("hook_name")
    if hook_name is not None and not isinstance(hook_name, str):
        raise SAECheckpointError(f"{cfg_path}: the hook name must be a string such as 'blocks.12.hook_resid_post', got {hook_name!r}.")
    layer, layer_source = None, "unknown"
    if metadata.get("layer") is not None:
        layer = metadata["layer"]
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise SAECheckpointError(f"{cfg_path}: field 'metadata.layer' must be a non-negative integer, got {layer!r}.")
        layer_source = "cfg.json metadata.layer"
    elif hook_name and _HOOK_LAYER.search(hook_name):
        layer, layer_source = int(_HOOK_LAYER.findall(hook_name)[-1]), f"hook name {hook_name!r}"
    elif _FOLDER_LAYER.search(folder.name):
        layer, layer_source = int(_FOLDER_LAYER.search(folder.name).group(1)), f"folder name {folder.name!r}"
    return SAEInfo(
        path=folder,
        architecture=architecture,
        d_in=cfg["d_in"],
        d_sae=cfg["d_sae"],
        hook_name=hook_name,
        layer=layer,
        layer_source=layer_source,
        model_name=metadata.get("model_name") or cfg.get("model_name"),
        normalize_activations=cfg.get("normalize_activations") or "none",
        has_scaler_file=(folder / SCALER_FILE).is_file(),
        dtype=cfg.get("dtype", "float32"),
        metadata=dict(metadata),
    )


# Every SAELens architecture stores these tensors; the others (b_enc, b_gate, threshold, ...) vary.
_COMMON_WEIGHTS = ("W_enc", "W_dec", "b_dec")


def _check_weights(folder: Path, d_in: int, d_sae: int) -> None:
    """Check that the weights file is readable, stores the common SAE tensors, and that W_enc fits cfg.json."""
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = set(handle.keys())
            shape = tuple(handle.get_slice("W_enc").get_shape()) if "W_enc" in stored else None
    except SafetensorError as error:
        raise SAECheckpointError(
            f"{path} cannot be read as a safetensors file ({error}); it may be truncated. Copy or download it again."
        ) from error
    missing = [name for name in _COMMON_WEIGHTS if name not in stored]
    if missing:
        raise SAECheckpointError(
            f"{path} lacks the tensors {missing} that every SAELens SAE stores (it has {sorted(stored)}); "
            "the file is incomplete or not an SAE's weights."
        )
    if shape != (d_in, d_sae):
        raise SAECheckpointError(
            f"{folder}: cfg.json gives d_in={d_in}, d_sae={d_sae}, but the stored W_enc has shape {shape}; "
            "cfg.json and sae_weights.safetensors come from different SAEs."
        )


def normalisation_scaling_factor(info: SAEInfo) -> float | None:
    """Return the scaling factor to fold in at load time, None when there is none; raise if unusable."""
    if info.normalize_activations in _RUNTIME_NORMALISATIONS:
        return None
    if info.normalize_activations != "expected_average_only_in":
        raise SAECheckpointError(
            f"{info.path}: normalize_activations={info.normalize_activations!r} is not supported; "
            f"expected one of {_RUNTIME_NORMALISATIONS + ('expected_average_only_in',)}."
        )
    return _read_scaling_factor(info.path)


def check_sae_fits(info: SAEInfo, *, d_model: int | None, layer: int | None, allow_layer_mismatch: bool = False) -> None:
    """Raise SAECheckpointError when the SAE cannot read the residual stream it is meant for."""
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise TypeError(f"layer must be an integer block index, got {layer!r} ({type(layer).__name__}).")
    if d_model is not None and info.d_in != d_model:
        raise SAECheckpointError(
            f"SAE at {info.path} reads vectors of width d_in={info.d_in}, but the reward model's hidden size is "
            f"{d_model}. Use the SAE trained for this model."
        )
    if layer is not None and info.layer is not None and info.layer != layer and not allow_layer_mismatch:
        raise SAECheckpointError(
            f"SAE at {info.path} was trained on layer {info.layer} (from {info.layer_source}), not layer {layer}. "
            "Use the SAE for this layer (in Python, allow_layer_mismatch=True uses it anyway)."
        )
    if layer is not None and info.layer is None:
        logger.warning("SAE at %s records no layer; assuming it belongs to layer %d.", info.path, layer)


@dataclass
class LoadedSAE:
    """An SAELens SAE with its checkpoint info, the layer it reads and a content fingerprint."""

    sae: Any
    info: SAEInfo
    layer: int
    fingerprint: str

    @property
    def d_sae(self) -> int:
        return self.info.d_sae

    # The SAE runs in its own dtype even inside an autocast region of the reward model's forward.

    @torch.no_grad()
    def encode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Encode per token: (..., d_in) -> (..., d_sae) latent activations, on the SAE's device and in its dtype."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.sae.encode(hidden.to(device=self.sae.device, dtype=self.sae.dtype))

    @torch.no_grad()
    def reconstruct(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return the SAE reconstruction of ``hidden`` on ``hidden``'s device and in its dtype."""
        with torch.autocast(hidden.device.type, enabled=False):
            codes = self.sae.encode(hidden.to(device=self.sae.device, dtype=self.sae.dtype))
            return self.sae.decode(codes).to(device=hidden.device, dtype=hidden.dtype)


def load_sae(
    path: str | os.PathLike | None = None,
    *,
    layer: int | None = None,
    d_model: int | None = None,
    subfolder: str | None = None,
    repo_id: str = RELEASED_SAE_REPO,
    device: str | torch.device = "cpu",
    allow_layer_mismatch: bool = False,
) -> LoadedSAE:
    """Find, check and load an SAE checkpoint with SAELens.

    ``d_model`` and ``layer`` are the reward model's hidden size and the block the SAE will read;
    a mismatch with ``cfg.json`` raises :class:`SAECheckpointError`. An SAE saved with
    ``normalize_activations="expected_average_only_in"`` still unfolded is loaded only when its
    ``activation_scaler.json`` is beside it, and the scaling factor is then folded into the weights.
    """
    folder = resolve_sae_path(path, subfolder=subfolder, repo_id=repo_id)
    info = read_sae_info(folder)
    check_sae_fits(info, d_model=d_model, layer=layer, allow_layer_mismatch=allow_layer_mismatch)

    scaling_factor = normalisation_scaling_factor(info)

    from sae_lens import SAE

    sae = SAE.load_from_disk(folder, device=str(device))
    if scaling_factor is not None:
        sae.fold_activation_norm_scaling_factor(scaling_factor)
        logger.info("%s: folded activation scaling factor %.4g into the SAE weights.", folder, scaling_factor)
    sae.eval()
    fingerprint = sha256_json(
        {"weights": fingerprint_file(folder / WEIGHTS_FILE), "cfg": fingerprint_file(folder / CFG_FILE), "scale": scaling_factor}
    )
    resolved_layer = layer if layer is not None else info.layer
    if resolved_layer is None:
        raise SAECheckpointError(f"{folder}: cfg.json records no layer; pass layer= explicitly.")
    logger.info("Loaded %s SAE %s (d_in %d, d_sae %d, layer %d).", info.architecture, folder, info.d_in, info.d_sae, resolved_layer)
    return LoadedSAE(sae, info, resolved_layer, fingerprint)


def _read_scaling_factor(folder: Path) -> float:
    scaler_path = folder / SCALER_FILE
    if not scaler_path.is_file():
        raise SAECheckpointError(
            f"{folder}: cfg.json sets normalize_activations='expected_average_only_in', but the scaling factor "
            f"was not folded into the weights and {SCALER_FILE} is missing. Save the SAE with "
            "save_inference_model() after training (which folds it), or put the trainer's "
            f"{SCALER_FILE} beside cfg.json."
        )
    try:
        factor = json.loads(scaler_path.read_text()).get("scaling_factor")
    except (json.JSONDecodeError, AttributeError) as error:
        raise SAECheckpointError(f"{scaler_path}: expected a JSON object with 'scaling_factor'.") from error
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
        raise SAECheckpointError(f"{scaler_path}: 'scaling_factor' must be a positive number, got {factor!r}.")
    return float(factor)


@contextmanager
def splice_sae(reward_model, loaded: LoadedSAE) -> Iterator[None]:
    """Replace block ``loaded.layer``'s output with its SAE reconstruction while the context is open.

    Scores computed inside are those of the RM with the SAE spliced in, so they must not go to the
    activation cache; :meth:`RewardModel.score_conversations` refuses a cache while this is active.
    """
    from .hooks import edit_block_output

    with reward_model.intervention(f"sae_splice:{loaded.fingerprint[:12]}@{loaded.layer}"):
        with edit_block_output(reward_model.model, loaded.layer, loaded.reconstruct):
            yield
