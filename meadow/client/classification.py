"""Sequence classification through the swarm: the blocks run remotely, a trainable head (`score`) runs here and
reads the last real token of each row, as transformers' *ForSequenceClassification models do."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from meadow.client.model import DistributedPreTrainedModel, load_distributed
from meadow.client.tuning import ClientLora, PromptTuning


class DistributedModelForSequenceClassification(DistributedPreTrainedModel):
    """Remote blocks, then the final norm and a client-side linear head over `num_labels` classes."""

    def __init__(self, config: PreTrainedConfig, parts, sequence, prompts: PromptTuning | None = None, lora: ClientLora | None = None):
        super().__init__(config, parts, sequence, prompts, lora)
        weight = parts.embed_tokens.weight
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(self.score.weight, std=getattr(config, "initializer_range", 0.02))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = True,
        **unused,
    ) -> SequenceClassifierOutput:
        hidden = self.remote_hidden(input_ids, inputs_embeds, attention_mask, position_ids)
        logits = self.score(self.norm(hidden.to(self.score.weight.device)))
        batch = logits.shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None and batch != 1:
            raise ValueError("cannot classify a batch of several rows without a pad token id in the config")
        if pad_token_id is None or input_ids is None:
            last = torch.full((batch,), -1, device=logits.device)
        else:  # the rightmost token that is not padding, for left and right padding alike
            real = (input_ids != pad_token_id).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * real).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        output = SequenceClassifierOutput(loss=loss, logits=pooled)
        return output if return_dict is not False else output.to_tuple()


class AutoDistributedModelForSequenceClassification:
    """Entry point like transformers' AutoModelForSequenceClassification; `num_labels` sets the head's size.
    The head starts random (a causal LM checkpoint has none): train it, with prompts or LoRA if you like."""

    @classmethod
    def from_pretrained(
        cls, model: str | Path, initial_peers: Sequence[str] = (), *, num_labels: int = 2, **kwargs
    ) -> DistributedModelForSequenceClassification:
        overrides = {"num_labels": num_labels, **kwargs.pop("config_overrides", {})}
        return load_distributed(DistributedModelForSequenceClassification, model, initial_peers, config_overrides=overrides, **kwargs)
