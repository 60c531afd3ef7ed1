"""Named hook points on transformer blocks.

Layer ``L`` is the output of block ``L`` (0-based), which equals ``hidden_states[L + 1]`` of a forward
with ``output_hidden_states=True``. Decoder blocks of recent transformers releases return a bare
tensor and older ones (and BERT, GPT-2) a tuple whose first item is the hidden state, so every hook
here accepts both.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

# Attribute paths of the block list, tried in order. Covers Llama, Qwen2/3, Mistral, Gemma(2/3) and
# our LlamaForScore (``model.layers``), GPT-2 (``transformer.h``) and BERT-like encoders.
BLOCK_PATHS = (
    "model.layers",
    "layers",
    "model.language_model.layers",
    "transformer.h",
    "h",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "deberta.encoder.layer",
    "encoder.layer",
)

BlockEdit = Callable[[torch.Tensor], torch.Tensor | None]


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the list of transformer blocks of a Hugging Face model."""
    for path in BLOCK_PATHS:
        module: object = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == expected]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(
        f"Cannot find the transformer blocks of {type(model).__name__}; tried {', '.join(BLOCK_PATHS)}. "
        "Pass a model whose block list is at one of these attribute paths."
    )


def execution_device(module: nn.Module) -> torch.device | None:
    """Return the device a module computes on: accelerate's execution device when it dispatched the
    module (its weights may sit on ``meta`` while offloaded), else that of its first real parameter."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return None


def block_hook_name(model: nn.Module, layer: int) -> str:
    """Return the module path of block ``layer`` (e.g. ``model.layers.12``), the hook name an SAE records."""
    blocks = find_blocks(model)
    for name, module in model.named_modules():
        if module is blocks:
            return f"{name}.{layer}"
    raise ValueError(f"The block list of {type(model).__name__} is not among its named modules.")


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate a block index and return it as an int."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an integer block index, got {layer!r} ({type(layer).__name__}).")
    n_blocks = len(find_blocks(model))
    if not 0 <= layer < n_blocks:
        raise ValueError(f"layer {layer} is out of range: {type(model).__name__} has blocks 0 to {n_blocks - 1}.")
    return layer


def _block_hidden(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]


def _replace_block_hidden(output: object, hidden: torch.Tensor) -> object:
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])  # type: ignore[index]


@contextmanager
def edit_block_output(model: nn.Module, layer: int, edit: BlockEdit) -> Iterator[None]:
    """Apply ``edit`` to the hidden state that block ``layer`` outputs, while the context is open.

    ``edit`` receives the (batch, tokens, hidden) tensor and returns a replacement, or None to keep
    it unchanged.
    """
    block = find_blocks(model)[check_layer(model, layer)]

    def hook(_module: nn.Module, _inputs: object, output: object) -> object:
        replacement = edit(_block_hidden(output))
        return output if replacement is None else _replace_block_hidden(output, replacement)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture_block_output(model: nn.Module, layer: int) -> Iterator[dict[str, torch.Tensor]]:
    """Record the hidden state that block ``layer`` outputs; read it as ``captured["hidden"]``."""
    captured: dict[str, torch.Tensor] = {}

    def record(hidden: torch.Tensor) -> None:
        captured["hidden"] = hidden.detach()

    with edit_block_output(model, layer, record):
        yield captured


def block_output_container(output: object) -> str:
    """Return ``"tensor"`` or ``"tuple"``: how a block returns its hidden state, as replayed by :func:`replay_block_output`.

    Raises ValueError for a tuple that carries more than the hidden state (attention weights, a key
    and value cache), because a replay could not reproduce those items.
    """
    if isinstance(output, torch.Tensor):
        return "tensor"
    if isinstance(output, tuple) and output and all(item is None for item in output[1:]):
        return "tuple"
    raise ValueError(
        f"The block returned a {type(output).__name__} with more than a hidden state; "
        "turn off attention outputs and the key/value cache before replaying block outputs."
    )


@contextmanager
def replay_block_output(model: nn.Module, layer: int, hidden: torch.Tensor, container: str) -> Iterator[None]:
    """Skip blocks ``0..layer`` while the context is open: block ``layer`` outputs ``hidden`` as it is.

    Blocks before ``layer`` pass their input through unchanged and block ``layer`` ignores its input,
    so a forward costs the embeddings plus blocks ``layer + 1`` onward. Forward hooks on block
    ``layer`` (a steering edit, an SAE splice) still run on ``hidden``. ``hidden`` must be that
    block's output for the same padded batch, captured earlier. The blocks' ``forward`` attributes
    are swapped and restored, which keeps any wrapper that ``accelerate`` installed there.
    """
    if container not in ("tensor", "tuple"):
        raise ValueError(f"container must be 'tensor' or 'tuple', got {container!r}.")
    blocks = find_blocks(model)
    check_layer(model, layer)

    def wrap(value: torch.Tensor) -> object:
        return value if container == "tensor" else (value,)

    def pass_through(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> object:
        return wrap(hidden_states)

    patched = list(blocks[: layer + 1])
    device = execution_device(patched[-1])
    replayed = hidden if device is None else hidden.to(device)

    def replay(*args: object, **kwargs: object) -> object:
        return wrap(replayed)

    saved = [block.__dict__.get("forward") for block in patched]
    try:
        for block in patched[:-1]:
            block.forward = pass_through
        patched[-1].forward = replay
        yield
    finally:
        for block, previous in zip(patched, saved):
            if previous is None:
                del block.forward
            else:
                block.forward = previous
