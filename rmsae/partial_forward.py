"""Partial forwards: score texts again from a stored block output, running only the later blocks.

Steering edits block ``L``'s output, so every steered scoring of the same texts repeats blocks
``0..L`` unchanged. :func:`capture_block_outputs` runs the texts once and keeps block ``L``'s
per-token output with the padded batches it came from. :func:`rewards_from_block_outputs` then
replays that output and runs blocks ``L + 1`` onward, with the steering hooks that are open on block
``L`` applied to it, so a steered scoring costs the later blocks only. Per-token outputs take
``texts × tokens × hidden size`` values of the model's dtype, which is why they are kept in memory
for one evaluation and not written to the activation cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .data import Turn
from .hooks import block_output_container, check_layer, replay_block_output
from .tokenization import pad_batch

logger = logging.getLogger(__name__)

# Largest relative difference between a full forward's rewards and a replay's that still counts as
# the same computation. The replay runs the same later-block operations on the same tensor, so a
# larger difference means the model computes something in the skipped blocks that later ones use.
REPLAY_TOLERANCE = 1e-4


class PartialForwardError(RuntimeError):
    """A model whose forward cannot be resumed from a stored block output."""


@dataclass
class BlockOutputBatch:
    """One padded batch: its rows' positions among the unique texts and block ``layer``'s output."""

    rows: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    hidden: torch.Tensor


@dataclass
class BlockOutputs:
    """Block ``layer``'s per-token outputs for a list of texts, as captured by :func:`capture_block_outputs`.

    ``text_keys`` lists the texts in the caller's order, ``text_rows`` the row of each among the
    unique texts that the batches hold, and ``rewards`` their unsteered rewards from the capturing
    forward. ``model`` is the identity of the reward model that produced them.
    """

    model: str
    layer: int
    container: str
    text_keys: list[str]
    text_rows: np.ndarray
    rewards: np.ndarray
    batches: list[BlockOutputBatch]

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored hidden states."""
        return sum(batch.hidden.numel() * batch.hidden.element_size() for batch in self.batches)


def capture_block_outputs(
    reward_model,
    conversations: Sequence[Sequence[Turn]],
    layer: int,
    *,
    batch_size: int = 16,
    padding_side: str = "right",
    verify: bool = True,
    max_bytes: int | None = None,
    progress: bool = True,
) -> BlockOutputs:
    """Run ``conversations`` once and keep block ``layer``'s per-token output, on the CPU.

    Repeated texts are run once. With ``verify``, the first batch is replayed without edits and its
    rewards compared with the full forward's. A difference above ``REPLAY_TOLERANCE`` raises
    :class:`PartialForwardError`, because the replay would then score a different model. So does a
    store that would exceed ``max_bytes`` (tokens × hidden size × bytes per value, estimated from
    the tokenised texts before any forward).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    layer = check_layer(reward_model.model, layer)
    if reward_model.cache_namespace().get("interventions"):
        raise PartialForwardError(
            f"Block outputs must come from the unedited model, but {reward_model.cache_namespace()['interventions']} "
            "is open; capture them outside any steer() or SAE splice context."
        )
    rendered = [reward_model.render(turns) for turns in conversations]
    keys = [reward_model.text_key(item) for item in rendered]
    first_index: dict[str, int] = {}
    for index, key in enumerate(keys):
        first_index.setdefault(key, index)
    unique = list(first_index)
    unique_row = {key: row for row, key in enumerate(unique)}
    text_rows = np.array([unique_row[key] for key in keys], dtype=np.int64)
    encoded = [reward_model.encode(rendered[first_index[key]]) for key in unique]
    order = sorted(range(len(unique)), key=lambda row: len(encoded[row]), reverse=True)
    if max_bytes is not None:
        parameter = next(reward_model.model.parameters())
        value_bytes = 2 if reward_model.autocast_dtype else parameter.element_size()
        estimate = sum(len(item) for item in encoded) * reward_model.hidden_size * value_bytes
        if estimate > max_bytes:
            raise PartialForwardError(
                f"Storing block {layer}'s outputs of {len(unique)} texts would take about {estimate / 2**30:.1f} GiB, "
                f"above the limit of {max_bytes / 2**30:.1f} GiB; raise the limit or score with full forwards."
            )

    pad_id = reward_model.tokenizer.pad_token_id
    unique_rewards = np.zeros(len(unique), dtype=np.float64)
    batches: list[BlockOutputBatch] = []
    containers: set[str] = set()
    bar = tqdm(total=len(unique), desc=f"block {layer} outputs", unit="text", disable=not progress or not unique)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask, position_ids, response_mask = pad_batch([encoded[row] for row in rows], pad_id, padding_side)
        captured: dict[str, object] = {}

        def keep(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            captured["output"] = output

        handle = reward_model.blocks[layer].register_forward_hook(keep)
        try:
            rewards = _run(reward_model, input_ids, attention_mask, position_ids, response_mask)
        finally:
            handle.remove()
        output = captured["output"]
        containers.add(block_output_container(output))
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        batches.append(BlockOutputBatch(rows, input_ids, attention_mask, position_ids, response_mask, hidden.detach().cpu()))
        unique_rewards[rows] = rewards
        bar.update(len(rows))
    bar.close()

    outputs = BlockOutputs(
        model=reward_model.identity,
        layer=layer,
        container=containers.pop() if containers else "tensor",
        text_keys=keys,
        text_rows=text_rows,
        rewards=unique_rewards[text_rows],
        batches=batches,
    )
    if verify and batches:
        _verify_replay(reward_model, outputs, unique_rewards[batches[0].rows])
    logger.info("Stored block %d outputs of %d texts (%.1f MB).", layer, len(unique), outputs.nbytes / 2**20)
    return outputs


def rewards_from_block_outputs(reward_model, outputs: BlockOutputs, *, progress: bool = False) -> np.ndarray:
    """Return the rewards of the captured texts (in their original order), running only blocks after ``outputs.layer``.

    Hooks open on block ``outputs.layer`` (for example inside :func:`rmsae.mitigation.steer`) edit the
    replayed output, so the rewards are those of the steered model.
    """
    if outputs.model != reward_model.identity:
        raise PartialForwardError(
            f"The block outputs were captured with the model {outputs.model}, not {reward_model.identity}; capture them again with this model."
        )
    unique_rewards = np.zeros(sum(len(batch.rows) for batch in outputs.batches), dtype=np.float64)
    for batch in tqdm(outputs.batches, desc=f"from block {outputs.layer + 1}", unit="batch", disable=not progress):
        with replay_block_output(reward_model.model, outputs.layer, batch.hidden, outputs.container):
            unique_rewards[batch.rows] = _run(reward_model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask)
    return unique_rewards[outputs.text_rows]


@torch.inference_mode()
def _run(reward_model, input_ids, attention_mask, position_ids, response_mask) -> np.ndarray:
    device = reward_model.device
    with reward_model.batch_token_masks(attention_mask, response_mask), reward_model._autocast():
        rewards = reward_model.differentiable_rewards(input_ids.to(device), attention_mask.to(device), position_ids.to(device))
    return rewards.float().cpu().numpy().astype(np.float64)


def _verify_replay(reward_model, outputs: BlockOutputs, expected: np.ndarray) -> None:
    batch = outputs.batches[0]
    with replay_block_output(reward_model.model, outputs.layer, batch.hidden, outputs.container):
        replayed = _run(reward_model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask)
    difference = float(np.max(np.abs(replayed - expected)))
    if difference > REPLAY_TOLERANCE * max(1.0, float(np.max(np.abs(expected)))):
        raise PartialForwardError(
            f"Replaying block {outputs.layer}'s output changes {reward_model.spec.tag}'s rewards by up to {difference:.3g}: "
            "its forward does not resume from a block output. Score with full forwards instead."
        )

