"""Loading reward models and scoring texts and pairs, with pooled activations from the same forward.

The reward of a text is read at its last non-padding token (from the attention mask, whatever the
padding side) for decoder models, and from the model's own classification head for encoders.
Activations at layer ``L`` are the output of block ``L``, captured with a forward hook, which equals
``hidden_states[L + 1]``. Scoring is batched over length-sorted inputs under
``torch.inference_mode``. With an :class:`~rmsae.cache.ActivationCache`, a text already scored with
the same namespace is read from disk instead of being run again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .cache import ActivationCache, CachedText
from .data import PreferencePair, Turn
from .formats import INPUT_FORMATS, RenderedText, render
from .hooks import check_layer, edit_block_output, execution_device, find_blocks
from .registry import DTYPES, ModelSpec, get_spec, spec_for_unregistered
from .storage import fingerprint_file, sha256_json, sha256_text
from .tokenization import (
    POOLINGS,
    EncodedText,
    encode_rendered,
    last_token_index,
    masked_mean,
    pad_batch,
    pooling_masks,
)

if TYPE_CHECKING:
    from .sae import LoadedSAE

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model")


class RewardHeadError(RuntimeError):
    """A checkpoint lacks trained reward-head weights, or its head does not output one score."""


@dataclass
class ScoreResult:
    """Rewards and pooled activations for a list of texts, in input order.

    ``pooled[(layer, pooling)]`` is a float32 array of shape (n_texts, hidden_size), and
    ``sae_codes[(sae_fingerprint, pooling)]`` one of shape (n_texts, d_sae): SAE latents encoded per
    token, then pooled. :meth:`codes` looks the latter up by the loaded SAE.
    """

    rewards: np.ndarray
    n_tokens: np.ndarray
    n_truncated: np.ndarray
    response_truncated: np.ndarray
    text_keys: list[str]
    pooled: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    sae_codes: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def codes(self, sae: "LoadedSAE", pooling: str = "mean") -> np.ndarray:
        try:
            return self.sae_codes[(sae.fingerprint, pooling)]
        except KeyError:
            raise KeyError(
                f"No codes of SAE {sae.info.path} with pooling {pooling!r} in this result; "
                "pass the SAE in saes= and the pooling in poolings= when scoring."
            ) from None

    def select(self, rows: slice) -> "ScoreResult":
        """Return the rows ``rows`` of every array."""
        return ScoreResult(
            rewards=self.rewards[rows],
            n_tokens=self.n_tokens[rows],
            n_truncated=self.n_truncated[rows],
            response_truncated=self.response_truncated[rows],
            text_keys=self.text_keys[rows],
            pooled={name: values[rows] for name, values in self.pooled.items()},
            sae_codes={name: values[rows] for name, values in self.sae_codes.items()},
        )


@dataclass
class PairScores:
    """Rewards of the chosen and rejected side of each pair, in input order."""

    case_ids: list[str]
    reward_chosen: np.ndarray
    reward_rejected: np.ndarray
    truncated: np.ndarray
    response_truncated: np.ndarray
    chosen: ScoreResult
    rejected: ScoreResult

    @property
    def reward_gap(self) -> np.ndarray:
        return self.reward_chosen - self.reward_rejected

    @property
    def correct(self) -> np.ndarray:
        """True where the chosen response gets the strictly higher reward (ties count as wrong)."""
        return self.reward_gap > 0

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.case_ids) else float("nan")


class RewardModel:
    """A reward model with its tokenizer and spec: renders, tokenises, scores and pools."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        spec: ModelSpec,
        *,
        identity: str,
        autocast_dtype: str | None = None,
    ) -> None:
        if autocast_dtype is not None and autocast_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {autocast_dtype!r}.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.identity = identity
        self.autocast_dtype = autocast_dtype
        self.blocks = find_blocks(model)
        self._interventions: list[str] = []
        # Token masks of the batch being scored, for block edits that act on some tokens only (steering).
        self.token_masks: dict[str, torch.Tensor] | None = None
        if spec.readout == "last_token":
            self._trunk, self._head = _trunk_and_head(model, spec)
            _check_head_width(self._head, spec.tag)

    @property
    def device(self) -> torch.device:
        """Device of the model's inputs: where the input embeddings compute."""
        return execution_device(self.model.get_input_embeddings()) or next(self.model.parameters()).device

    def block_device(self, layer: int) -> torch.device:
        """Device on which block ``layer`` computes (differs from :attr:`device` under a device map)."""
        return execution_device(self.blocks[check_layer(self.model, layer)]) or self.device

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_length(self) -> int:
        return self.spec.max_length

    def cache_namespace(self) -> dict[str, Any]:
        """Return the settings under which two runs' cached values are interchangeable.

        Open interventions are part of it, so scores of a changed forward pass (an SAE splice, a
        steering hook) are cached apart from the model's own.
        """
        namespace = {
            "model": self.identity,
            "input_format": self.spec.input_format,
            "max_length": self.spec.max_length,
            "readout": self.spec.readout,
            "autocast": self.autocast_dtype,
        }
        if self._interventions:
            namespace["interventions"] = list(self._interventions)
        return namespace

    @contextlib.contextmanager
    def intervention(self, name: str):
        """Mark that the forward pass is being changed (SAE splice, steering) while the context is open.

        ``name`` must identify the change completely (method, settings, fingerprint of any weights),
        because it becomes part of :meth:`cache_namespace`: a cache opened outside the context no
        longer matches, and one opened inside holds only scores of this exact change.
        """
        self._interventions.append(name)
        try:
            yield
        finally:
            self._interventions.remove(name)

    # -- inputs -------------------------------------------------------------------------------

    def render(self, turns: Sequence[Turn]) -> RenderedText:
        return render(turns, self.spec.input_format, self.tokenizer)

    def encode(self, rendered: RenderedText) -> EncodedText:
        return encode_rendered(rendered, self.tokenizer, self.spec.max_length)

    @staticmethod
    def text_key(rendered: RenderedText) -> str:
        return sha256_text(f"{rendered.response_start}:{rendered.response_end}:{int(rendered.template_bos)}:{rendered.text}")

    # -- forward ------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_TORCH_DTYPES[self.autocast_dtype])

    @torch.inference_mode()
    def forward_encoded(
        self,
        encoded: list[EncodedText],
        *,
        layers: Sequence[int] = (),
        poolings: Sequence[str] = ("mean",),
        padding_side: str = "right",
        pad_to: int | None = None,
        saes: Sequence["LoadedSAE"] = (),
    ) -> tuple[torch.Tensor, dict[tuple[int, str], torch.Tensor], dict[tuple[str, str], torch.Tensor]]:
        """Run one padded batch; return float32 rewards (batch,), pooled block outputs and pooled SAE codes.

        ``pad_to`` pads every row to at least that many tokens, as the authors' scripts pad each
        text to the length of its pair partner. It changes the work done, not the rewards.
        """
        layers = tuple(check_layer(self.model, layer) for layer in layers)
        pad_id = self.tokenizer.pad_token_id
        input_ids, attention_mask, position_ids, response_mask = pad_batch(encoded, pad_id, padding_side, pad_to)
        device = self.device
        input_ids, attention_mask, position_ids = (t.to(device) for t in (input_ids, attention_mask, position_ids))
        masks = pooling_masks(encoded, attention_mask.cpu(), response_mask, tuple(poolings))
        masks = {name: mask.to(device) for name, mask in masks.items()}

        pooled: dict[tuple[int, str], torch.Tensor] = {}
        sae_codes: dict[tuple[str, str], torch.Tensor] = {}
        saes_by_layer: dict[int, list[LoadedSAE]] = {}
        for sae in saes:
            saes_by_layer.setdefault(check_layer(self.model, sae.layer), []).append(sae)

        def pool_into(layer: int):
            def edit(hidden: torch.Tensor) -> None:
                if layer in layers:
                    for name, mask in masks.items():
                        pooled[(layer, name)] = masked_mean(hidden, mask.to(hidden.device)).cpu()
                for sae in saes_by_layer.get(layer, ()):
                    codes = sae.encode(hidden)
                    for name, mask in masks.items():
                        sae_codes[(sae.fingerprint, name)] = masked_mean(codes, mask.to(codes.device)).cpu()

            return edit

        with contextlib.ExitStack() as stack:
            stack.enter_context(self.batch_token_masks(attention_mask, response_mask))
            for layer in sorted(set(layers) | set(saes_by_layer)):
                stack.enter_context(edit_block_output(self.model, layer, pool_into(layer)))
            with self._autocast():
                rewards = self.differentiable_rewards(input_ids, attention_mask, position_ids)
        return rewards.float().cpu(), pooled, sae_codes

    @contextlib.contextmanager
    def batch_token_masks(self, attention_mask: torch.Tensor, response_mask: torch.Tensor):
        """Expose the token masks of the batch being run as :attr:`token_masks` while the context is open."""
        device = self.device
        self.token_masks = {"all": attention_mask.to(device).bool(), "response": response_mask.to(device)}
        try:
            yield
        finally:
            self.token_masks = None

    def differentiable_rewards(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Return the rewards (batch,) of a padded batch, with gradients when grad mode is on."""
        if self.spec.readout == "head":
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            return logits[:, 0]
        outputs = self._trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        last_hidden = outputs.last_hidden_state
        rows = torch.arange(last_hidden.shape[0], device=last_hidden.device)
        return self._head(last_hidden[rows, last_token_index(attention_mask.to(last_hidden.device))])[:, 0]

    # -- scoring ------------------------------------------------------------------------------

    def score_conversations(
        self,
        conversations: Sequence[Sequence[Turn]],
        *,
        layers: Sequence[int] = (),
        poolings: Sequence[str] = ("mean",),
        batch_size: int = 16,
        padding_side: str = "right",
        cache: ActivationCache | None = None,
        saes: Sequence["LoadedSAE"] = (),
        progress: bool = True,
        description: str = "scoring",
    ) -> ScoreResult:
        """Score conversations (each ending with the assistant response) in length-sorted batches.

        ``layers`` selects pooled hidden states and ``saes`` pooled SAE codes (each SAE reads its own
        ``layer``). With ``cache``, texts already scored are read from disk and new ones are stored.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        unknown = [p for p in poolings if p not in POOLINGS]
        if unknown:
            raise ValueError(f"Unknown pooling(s) {unknown}; expected some of {POOLINGS}.")
        layers = tuple(check_layer(self.model, layer) for layer in layers)
        if cache is not None and cache.namespace != self.cache_namespace():
            raise ValueError(
                "The activation cache belongs to another model, setting or intervention; open it with "
                "ActivationCache(reward_model.cache_namespace()) inside any intervention context."
            )
        for sae in saes:
            if sae.info.d_in != self.hidden_size:
                raise ValueError(
                    f"SAE {sae.info.path} has d_in={sae.info.d_in}, but {self.spec.tag} has hidden size {self.hidden_size}."
                )
        sae_keys = {sae.fingerprint: sae.d_sae for sae in saes}

        rendered = [self.render(turns) for turns in conversations]
        keys = [self.text_key(item) for item in rendered]
        entries: dict[str, CachedText] = (
            cache.get(keys, layers, poolings, sae_keys=tuple(sae_keys)) if cache is not None else {}
        )

        first_index: dict[str, int] = {}
        for index, key in enumerate(keys):
            first_index.setdefault(key, index)
        missing = [key for key in first_index if key not in entries]
        encoded = {key: self.encode(rendered[first_index[key]]) for key in missing}
        missing.sort(key=lambda key: len(encoded[key]), reverse=True)

        if missing:
            logger.info(
                "Scoring %d texts with %s (%d cached, batch size %d).",
                len(missing), self.spec.tag, len(first_index) - len(missing), batch_size,
            )
        bar = tqdm(total=len(missing), desc=description, unit="text", disable=not progress or not missing)
        for start in range(0, len(missing), batch_size):
            batch_keys = missing[start : start + batch_size]
            batch = [encoded[key] for key in batch_keys]
            rewards, pooled, sae_codes = self.forward_encoded(
                batch, layers=layers, poolings=poolings, padding_side=padding_side, saes=saes
            )
            new_entries = {}
            for row, key in enumerate(batch_keys):
                item = encoded[key]
                new_entries[key] = CachedText(
                    reward=float(rewards[row]),
                    n_tokens=len(item),
                    n_truncated=item.n_truncated,
                    response_truncated=item.response_truncated,
                    pooled={name: vectors[row].numpy() for name, vectors in pooled.items()},
                    sae_codes={name: codes[row].numpy() for name, codes in sae_codes.items()},
                )
            if cache is not None:
                cache.put(new_entries)
            entries.update(new_entries)
            bar.update(len(batch_keys))
        bar.close()

        ordered = [entries[key] for key in keys]
        result = ScoreResult(
            rewards=np.array([e.reward for e in ordered], dtype=np.float64),
            n_tokens=np.array([e.n_tokens for e in ordered], dtype=np.int64),
            n_truncated=np.array([e.n_truncated for e in ordered], dtype=np.int64),
            response_truncated=np.array([e.response_truncated for e in ordered], dtype=bool),
            text_keys=keys,
        )
        for layer in layers:
            for pooling in poolings:
                if ordered:
                    result.pooled[(layer, pooling)] = np.stack([e.pooled[(layer, pooling)] for e in ordered])
                else:
                    result.pooled[(layer, pooling)] = np.zeros((0, self.hidden_size), dtype=np.float32)
        for fingerprint, d_sae in sae_keys.items():
            for pooling in poolings:
                key = (fingerprint, pooling)
                if ordered:
                    result.sae_codes[key] = np.stack([e.sae_codes[key] for e in ordered])
                else:
                    result.sae_codes[key] = np.zeros((0, d_sae), dtype=np.float32)
        return result

    @torch.inference_mode()
    def token_activations(
        self,
        conversations: Sequence[Sequence[Turn]],
        layers: Sequence[int],
        *,
        batch_size: int = 16,
        progress: bool = True,
    ) -> dict[int, torch.Tensor]:
        """Return the block outputs at every non-padding token, as (n_tokens, hidden_size) float32 per layer.

        These are the per-token residual-stream vectors an SAE for that layer is trained on.
        """
        layers = tuple(check_layer(self.model, layer) for layer in layers)
        if not layers:
            raise ValueError("token_activations needs at least one layer.")
        encoded = sorted((self.encode(self.render(turns)) for turns in conversations), key=len, reverse=True)
        chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        pad_id = self.tokenizer.pad_token_id
        bar = tqdm(total=len(encoded), desc="activations", unit="text", disable=not progress)
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            input_ids, attention_mask, position_ids, _ = pad_batch(batch, pad_id, "right")
            mask = attention_mask.bool().to(self.device)

            def keep(layer: int):
                def record(hidden: torch.Tensor) -> None:
                    chunks[layer].append(hidden[mask].float().cpu())

                return record

            with contextlib.ExitStack() as stack:
                for layer in layers:
                    stack.enter_context(edit_block_output(self.model, layer, keep(layer)))
                with self._autocast():
                    self.differentiable_rewards(
                        input_ids.to(self.device), attention_mask.to(self.device), position_ids.to(self.device)
                    )
            bar.update(len(batch))
        bar.close()
        return {layer: torch.cat(parts) for layer, parts in chunks.items()}

    def score_pairs(self, pairs: Sequence[PreferencePair], **kwargs: Any) -> PairScores:
        """Score the chosen and rejected side of each pair; keyword arguments go to score_conversations."""
        conversations = [pair.conversation("chosen") for pair in pairs] + [pair.conversation("rejected") for pair in pairs]
        both = self.score_conversations(conversations, **kwargs)
        n = len(pairs)
        chosen, rejected = both.select(slice(0, n)), both.select(slice(n, 2 * n))
        return PairScores(
            case_ids=[pair.case_id for pair in pairs],
            reward_chosen=chosen.rewards,
            reward_rejected=rejected.rewards,
            truncated=(chosen.n_truncated > 0) | (rejected.n_truncated > 0),
            response_truncated=chosen.response_truncated | rejected.response_truncated,
            chosen=chosen,
            rejected=rejected,
        )


def _trunk_and_head(model: torch.nn.Module, spec: ModelSpec):
    if spec.architecture == "score_model":
        return model.model, model.score_head
    head = getattr(model, "score", None)
    if head is None:
        raise ValueError(
            f"{spec.tag}: {type(model).__name__} has no `score` head for last-token readout; "
            "register the model with readout='head' to use its own classification head."
        )
    return model.base_model, head


def _check_head_width(head: torch.nn.Module, tag: str) -> None:
    out_features = getattr(head, "out_features", None)
    if out_features is not None and out_features != 1:
        raise RewardHeadError(
            f"{tag}: the reward head outputs {out_features} values; a reward model needs exactly one. "
            "Check that the checkpoint is a reward model (num_labels=1)."
        )


# ---------------------------------------------------------------------------------------------
# Loading


def load_reward_model(
    model: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    input_format: str | None = None,
    max_length: int | None = None,
    allow_fresh_head: bool = False,
    fresh_head_seed: int = 0,
    autocast_dtype: str | None = "spec",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> RewardModel:
    """Load a reward model by registry tag, hub id or local directory.

    ``device`` is ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the first GPU when torch sees one, else
    the CPU). ``device_map`` instead spreads the model over several devices through accelerate:
    ``"auto"``, ``"spec"`` (the registered model's recommendation), or a mapping from module names to
    devices, with ``offload_folder`` for modules mapped to ``"disk"``. ``attn_implementation``
    defaults to the registered model's setting.

    A checkpoint whose reward head is missing is rejected with :class:`RewardHeadError`, unless
    ``allow_fresh_head=True`` (a base encoder about to be trained into a reward model), in which case
    the head is initialised from ``fresh_head_seed``. Other missing weights are always an error.
    ``autocast_dtype`` defaults to the registered model's setting; pass None for plain weight-dtype
    forward passes, or "bfloat16"/"float16".
    """
    import transformers

    spec = get_spec(str(model))
    if spec is None:
        source = _resolve_local(str(model), revision)
        tokenizer = _load_tokenizer(source, trust_remote_code)
        spec = spec_for_unregistered(source, tokenizer, revision=revision)
    else:
        source = _resolve_local(spec.resolve_source(), revision or spec.revision)
        tokenizer = _load_tokenizer(source, trust_remote_code)
    if input_format is not None and input_format not in INPUT_FORMATS:
        raise ValueError(f"Unknown input format {input_format!r}; expected one of {INPUT_FORMATS}.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {DTYPES}.")
    spec = spec.with_overrides(input_format=input_format, max_length=max_length, dtype=dtype)
    _ensure_pad_token(tokenizer, spec.tag)
    if device_map == "spec":
        device_map = spec.device_map
    placement: dict[str, Any] = {}
    if device_map is not None:
        if str(device) not in ("cpu", "auto"):
            raise ValueError(f"Pass either device ({device!r}) or device_map ({device_map!r}), not both.")
        if not isinstance(device_map, (str, dict)):
            raise TypeError(f"device_map must be a string or a dict of module names to devices, got {type(device_map).__name__}.")
        placement["device_map"] = device_map
        if offload_folder is not None:
            placement["offload_folder"] = str(offload_folder)
    else:
        device = _check_device(device)
    attn_implementation = attn_implementation or spec.attn_implementation
    if attn_implementation is not None:
        placement["attn_implementation"] = attn_implementation

    torch_dtype = _TORCH_DTYPES[spec.dtype]
    verbosity = transformers.logging.get_verbosity()
    progress_bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # missing weights are reported below, as errors
    if progress_bars:
        transformers.utils.logging.disable_progress_bar()
    try:
        if spec.architecture == "score_model":
            from .score_model import LlamaForScore

            loaded, info = LlamaForScore.from_pretrained(
                source, dtype=torch_dtype, output_loading_info=True, trust_remote_code=trust_remote_code, **placement
            )
            head_prefixes = ("score_head.",)
        else:
            extra = {"num_labels": 1} if allow_fresh_head else {}
            loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                source, dtype=torch_dtype, output_loading_info=True, trust_remote_code=trust_remote_code, **extra, **placement
            )
            head_prefixes = ("score.", "classifier.")
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress_bars:
            transformers.utils.logging.enable_progress_bar()

    missing = sorted(set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())})
    missing_head = [key for key in missing if key.startswith(head_prefixes) or ".pooler." in key or key.startswith("pooler.")]
    missing_other = [key for key in missing if key not in missing_head]
    if missing_other:
        raise RewardHeadError(
            f"{spec.tag}: the checkpoint at {source} lacks weights for {len(missing_other)} parameters "
            f"(first: {missing_other[:3]}); it does not match {type(loaded).__name__}."
        )
    if missing_head and not allow_fresh_head:
        raise RewardHeadError(
            f"{spec.tag}: the checkpoint at {source} has no reward-head weights ({missing_head}); loading it "
            "would leave a randomly initialised head. Point at a trained reward model, or pass "
            "allow_fresh_head=True (--fresh-head) if you are about to train the head."
        )
    if missing_head:
        _initialise_head(loaded, missing_head, fresh_head_seed)
        logger.warning("%s: initialised a fresh reward head (seed %d): %s", spec.tag, fresh_head_seed, missing_head)

    loaded.config.pad_token_id = tokenizer.pad_token_id
    position_limit = _position_limit(loaded.config)
    if position_limit is not None and spec.max_length > position_limit:
        raise ValueError(
            f"{spec.tag}: max_length={spec.max_length} exceeds the {position_limit} positions the model was built "
            f"for; use a max_length of at most {position_limit}."
        )
    if device_map is None:
        loaded.to(device)
    identity = _model_identity(source, loaded, spec, revision)
    logger.info("Loaded %s from %s (%s, %s, identity %s).", spec.tag, source, spec.architecture, spec.dtype, identity[:12])
    if autocast_dtype == "spec":
        autocast_dtype = spec.autocast_dtype
    return RewardModel(loaded, tokenizer, spec, identity=identity, autocast_dtype=autocast_dtype)


def _check_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Invalid device {device!r}: {error}. Use cpu, cuda, cuda:N or auto.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} requested, but this torch build sees no CUDA GPU; use --device cpu.")
    return resolved


def _position_limit(config) -> int | None:
    """Return the number of positions the model's position embeddings cover, if they are learned."""
    limit = getattr(config, "max_position_embeddings", None)
    # Rotary-embedding models (Llama, Qwen) extrapolate past max_position_embeddings; only models
    # with a learned position table (BERT, GPT-2) fail with an index error there.
    if getattr(config, "model_type", "") in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3"):
        return None
    return int(limit) if isinstance(limit, int) else None


def _resolve_local(source: str, revision: str | None) -> str:
    """Return a local directory for ``source``, downloading a hub snapshot when it is not a directory."""
    if Path(source).expanduser().is_dir():
        folder = Path(source).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"Model directory {folder} contains no config.json; pass a transformers checkpoint directory "
                "(config.json, weights and tokenizer files)."
            )
        return str(folder)
    if Path(source).expanduser().exists():
        raise ValueError(f"Model path {source} is a file, not a directory; pass the checkpoint directory that contains config.json.")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            source,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.bin"],
        )
    except Exception as error:  # offline, unknown repo, gated repo
        from .registry import registered_models

        raise FileNotFoundError(
            f"Could not find model {source!r}: it is not a registered tag ({', '.join(registered_models())}), "
            f"not a local directory, and the hub download failed ({type(error).__name__}: {error}). "
            "Offline, pass the path of a local checkpoint."
        ) from error


def _load_tokenizer(source: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, use_fast=True, trust_remote_code=trust_remote_code)


def _ensure_pad_token(tokenizer, tag: str) -> None:
    if tokenizer.pad_token_id is not None:
        return
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
        raise ValueError(f"{tag}: the tokenizer has no pad, eos or unk token to pad batches with.")
    # The reward is read from the attention mask, so a pad token equal to eos does not move it.
    tokenizer.pad_token = fallback
    logger.info("%s: tokenizer has no pad token; padding with %r.", tag, fallback)


def _initialise_head(model: torch.nn.Module, names: Iterable[str], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            parameter = parameters.get(name)
            if parameter is None:
                continue
            if name.endswith("bias"):
                parameter.zero_()
            else:
                values = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std
                parameter.copy_(values.to(parameter.dtype))


def _model_identity(source: str, model: torch.nn.Module, spec: ModelSpec, revision: str | None) -> str:
    """Return a fingerprint of the weights in use: checkpoint files plus the in-memory head."""
    files = {}
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES):
            files[path.name] = fingerprint_file(path)
    head_digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        # An offloaded head sits on the meta device; its values are those of the checkpoint files hashed above.
        if name.startswith(("score.", "score_head.", "classifier.")) and parameter.device.type != "meta":
            head_digest.update(name.encode())
            head_digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return sha256_json(
        {
            "files": files,
            "head": head_digest.hexdigest(),
            "architecture": spec.architecture,
            "dtype": spec.dtype,
            "revision": revision,
        }
    )
