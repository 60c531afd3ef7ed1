"""Feature analysis: how often each SAE latent fires on benign and perturbed texts, and what its top activations are.

A latent "fires" on a text when its pooled (mean over tokens) code exceeds a threshold, 0 by
default. SAE codes are non-negative, so with threshold 0 that is "active on at least one token".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .data import Turn
from .hooks import capture_block_output
from .tokenization import pad_batch


def activation_rates(codes: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Share of texts (rows) whose pooled code exceeds ``threshold``, per latent (column)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or not len(codes):
        raise ValueError(f"codes must be a non-empty (texts, latents) array, got shape {codes.shape}.")
    return (codes > threshold).mean(axis=0)


def latent_statistics(groups: dict[str, np.ndarray], threshold: float = 0.0) -> pd.DataFrame:
    """Summarise each latent in one row: activation rate, mean and standard deviation of the pooled code per group.

    ``groups`` maps a group name (for example ``benign_chosen``) to its (texts, latents) codes; all
    groups need the same number of latents.
    """
    widths = {name: np.asarray(codes).shape[-1] for name, codes in groups.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"All groups need the same number of latents, got {widths}.")
    columns: dict[str, np.ndarray] = {"latent": np.arange(next(iter(widths.values())))}
    for name, codes in groups.items():
        codes = np.asarray(codes, dtype=np.float64)
        columns[f"{name}_rate"] = activation_rates(codes, threshold)
        columns[f"{name}_mean"] = codes.mean(axis=0)
        columns[f"{name}_std"] = codes.std(axis=0)
    return pd.DataFrame(columns)


@torch.inference_mode()
def top_activations(
    reward_model,
    sae,
    conversations: Sequence[Sequence[Turn]],
    latents: Sequence[int],
    *,
    top_n: int = 5,
    context_tokens: int = 8,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Find the ``top_n`` texts on which each latent reaches its largest per-token activation, and show that token in context.

    Each row gives the latent, the rank, the text's index in ``conversations``, the activation, the
    token and ``context_tokens`` tokens on each side, with the token marked as ``[[token]]``.
    """
    latents = [int(latent) for latent in latents]
    if not latents:
        raise ValueError("latents is empty; pass the indices of the latents to inspect.")
    if min(latents) < 0 or max(latents) >= sae.d_sae:
        raise ValueError(f"Latent indices must lie in 0..{sae.d_sae - 1}, got {min(latents)}..{max(latents)}.")
    if not conversations:
        raise ValueError("conversations is empty; pass the texts to search.")
    encoded = [reward_model.encode(reward_model.render(turns)) for turns in conversations]
    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index]), reverse=True)
    selected = torch.tensor(latents)
    best_value = np.zeros((len(encoded), len(latents)), dtype=np.float32)
    best_position = np.zeros((len(encoded), len(latents)), dtype=np.int64)
    pad_id = reward_model.tokenizer.pad_token_id
    bar = tqdm(total=len(order), desc="top activations", unit="text", disable=not progress)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask, position_ids, response_mask = pad_batch([encoded[row] for row in rows], pad_id, "right")
        device = reward_model.device
        with capture_block_output(reward_model.model, sae.layer) as captured, reward_model._autocast():
            reward_model.differentiable_rewards(input_ids.to(device), attention_mask.to(device), position_ids.to(device))
        codes = sae.encode(captured["hidden"])
        codes = codes[..., selected.to(codes.device)].float()
        codes = torch.where(attention_mask.to(codes.device).bool()[..., None], codes, torch.zeros((), device=codes.device))
        values, positions = codes.max(dim=1)
        best_value[rows] = values.cpu().numpy()
        best_position[rows] = positions.cpu().numpy()
        bar.update(len(rows))
    bar.close()

    records = []
    tokenizer = reward_model.tokenizer
    for column, latent in enumerate(latents):
        ranked = np.argsort(-best_value[:, column], kind="stable")[:top_n]
        for rank, text_index in enumerate(ranked, start=1):
            ids = encoded[text_index].input_ids
            position = int(best_position[text_index, column])
            before = tokenizer.decode(ids[max(0, position - context_tokens) : position])
            token = tokenizer.decode(ids[position : position + 1])
            after = tokenizer.decode(ids[position + 1 : position + 1 + context_tokens])
            records.append({"latent": latent, "rank": rank, "text": int(text_index), "activation": float(best_value[text_index, column]),
                            "token": token, "context": f"{before} [[{token}]] {after}"})
    return pd.DataFrame(records)

