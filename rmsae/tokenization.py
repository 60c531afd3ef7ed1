"""Tokenising rendered inputs: one BOS, left truncation of the prompt, and token masks.

Over-long inputs lose tokens from the left of the text body, after the leading special tokens
(BOS or [CLS]), so the end of the response, where the reward is read, always survives. When the
response alone exceeds the budget its beginning is cut too, and ``response_truncated`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import RenderedText

POOLINGS = ("mean", "mean_response", "mean_no_bos")


@dataclass(frozen=True)
class EncodedText:
    """Token ids of one input with what pooling and reporting need.

    Attributes:
        input_ids: token ids after truncation.
        response_mask: True at tokens that overlap the response's character span.
        n_leading_special: special tokens the tokenizer added in front (BOS, [CLS]).
        n_truncated: tokens removed to fit ``max_length`` (0 when the input fits).
        response_truncated: True when some removed tokens belonged to the response.
        offsets: character span ``(start, end)`` of each token in the rendered text, ``(0, 0)``
            for added special tokens.
    """

    input_ids: tuple[int, ...]
    response_mask: tuple[bool, ...]
    n_leading_special: int
    n_truncated: int
    response_truncated: bool
    offsets: tuple[tuple[int, int], ...] = ()

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_rendered(rendered: RenderedText, tokenizer, max_length: int) -> EncodedText:
    """Tokenise ``rendered`` with the tokenizer's special tokens, one BOS, and left truncation."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"Tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} is not a fast tokenizer; "
            "rmsae needs character offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    # verbose=False: the tokenizer would warn about inputs above model_max_length, which are cut below.
    encoding = tokenizer(
        rendered.text, add_special_tokens=True, return_offsets_mapping=True, truncation=False, verbose=False
    )
    ids = list(encoding["input_ids"])
    offsets = [tuple(span) for span in encoding["offset_mapping"]]

    bos_id = tokenizer.bos_token_id
    if bos_id is not None:
        if len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
            del ids[0], offsets[0]
        if rendered.template_bos and (not ids or ids[0] != bos_id):
            ids.insert(0, bos_id)
            offsets.insert(0, (0, 0))

    # Tokens the tokenizer added (BOS, [CLS], [SEP], EOS) have an empty character span.
    added = [start == end for start, end in offsets]
    n_lead = next((i for i, is_added in enumerate(added) if not is_added), len(ids))
    n_trail = next((i for i, is_added in enumerate(reversed(added)) if not is_added), 0)
    response_mask = [
        (not is_added) and start < rendered.response_end and end > rendered.response_start
        for (start, end), is_added in zip(offsets, added)
    ]
    if rendered.response_start == rendered.response_end:
        response_mask = [False] * len(ids)

    n_truncated = max(0, len(ids) - max_length)
    response_truncated = False
    if n_truncated:
        if max_length - n_lead - n_trail < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for text after {n_lead + n_trail} special tokens; "
                "use a larger max_length."
            )
        cut = slice(n_lead, n_lead + n_truncated)
        response_truncated = any(response_mask[cut])
        del ids[cut], response_mask[cut], offsets[cut]
    return EncodedText(tuple(ids), tuple(response_mask), n_lead, n_truncated, response_truncated, tuple(offsets))


def pad_batch(
    encoded: list[EncodedText], pad_token_id: int, padding_side: str, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a batch to its longest row, or to ``pad_to`` tokens if that is longer.

    Returns input_ids, attention_mask, position_ids and response_mask tensors. Position ids count
    real tokens only, so a left-padded row gets the same positions as an unpadded one.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    width = max(max(len(item) for item in encoded), pad_to or 0)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    response_mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, item in enumerate(encoded):
        n = len(item)
        columns = slice(width - n, width) if padding_side == "left" else slice(0, n)
        input_ids[row, columns] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, columns] = 1
        response_mask[row, columns] = torch.tensor(item.response_mask, dtype=torch.bool)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids, response_mask


def pooling_masks(
    encoded: list[EncodedText], attention_mask: torch.Tensor, response_mask: torch.Tensor, poolings: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Return a boolean (batch, tokens) mask per pooling mode."""
    masks: dict[str, torch.Tensor] = {}
    for pooling in poolings:
        if pooling == "mean":
            masks[pooling] = attention_mask.bool()
        elif pooling == "mean_response":
            masks[pooling] = response_mask
        elif pooling == "mean_no_bos":
            mask = attention_mask.bool().clone()
            first_real = attention_mask.argmax(dim=1)
            for row, item in enumerate(encoded):
                start = int(first_real[row])
                mask[row, start : start + item.n_leading_special] = False
            masks[pooling] = mask
        else:
            raise ValueError(f"Unknown pooling {pooling!r}; expected one of {POOLINGS}.")
    return masks


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return the index of the last position whose mask is 1, per row, for left or right padding."""
    n_positions = attention_mask.shape[1]
    positions = torch.arange(n_positions, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where ``mask`` is True, in float32; NaN for a row with no such token.

    Padding positions may hold NaN or inf (fully masked attention rows), so they are excluded with
    ``torch.where`` rather than multiplied by zero.
    """
    hidden = hidden.float()
    mask3 = mask.unsqueeze(-1)
    total = torch.where(mask3, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(dim=1)
    count = mask.sum(dim=1, keepdim=True).to(hidden.dtype)
    return total / count
