"""A real Meadow server that cheats, for tests only (nothing of it is in the product).

    python tests/tampering_server.py MODE serve MODEL --initial-peers ... --blocks ...

runs `meadow serve` with the same arguments, tampered per MODE:
  noise  its blocks add noise to their outputs: well-formed replies with wrong values, which only spot-checks catch
  nan    the hidden states (and gradients) it sends hold a NaN
  shape  the hidden states (and gradients) it sends lack their last token
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's meadow, as `python -m meadow` from it

import torch  # noqa: E402

import meadow.wire.tensors as wire_tensors  # noqa: E402
from meadow import cli  # noqa: E402
from meadow.server.handler import BlockHandler  # noqa: E402

NOISE = 0.5  # of each block output's standard deviation: enough to change greedy tokens of a tiny random model


def add_noise(module, args, output: torch.Tensor) -> torch.Tensor:
    return output + NOISE * output.std() * torch.randn_like(output)


def serve_noisy_blocks() -> None:
    serve = BlockHandler.serve

    def serve_tampered(self, span) -> None:
        for block in span.blocks:
            block.register_forward_hook(add_noise)
        serve(self, span)

    BlockHandler.serve = serve_tampered


def send_tampered_hidden_states(tamper) -> None:
    serialize = wire_tensors.serialize

    def serialize_tampered(tensor: torch.Tensor, *args, **kwargs):
        if tensor.ndim == 3 and tensor.is_floating_point():  # hidden states or their gradients
            tensor = tamper(tensor.detach().clone())
        return serialize(tensor, *args, **kwargs)

    wire_tensors.serialize = serialize_tampered  # pack() looks it up here for every message the server sends


def with_nan(tensor: torch.Tensor) -> torch.Tensor:
    tensor[..., 0] = float("nan")
    return tensor


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "noise":
        serve_noisy_blocks()
    elif mode == "nan":
        send_tampered_hidden_states(with_nan)
    elif mode == "shape":
        send_tampered_hidden_states(lambda tensor: tensor[:, :-1])
    else:
        raise SystemExit(f"unknown tampering mode {mode!r}: noise, nan or shape")
    cli.main(args)


if __name__ == "__main__":
    main()
