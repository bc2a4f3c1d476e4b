"""Fuzzing one real server: for each RPC, FUZZ_REQUESTS random and mutated requests (valid ones with fields, shapes,
dtypes and bytes altered) from several peers at once. The server stays up, answers every request (a result or a
clear error, counted by kind), its memory stays bounded, and an honest client generating meanwhile gets the greedy
tokens of transformers. Prints the counts per RPC and the server's peak RSS (set FUZZ_REQUESTS to fuzz more)."""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from conftest import peer_of, start_swarm
from meadow import AutoDistributedModelForCausalLM
from meadow.client.config import ClientConfig
from meadow.models import load_reference_model
from meadow.points.rpc import RPC_LEDGER, RPC_RECEIPT
from meadow.wire import (
    RPC_BACKWARD, RPC_FORWARD, RPC_INFERENCE, RPC_INFO, RPC_LEAVE_LINE, RPC_PUSH, BackwardRequest, ForwardRequest,
    OpenSession, Push, Reply, Step, serialize, unpack,
)  # fmt: skip

REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "1000"))  # per RPC
PEERS = 4  # fuzzing peers, each with its own peer id
IN_FLIGHT = 4  # requests per peer at once
HIDDEN, NUM_BLOCKS, MAX_LENGTH = 64, 4, 64
RPCS = ("rpc_info", "rpc_leave_line", "rpc_forward", "rpc_backward", "rpc_inference", "rpc_push", "rpc_receipt",
        "rpc_ledger")  # fmt: skip
REPLY_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1)) * 1024


def group_rss_bytes(pgid: int) -> int:
    """RSS of a process group: the server with its DHT process and p2pd daemons (which buffer streams too)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # the fields after the name: state, ppid, pgrp, ...
                total += rss_bytes(int(stat.parent.name))
        except (OSError, ValueError, AttributeError):
            pass  # it ended meanwhile
    return total


@pytest.fixture(scope="module")
def server(checkpoints):
    path = checkpoints("llama", num_layers=NUM_BLOCKS, hidden_size=HIDDEN)
    port = free_port()
    limits = ["--max-length", str(MAX_LENGTH), "--max-batch-tokens", "256", "--cache-tokens", "4096",
              "--idle-timeout", "300", "--port", str(port), "--throughput", "1000"]  # fmt: skip
    swarm = start_swarm(path, [f"0:{NUM_BLOCKS}"], *limits)
    try:
        (process,) = swarm.servers
        peer = peer_of(process)
        yield swarm, path, process, f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}", PeerID.from_base58(peer)
    finally:
        swarm.stop()


class Mutator:
    """Valid requests of each RPC, and random changes to their metadata, tensors and bytes."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def inputs(self, batch: int = 1, length: int = 3) -> list[torch.Tensor]:
        return [torch.randn(batch, length, HIDDEN, generator=self.gen), torch.arange(length).repeat(batch, 1),
                torch.ones(batch, length, dtype=torch.bool)]  # fmt: skip

    def weird(self):
        """A value of a random kind, most of them wrong wherever they go."""
        choices = [None, -1, 0, 1, 2**31, 2**63 - 1, -(2**63), 1e308, float("nan"), float("inf"), "", "x" * 300,
                   "0:4", True, [], [1, 2], {}, {"start": 0}, {"start": 3, "end": 1}, b"\xff\x00", 3.5]  # fmt: skip
        return self.rng.choice(choices)

    def mutate_meta(self, meta: dict) -> dict:
        meta = dict(meta)
        keys = list(meta) + ["blocks", "version", "unknown_field"]
        key = self.rng.choice(keys)
        action = self.rng.random()
        if action < 0.25 and key in meta:
            del meta[key]
        elif action < 0.5 and isinstance(meta.get(key), dict):
            inner = dict(meta[key])
            inner[self.rng.choice(list(inner) or ["start"])] = self.weird()
            meta[key] = inner
        else:
            meta[key] = self.weird()
        return meta

    def mutate_proto(self, proto: runtime_pb2.Tensor) -> None:
        action = self.rng.randrange(7)
        if action == 0:  # another shape, declared only
            del proto.size[:]
            proto.size.extend(self.rng.choice([[], [0], [1, 3, HIDDEN + 1], [2**31], [1] * 12,
                                                [1, 2**20, HIDDEN], [3, 1, HIDDEN], [1, 1, HIDDEN], [2**32 - 1, 3]]))  # fmt: skip
        elif action == 1:
            proto.dtype = self.rng.choice(["float64", "int8", "complex64", "", "garbage", "bool", "int64", "float16"])
        elif action == 2:  # bytes cut, padded or replaced
            buffer = proto.buffer
            cut = self.rng.randrange(len(buffer) + 1)
            proto.buffer = self.rng.choice([buffer[:cut], buffer + os.urandom(self.rng.randrange(1, 64)),
                                            os.urandom(len(buffer))])  # fmt: skip
        elif action == 3:
            proto.chunks = self.rng.choice([0, 2, 3, 10**6, 2**31 - 1])
        elif action == 4:
            proto.compression = self.rng.choice([1, 2, 3])
        elif action == 5:  # NaN and infinities in the values
            values = torch.frombuffer(bytearray(proto.buffer), dtype=torch.uint8).clone()
            if len(values) >= 4:
                values[:4] = torch.tensor(list(b"\x00\x00\xc0\x7f"))  # a float32 NaN
            proto.buffer = values.numpy().tobytes()
        else:
            proto.requires_grad = True

    def message(self, meta: dict, tensors: list[torch.Tensor], valid: bool = False) -> list[runtime_pb2.ExpertRequest]:
        """One logical message, mutated 1 to 3 times unless `valid` (a tenth of the time it stays valid)."""
        protos = [serialize(t) for t in tensors]
        count, metadata = len(protos), None
        if not valid and self.rng.random() > 0.1:
            for _ in range(self.rng.randint(1, 3)):
                action = self.rng.randrange(7)
                if action <= 1:
                    meta = self.mutate_meta(meta)
                elif action == 2 and protos:
                    self.mutate_proto(self.rng.choice(protos))
                elif action == 3 and protos:  # a tensor dropped or repeated
                    index = self.rng.randrange(len(protos))
                    protos = protos[:index] + protos[index + 1 :] if self.rng.random() < 0.5 else protos + [protos[index]]
                    count = len(protos) if self.rng.random() < 0.5 else count
                elif action == 4:
                    count = self.rng.choice([-1, 0, 17, 2**40, "3", None])
                elif action == 5:
                    metadata = self.rng.choice([os.urandom(self.rng.randrange(0, 64)), msgpack.packb([1, 2]),
                                                msgpack.packb({"meta": 5, "tensors": 3}), b""])  # fmt: skip
                else:
                    values = self.inputs(self.rng.randint(1, 3), self.rng.randint(1, 300))  # other sizes, some too big
                    protos = [serialize(t) for t in values] + protos[3:]
        if metadata is None:
            try:
                metadata = msgpack.packb({"meta": meta, "tensors": count})
            except Exception:
                metadata = msgpack.packb({"meta": {}, "tensors": count})
        return [runtime_pb2.ExpertRequest(tensors=protos, metadata=metadata)]


def outcome(reply: tuple[list, dict] | None) -> str:
    """What a reply says: ok, or the error kind it names (a clear message is required)."""
    if reply is None:
        return "stream closed without a reply"
    meta = Reply.from_wire(reply[1])
    if meta.error is None:
        return "ok"
    return meta.error_kind if meta.error else "an error without a message"


class Fuzzer:
    """One fuzzing peer: its own P2P (peer id), a mutator, and an open inference session it may push to."""

    def __init__(self, p2p: P2P, peer: PeerID, seed: int):
        self.p2p, self.peer, self.mutator, self.rng = p2p, peer, Mutator(seed), random.Random(seed)
        self.session_id = f"fuzz-session-{seed}"

    async def stream(self, rpc: str, messages: list[list[runtime_pb2.ExpertRequest]]) -> str:
        """Send the logical messages in turn, each after the last one's reply was ok; the last reply's outcome."""
        queue: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (item := await queue.get()) is not None:
                yield item

        def send(i: int) -> None:
            for part in messages[i]:
                queue.put_nowait(part)
            if i == len(messages) - 1:
                queue.put_nowait(None)  # the end of our side: a message cut short is then known to be so

        send(0)
        responses = await self.p2p.iterate_protobuf_handler(self.peer, rpc, requests(), runtime_pb2.ExpertResponse)
        try:
            for i, message in enumerate(messages):
                if i:
                    send(i)
                result = outcome(await unpack(responses, 1 << 24))
                if result != "ok":
                    return result
            return result
        finally:
            queue.put_nowait(None)
            await responses.aclose()

    async def request(self, rpc: str) -> str:
        m, blocks = self.mutator, {"start": 0, "end": NUM_BLOCKS}
        if rpc in ("rpc_info", "rpc_leave_line"):  # a uid (a ticket, for leave_line) and nothing else
            name = RPC_INFO if rpc == "rpc_info" else RPC_LEAVE_LINE
            if self.rng.random() < 0.5:
                uid = runtime_pb2.ExpertUID(uid=os.urandom(self.rng.randrange(0, 64)).hex())
                await self.p2p.call_protobuf_handler(self.peer, name, uid, runtime_pb2.ExpertInfo)
                return "ok"
            try:
                await self.p2p._client.call_unary_handler(self.peer, name, os.urandom(self.rng.randrange(1, 256)))
                return "ok"
            except Exception as e:  # bytes that are no protobuf: hivemind answers its parse error
                return f"{type(e).__name__} (hivemind: not a protobuf)"
        if rpc in ("rpc_receipt", "rpc_ledger"):  # the points service's unary msgpack RPCs
            if rpc == "rpc_receipt":
                valid = {"membership": None, "receipts": [{"server": str(self.peer), "tokens": 5}]}
            else:
                valid = {"offset": 0, "limit": 10}
            payload = msgpack.packb(m.mutate_meta(valid) if self.rng.random() < 0.7 else valid)
            if self.rng.random() < 0.2:
                payload = os.urandom(self.rng.randrange(0, 128))
            name = RPC_RECEIPT if rpc == "rpc_receipt" else RPC_LEDGER
            try:
                reply = await self.p2p.call_protobuf_handler(
                    self.peer, name, runtime_pb2.ExpertInfo(serialized_info=payload), runtime_pb2.ExpertInfo
                )
            except Exception as e:
                return f"{type(e).__name__} (hivemind: not a protobuf)" if "protobuf" in str(e).lower() else repr(e)[:80]
            answer = msgpack.unpackb(reply.serialized_info, raw=False)
            return "refused (points error)" if isinstance(answer, dict) and answer.get("error") else "ok"
        if rpc == "rpc_forward":
            return await self.stream(RPC_FORWARD, [m.message(ForwardRequest(blocks=blocks).to_wire(), m.inputs())])
        if rpc == "rpc_backward":
            tensors = m.inputs() + [torch.randn(1, 3, HIDDEN, generator=m.gen)]
            return await self.stream(RPC_BACKWARD, [m.message(BackwardRequest(blocks=blocks).to_wire(), tensors)])
        if rpc == "rpc_inference":
            # an open and steps, one of them mutated and sent last: the server has all the messages before it
            mutated = self.rng.randrange(4)
            messages = [m.message(OpenSession(blocks=blocks, max_length=16, batch_size=1).to_wire(), [], valid=mutated != 0)]
            messages += [m.message(Step(position=i).to_wire(), m.inputs(1, 1), valid=i + 1 != mutated) for i in range(mutated)]
            result = await self.stream(RPC_INFERENCE, messages)
            # a step at a position already served (a push may have brought it) is skipped with no reply, by design
            return "stale step skipped" if result == "stream closed without a reply" else result
        session = self.session_id if self.rng.random() < 0.7 else os.urandom(6).hex()
        meta = Push(session_id=session, position=self.rng.randrange(0, 80)).to_wire()
        # on a push stream, as servers send them: a push taken is answered with nothing, by design
        result = await self.stream(RPC_PUSH, [m.message(meta, m.inputs(1, 1))])
        return "ok" if result == "stream closed without a reply" else result


async def fuzz(server_addr: str, server_peer: PeerID, seconds: dict[str, float]) -> dict[str, Counter]:
    counts = {rpc: Counter() for rpc in RPCS}
    p2ps = [await P2P.create(initial_peers=[server_addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False)
            for _ in range(PEERS)]  # fmt: skip
    fuzzers = [Fuzzer(p2p, server_peer, seed) for seed, p2p in enumerate(p2ps)]
    sessions = []  # each fuzzer's own session, open during the fuzz, the target of most of its pushes
    try:
        for fuzzer in fuzzers:
            from meadow.client.transport import InferenceStream

            stream = InferenceStream(fuzzer.p2p, server_peer)
            request = OpenSession(blocks={"start": 0, "end": NUM_BLOCKS}, max_length=MAX_LENGTH, batch_size=1,
                                  session_id=fuzzer.session_id)  # fmt: skip
            await stream.open(request, 30)
            sessions.append(stream)
        for rpc in RPCS:
            jobs, began = [(fuzzers[i % PEERS], rpc) for i in range(REQUESTS)], time.monotonic()

            async def worker(queue: list):
                while queue:
                    fuzzer, rpc = queue.pop()
                    try:
                        result = await asyncio.wait_for(fuzzer.request(rpc), REPLY_TIMEOUT)
                    except asyncio.TimeoutError:
                        result = "no reply in time"
                    except Exception as e:
                        result = f"{type(e).__name__}: {str(e)[:80]}"
                    counts[rpc][result] += 1

            await asyncio.gather(*[worker(jobs) for _ in range(PEERS * IN_FLIGHT)])
            seconds[rpc] = time.monotonic() - began
    finally:
        for stream in sessions:
            await stream.close()
        for p2p in p2ps:
            await p2p.shutdown()
    return counts


def test_fuzzed_server_stays_up_answers_clearly_and_keeps_honest_tokens(server):
    swarm, path, process, server_addr, server_peer = server
    pid = process.popen.pid
    baseline, group_baseline = rss_bytes(pid), group_rss_bytes(pid)
    peak, group_peak = baseline, group_baseline
    honest: dict = {}

    # joined here, before any other thread runs: hivemind forks the DHT's process, and a fork amid threads may hang
    config = ClientConfig(request_timeout=120, step_timeout=60, min_step_timeout=60, verify=0.0)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, client_config=config)

    def generate_honestly():  # an honest client generating while the fuzz goes on
        try:
            input_ids, outputs = torch.tensor([[1, 5, 9, 2, 7]]), []
            while not honest.get("stop") or not outputs:
                outputs.append(model.generate(input_ids, max_new_tokens=12, do_sample=False))
            honest["outputs"] = outputs
        except Exception as e:
            honest["error"] = e
        finally:
            model.sequence.close()

    client = threading.Thread(target=generate_honestly, daemon=True)
    client.start()
    started = time.monotonic()
    done = threading.Event()
    result, durations = {}, {}

    def run_fuzz():
        try:
            result["counts"] = asyncio.run(fuzz(server_addr, server_peer, durations))
        finally:
            done.set()

    fuzzing = threading.Thread(target=run_fuzz, daemon=True)
    fuzzing.start()
    while not done.wait(0.25):
        peak, group_peak = max(peak, rss_bytes(pid)), max(group_peak, group_rss_bytes(pid))
    seconds = time.monotonic() - started
    honest["stop"] = True
    client.join(300)

    counts = result["counts"]
    print(f"\nfuzz: {REQUESTS} requests per RPC from {PEERS} peers in {seconds:.0f} s; server RSS {baseline / 2**20:.0f} MiB "
          f"before, peak {peak / 2**20:.0f} MiB (+{(peak - baseline) / 2**20:.0f} MiB); with its DHT process and p2pd "
          f"{group_baseline / 2**20:.0f} MiB before, peak {group_peak / 2**20:.0f} MiB")  # fmt: skip
    for rpc, kinds in counts.items():
        print(f"  {rpc:14s} {durations[rpc]:5.1f} s  " + ", ".join(f"{kind}: {n}" for kind, n in kinds.most_common()))

    assert process.popen.poll() is None, "the server died"
    for rpc, kinds in counts.items():
        assert sum(kinds.values()) == REQUESTS
        clear = ("ok", "BadRequest", "ServerBusy", "WrongServer", "stale step skipped", "refused (points error)")
        unclear = {k: n for k, n in kinds.items() if k not in clear and "hivemind" not in k}
        assert not unclear, f"{rpc}: answers that are no clear error: {unclear}"
        assert kinds["BadRequest"] + kinds["refused (points error)"] > 0 or rpc in ("rpc_info", "rpc_leave_line")
    assert peak - baseline < 512 * 2**20, "the server's memory grew by over 512 MiB during the fuzz"
    assert group_peak - group_baseline < 1024 * 2**20, "the server's processes grew by over 1 GiB during the fuzz"
    assert "error" not in honest, honest.get("error")
    expected = load_reference_model(path).generate(torch.tensor([[1, 5, 9, 2, 7]]), max_new_tokens=12, do_sample=False)
    assert honest["outputs"] and all(torch.equal(output, expected) for output in honest["outputs"])


def test_a_peer_holding_many_unfinished_requests_is_told_busy_and_others_are_served(server):
    """A peer's requests count from their first byte: one that opens max_peer_requests (16) forwards and never
    finishes sending them gets ServerBusy for the next, while another peer is served; once it lets go, so is it."""
    _, _, _, server_addr, server_peer = server
    blocks = {"start": 0, "end": NUM_BLOCKS}

    async def scenario() -> tuple[str, str, str, str]:
        hog, other = [await P2P.create(initial_peers=[server_addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                       nat_port_map=False) for _ in range(2)]  # fmt: skip
        hog_fuzzer, other_fuzzer = Fuzzer(hog, server_peer, 0), Fuzzer(other, server_peer, 1)
        holding, streams = asyncio.Event(), []

        async def unfinished():  # a header announcing 3 tensors, one of them sent, then nothing more
            (part,) = Mutator(0).message(ForwardRequest(blocks=blocks).to_wire(), Mutator(0).inputs()[:1], valid=True)
            part.metadata = msgpack.packb({"meta": ForwardRequest(blocks=blocks).to_wire(), "tensors": 3})
            yield part
            await holding.wait()

        try:
            for _ in range(16):
                streams.append(await hog.iterate_protobuf_handler(server_peer, RPC_FORWARD, unfinished(), runtime_pb2.ExpertResponse))
            await asyncio.sleep(1.0)  # the server has read their first parts
            valid = [Mutator(2).message(ForwardRequest(blocks=blocks).to_wire(), Mutator(2).inputs(), valid=True)]
            busy = await hog_fuzzer.stream(RPC_FORWARD, valid)
            reply = await unpack(await hog.iterate_protobuf_handler(server_peer, RPC_FORWARD, _iterate(valid[0]),
                                                                    runtime_pb2.ExpertResponse), 1 << 24)  # fmt: skip
            served = await other_fuzzer.stream(RPC_FORWARD, valid)
            holding.set()
            for stream in streams:
                await stream.aclose()
            await asyncio.sleep(1.0)
            again = await hog_fuzzer.stream(RPC_FORWARD, valid)
            return busy, Reply.from_wire(reply[1]).error or "", served, again
        finally:
            for p2p in (hog, other):
                await p2p.shutdown()

    busy, message, served, again = asyncio.run(scenario())
    assert busy == "ServerBusy" and "you already have 16 requests in progress here" in message
    assert served == "ok" and again == "ok"


async def _iterate(messages):
    for message in messages:
        yield message
