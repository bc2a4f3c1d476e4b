"""An in-process stand-in for the swarm: every block of a checkpoint behind RemoteSequence's interface, run by the
server's own Span and Session, so the client model can be tested without processes. It records what the client sent."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from meadow.client.tuning import RemoteTuning
from meadow.models import load_block, load_config
from meadow.server.span import Session, Span
from meadow.server.tuning import TuningInputs
from meadow.wire import BlockRange


def span_tuning(tuning: RemoteTuning | None, blocks: BlockRange) -> TuningInputs:
    tuning = tuning or RemoteTuning()
    return TuningInputs(blocks, tuning.prompts, tuning.lora_flat, tuning.entries)


class LocalSequence:
    """All blocks of a model loaded here; `forward` is a full pass (differentiable), `inference_session` keeps KV caches."""

    def __init__(self, model: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        config = load_config(model)
        blocks = [load_block(model, config, index, dtype, device) for index in range(config.num_hidden_layers)]
        self.span = Span(blocks, 0, config, dtype, torch.device(device))
        self.num_blocks = config.num_hidden_layers
        self.sessions: list[LocalInferenceSession] = []  # every session opened, for tests to inspect
        self.forward_calls = 0

    def forward(self, hidden: Tensor, position_ids: Tensor, key_mask: Tensor | None, tuning: RemoteTuning | None = None) -> Tensor:
        """Full pass without a cache: hidden (B, T, H) -> (B, T, H); key_mask (B, T) bool or None."""
        self.forward_calls += 1
        blocks = self.span.range
        key_mask = torch.ones(hidden.shape[:2], dtype=torch.bool) if key_mask is None else key_mask.bool()
        tuning = span_tuning(tuning, blocks)
        lora = tuning.block_loras(self.span.config)
        return self.span.forward(hidden, position_ids, key_mask, blocks, tuning.prompts, lora)

    def inference_session(
        self, max_length: int, batch_size: int, tuning: RemoteTuning | None = None, give_up=None
    ) -> "LocalInferenceSession":  # give_up: no servers here to wait for
        session = LocalInferenceSession(self, max_length, batch_size, tuning)
        self.sessions.append(session)
        return session

    def close(self) -> None:
        pass


class LocalInferenceSession:
    """A server Session over every block; `step` takes only the new tokens, as the servers do."""

    def __init__(self, sequence: LocalSequence, max_length: int, batch_size: int, tuning: RemoteTuning | None = None):
        self.sequence, self.max_length, self.batch_size = sequence, max_length, batch_size
        self.session = Session.open(sequence.span, sequence.span.range, batch_size, max_length, span_tuning(tuning, sequence.span.range))
        self.closed = False
        self.steps: list[int] = []  # number of tokens sent by each step

    def step(self, hidden: Tensor, position_ids: Tensor, key_mask: Tensor | None) -> Tensor:
        """hidden (B, T, H) of the new tokens; key_mask (B, T) for them only (accumulated by the session)."""
        if self.closed:
            raise RuntimeError("step on a closed inference session")
        key_mask = torch.ones(hidden.shape[:2], dtype=torch.bool) if key_mask is None else key_mask.bool()
        try:
            output = self.session.step(self.sequence.span, hidden, position_ids, key_mask)
        except Exception as e:  # the remote session raises ValueError for these too
            raise ValueError(str(e)) from None
        self.steps.append(hidden.shape[1])
        return output

    def rewind(self, position: int) -> None:
        self.session.rewind(position)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> "LocalInferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
