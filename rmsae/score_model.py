"""A safe-rlhf style score model: a Llama trunk and a bias-free linear ``score_head``.

The PKU-Alignment Beaver reward models and the ethz-spylab poisoned reward models are saved by
safe-rlhf with the architecture name ``LlamaForScore``: a ``LlamaModel`` under ``model.*`` and a
``score_head`` applied to the final hidden state of every token. The reward of a sequence is the
score at its last non-padding token. This module is our own implementation of that layout, so the
checkpoints load with their trained head instead of a freshly initialised classification head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput

from .tokenization import last_token_index


@dataclass
class ScoreModelOutput(ModelOutput):
    """Per-token scores (batch, tokens, score_dim), the end score of each row, and hidden states."""

    scores: torch.Tensor | None = None
    end_scores: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class LlamaForScore(LlamaPreTrainedModel):
    """Llama trunk plus ``score_head``; the reward is the end score at the last non-padding token."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.model = LlamaModel(config)
        score_dim = int(getattr(config, "score_dim", 1))
        self.score_head = nn.Linear(config.hidden_size, score_dim, bias=bool(getattr(config, "bias", False)))
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ScoreModelOutput:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            use_cache=False,
            **kwargs,
        )
        last_hidden = outputs.last_hidden_state
        scores = self.score_head(last_hidden)
        if attention_mask is None:
            attention_mask = torch.ones(last_hidden.shape[:2], dtype=torch.long, device=last_hidden.device)
        end_index = last_token_index(attention_mask)
        rows = torch.arange(scores.shape[0], device=scores.device)
        return ScoreModelOutput(
            scores=scores,
            end_scores=scores[rows, end_index],
            last_hidden_state=last_hidden,
            hidden_states=outputs.hidden_states,
        )
