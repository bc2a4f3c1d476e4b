"""Bytes on the wire per wire format, counted on real serialized messages, and the end-to-end time effect.

    python benchmarks/wire_bytes.py [--servers 2] [--new-tokens 32] [--no-swarm]

Bytes: the protobuf messages (`meadow.wire.pack`, what the client and servers send, metadata included; not libp2p's
framing) for the 100M bench model's hidden size 768: one generated token on one hop (the client's step and the
server's reply; a server that pushes the step on to the next one sends one more message of the step's size), and
one 8x128 rpc_forward (request and reply). Codec: CPU milliseconds to encode and decode those hidden states (one
thread, process time, which other programs on the machine barely change). Time: `meadow.bench.bench` through a loopback swarm of
float32 servers with each wire format, as a ratio to the float32 wire. On loopback bytes cost almost nothing, so this
shows what the (de)compression costs; over a slow link the byte ratios matter more.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from hivemind.proto import runtime_pb2

from meadow.bench import bench
from meadow.wire import WIRE_FORMATS, BlockRange, ForwardRequest, PushTarget, Reply, Step, deserialize, pack, serialize

HIDDEN = 768


def message_bytes(tensors: list[torch.Tensor], meta: dict, message_type, wire: str) -> int:
    return sum(message.ByteSize() for message in pack(tensors, meta, message_type, wire))


def exchange_bytes(batch: int, length: int, meta: dict, wire: str) -> int:
    """A request of hidden states, positions and mask, and its reply of hidden states."""
    hidden = torch.randn(batch, length, HIDDEN)
    request = [hidden, torch.arange(length).repeat(batch, 1), torch.ones(batch, length, dtype=torch.bool)]
    sent = message_bytes(request, meta, runtime_pb2.ExpertRequest, wire)
    return sent + message_bytes([hidden], Reply().to_wire(), runtime_pb2.ExpertResponse, wire)


def codec_ms(batch: int, length: int, wire: str, repeats: int = 20) -> float:
    """CPU ms to encode and decode a (batch, length, hidden) float32 tensor in `wire`, twice (request and reply)."""
    hidden = torch.randn(batch, length, HIDDEN)
    deserialize(serialize(hidden, wire))  # warm-up: imports bitsandbytes for blockwise8
    began = time.process_time()
    for _ in range(repeats):
        deserialize(serialize(hidden, wire))
    return 2 * (time.process_time() - began) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-swarm", action="store_true", help="count bytes only")
    args = parser.parse_args()
    blocks = BlockRange(start=0, end=4)
    step = Step(position=100, push_to=[PushTarget(peer="Qm" + "x" * 44, session_id="0" * 32)]).to_wire()
    forward = ForwardRequest(blocks=blocks).to_wire()
    timing = {}
    if not args.no_swarm:
        load = os.getloadavg()[0]
        for wire in WIRE_FORMATS:
            timing[wire] = bench(None, args.servers, args.new_tokens, "float32", "cpu", wire=wire, local=False)["remote"]
        load = f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after; {os.cpu_count()} cores"

    torch.set_num_threads(1)  # for codec_ms: the CPU time of idle threads spinning would count as work
    print(f"\nhidden size {HIDDEN} (the 100M bench model); bytes of serialized messages, request + reply")
    header = ("| wire | bytes per generated token per hop | vs float32 | bytes per 8x128 forward | vs float32 "
              "| codec CPU ms per token per hop | codec CPU ms per 8x128 forward |")  # fmt: skip
    if timing:
        header += " tokens/s | prefill 8x128, s | training step 8x128, s | time vs float32 (gen, prefill, train) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    sizes = {wire: (exchange_bytes(1, 1, {**step, "wire": wire}, wire), exchange_bytes(8, 128, {**forward, "wire": wire}, wire))
             for wire in WIRE_FORMATS}  # fmt: skip
    for wire, (token, full) in sizes.items():
        base_token, base_full = sizes["float32"]
        row = (f"| {wire} | {token} | {token / base_token:.2f} | {full} | {full / base_full:.2f} "
               f"| {codec_ms(1, 1, wire, 200):.3f} | {codec_ms(8, 128, wire):.1f} |")  # fmt: skip
        if timing:
            t, t0 = timing[wire], timing["float32"]
            ratios = (t0["tokens_per_s"] / t["tokens_per_s"], t["prefill_s"] / t0["prefill_s"], t["train_s"] / t0["train_s"])
            row += (f" {t['tokens_per_s']:.1f} | {t['prefill_s']:.3f} | {t['train_s']:.3f} | "
                    + ", ".join(f"{r:.2f}x" for r in ratios) + " |")  # fmt: skip
        print(row)
    if timing:
        print(f"float32 servers on cpu, {args.servers} servers, {args.new_tokens} new tokens x 3; {load}")


if __name__ == "__main__":
    main()
