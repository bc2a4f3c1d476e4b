"""Continuous batching: a server runs the waiting work of all its sessions as one pass, fairly among peers, and
nothing a client sees changes. Outputs are compared with the same server code run for each session alone, and
greedy tokens with transformers run locally."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import start_swarm
from meadow import AutoDistributedModelForCausalLM
from meadow.client import transport
from meadow.client.config import ClientConfig
from meadow.client.event_loop import run
from meadow.client.sequence import connect_sequence
from meadow.client.session import GROWTH_TOKENS
from meadow.client.tuning import RemoteTuning
from meadow.models import load_blocks, load_config
from meadow.models.llama import linear_shapes
from meadow.models.lora import load_peft_adapter
from meadow.server.compute_loop import GATHER_PASSES, ComputeLoop, Decoder, choose_batch, gather_until
from meadow.server.memory import BY_ARRIVAL_EVERY, LINE_PATIENCE, CacheBudget
from meadow.server.span import Session, Span
from meadow.server.tuning import TuningInputs
from meadow.wire import RPC_INFO, BadRequest, BlockRange, LoraEntry, OpenSession, RemoteError, ServerBusy

NUM_BLOCKS, HIDDEN, ADAPTER = 4, 64, "tiny-adapter"
CACHE_TOKENS = 6000


# --- the scheduler's decisions, as pure functions ------------------------------------------------------------------


@dataclass
class Waiting:
    peer: str
    order: int
    tokens: int = 1
    decoding: bool = True
    priority: int = 0


def test_a_peer_with_fifty_sessions_does_not_starve_a_peer_with_one():
    crowd = [Waiting("crowd", order) for order in range(50)]
    alone = Waiting("alone", 50)  # arrived last
    chosen = choose_batch(crowd + [alone], {True: {}, False: {}}, max_decoding_tokens=10, chunk_tokens=256)
    assert alone in chosen and len(chosen) == 10
    assert [job.order for job in chosen if job.peer == "crowd"] == list(range(9))  # the crowd's oldest steps


def test_higher_priority_work_goes_first():
    jobs = [Waiting("a", order) for order in range(5)] + [Waiting("b", 5, priority=1)]
    chosen = choose_batch(jobs, {True: {}, False: {}}, max_decoding_tokens=2, chunk_tokens=256)
    assert chosen[0].peer == "b" and len(chosen) == 2


@dataclass
class Arrived:
    session: str
    arrived: float


def test_a_new_prompt_waits_for_the_decoding_steps_due_soon_but_a_long_prompts_later_chunks_do_not():
    # on a CPU server, a prompt run alone would cost a whole pass and hold up the steps that come meanwhile
    soon, late = Decoder(ended=10.0, interval=0.02), Decoder(ended=10.0, interval=0.5)
    decoders, now, pass_seconds = {"soon": soon, "late": late}, 10.001, 0.01
    assert soon.next <= now + GATHER_PASSES * pass_seconds < late.next
    assert gather_until([Arrived("prompt", now)], decoders, now, pass_seconds) == soon.due  # not the late one
    assert gather_until([Arrived("prompt", now), Arrived("soon", now)], decoders, now, pass_seconds) <= now  # all in
    later_chunk = Arrived("prompt", now - 1.0)  # a job keeps its first arrival time: its next chunk runs at once
    assert gather_until([later_chunk], decoders, now, pass_seconds) <= now


def test_prefill_chunks_take_turns_among_peers_while_every_decoding_step_runs_each_pass():
    turns = {True: {}, False: {}}
    prefills = [Waiting("big", order, tokens=256, decoding=False) for order in range(5)]
    prefills.append(Waiting("small", 5, tokens=256, decoding=False))
    decoding = [Waiting(f"decoder{i}", 10 + i) for i in range(3)]
    served = []
    for iteration in range(4):
        chosen = choose_batch(prefills + decoding, turns, max_decoding_tokens=4096, chunk_tokens=256)
        assert all(job in chosen for job in decoding)  # decoding never waits behind prefills
        (chunk,) = [job for job in chosen if not job.decoding]  # one chunk of bigger work per pass
        served.append(chunk.peer)
        prefills.remove(chunk)
        for job in chosen:
            turns[job.decoding][job.peer] = iteration
    assert served == ["big", "small", "big", "big"]  # the small peer's prompt went second, not sixth


def test_sessions_waiting_for_room_are_served_in_order_of_priority_then_arrival():
    budget = CacheBudget(200, patience=0.5)

    def refused(tokens: int, peer: str, priority: int = 0, ticket: bool = True) -> bool:
        try:
            with budget.reserve(tokens, peer, f"ticket-{peer}" if ticket else None, priority):
                return False
        except ServerBusy:
            return True

    with budget.reserve(150, "holder"):
        assert refused(120, "first") and refused(120, "second")
        assert budget.room == 0  # routing is told the server is full while others wait
        assert refused(40, "third")  # it would fit in the 50 left, but the two ahead of it wait for that room
        with pytest.raises(ServerBusy, match="sessions waiting ahead of yours claim 240"):
            with budget.reserve(40, "third", "ticket-third"):
                pass
    assert refused(120, "second") and refused(40, "third")  # room came, but it is the first's turn
    with budget.reserve(120, "first", "ticket-first"):
        assert refused(40, "third")  # 80 left: the second waits for 120 of them
        assert refused(10, "anonymous", ticket=False)  # no ticket, no place: behind everyone who waits
    assert not refused(120, "second") and not refused(40, "third")
    with budget.reserve(150, "holder"):  # a paying newcomer goes ahead of a priority-0 waiter
        assert refused(120, "fourth") and refused(120, "paying", priority=1)
    assert refused(120, "fourth") and not refused(120, "paying", priority=1) and not refused(120, "fourth")
    with budget.reserve(150, "holder"):
        assert refused(100, "sixth") and budget.line
    time.sleep(0.6)  # a waiter that stops asking (served elsewhere, or gone) loses its place
    assert budget.room == 200 and not budget.line
    with budget.reserve(150, "holder"):
        assert refused(100, "seventh")
    assert budget.room == 100  # the room it waits for is claimed...
    budget.leave("holder", "ticket-seventh")  # ...and only the waiter's own peer can take its place out of the line
    assert budget.room == 100
    budget.leave("seventh", "ticket-seventh")  # one that says it waits no more gives the room back at once
    assert budget.room == 200 and not budget.line


def test_a_session_grows_before_newcomers_in_line_but_not_into_room_that_higher_priority_ones_claim():
    budget = CacheBudget(200, max_peer_share=0.75, patience=5.0)
    with budget.reserve(50, "grower") as held:
        budget.grow(held, 30)
        assert budget.left == 120 and budget.peer_tokens["grower"] == 80
        with pytest.raises(BadRequest, match="would hold 160 token slots"):  # past its peer's share: never
            budget.grow(held, 80)
        with budget.reserve(80, "other"):
            with pytest.raises(ServerBusy, match="growing the session needs 60 more token slots"):
                budget.grow(held, 60)  # 40 left
            with pytest.raises(ServerBusy):
                with budget.reserve(50, "waiter", "ticket-waiter"):  # refused: it waits in line for 50 slots
                    pass
            budget.grow(held, 10)  # a running session grows before it: 30 left
            with pytest.raises(ServerBusy):
                with budget.reserve(40, "first", "ticket-first", priority=1):  # waits in line for 40 slots
                    pass
            with pytest.raises(ServerBusy, match="sessions waiting ahead of yours claim 40"):
                budget.grow(held, 10)  # it would fit in the 30 left, but one of higher priority waits for them
        budget.grow(held, 10)  # room enough for all now
        assert held.tokens == 100
    assert budget.left == 200 and not budget.peer_tokens  # the grown slots go back with the session


def test_waiters_without_points_are_not_starved_by_those_with():
    budget = CacheBudget(100)
    waiting = [("poor", 0)] + [(f"rich{i}", 5) for i in range(6)]  # the poor one came first
    with budget.reserve(100, "holder"):
        for peer, priority in waiting:
            with pytest.raises(ServerBusy):
                with budget.reserve(100, peer, f"ticket-{peer}", priority):
                    pass
    served = []
    for _ in range(len(waiting)):  # each round, all ask in turn; room for one
        for peer, priority in waiting:
            try:
                with budget.reserve(100, peer, f"ticket-{peer}", priority):
                    served.append(peer)
            except ServerBusy:
                continue
            waiting.remove((peer, priority))
            break
    assert served.index("poor") < BY_ARRIVAL_EVERY  # not last: every 4th turn goes to the longest wait
    assert [peer for peer in served if peer != "poor"] == [f"rich{i}" for i in range(6)]


def test_one_peers_waiting_sessions_keep_their_order_and_claim_no_more_room_than_its_share():
    budget = CacheBudget(200, max_peer_share=0.75, max_peer_sessions=3)  # one peer: 150 slots, 3 sessions

    def refused(tokens: int, peer: str, ticket: str) -> bool:
        try:
            with budget.reserve(tokens, peer, ticket):
                return False
        except ServerBusy:
            return True

    with budget.reserve(100, "api"):  # an API's first user
        assert refused(100, "api", "second-user")  # 100 + 100: more than one peer may hold
        # it would fit, but its peer's earlier request comes first
        with pytest.raises(ServerBusy, match=r"hold 100 \(and wait for 1, for 100 slots\) and the session needs 40"):
            with budget.reserve(40, "api", "third-user"):
                pass
        assert refused(10, "api", "fourth-user")  # 1 session held and 2 waiting: its 3
        assert budget.room == 100  # what the API's users wait for is more than its share: it keeps nobody out
        assert not refused(100, "other", "other")
    assert not refused(100, "api", "second-user") and not refused(40, "api", "third-user")


# --- one batched pass gives each session what it would get alone (in process) ---------------------------------------


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints("llama", num_layers=NUM_BLOCKS, hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def adapter(path, tmp_path_factory) -> Path:
    """A peft adapter folder with random (non-zero) weights on q, v and down projections."""
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    folder = tmp_path_factory.mktemp("adapters") / ADAPTER
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def span(path, adapter) -> Span:
    """The server's own blocks in this process: the reference for running a session alone."""
    config = load_config(path)
    adapters = {ADAPTER: load_peft_adapter(adapter, config, 0, NUM_BLOCKS, torch.float32, "cpu")}
    blocks = load_blocks(path, config, 0, NUM_BLOCKS, torch.float32, "cpu")
    return Span(blocks, 0, config, torch.float32, torch.device("cpu"), adapters)


@dataclass
class Kind:
    """One kind of session: its blocks, batch size, tuning, and whether its prompt is left-padded."""

    blocks: BlockRange
    batch: int = 1
    prompts: bool = False
    lora: bool = False
    adapter: bool = False
    padded: bool = False


KINDS = [
    Kind(BlockRange(start=0, end=4)),
    Kind(BlockRange(start=0, end=4), batch=2, padded=True),
    Kind(BlockRange(start=1, end=3)),
    Kind(BlockRange(start=0, end=4), prompts=True),
    Kind(BlockRange(start=2, end=4), lora=True),
    Kind(BlockRange(start=0, end=4), adapter=True, prompts=True),
]


def session_tuning(kind: Kind, seed: int, config) -> RemoteTuning:
    """Random deep prompts and client LoRA weights (on q and gate projections), as `kind` asks."""
    generator = torch.Generator().manual_seed(seed)
    tuning = RemoteTuning()
    if kind.lora:
        shapes, entries, sizes = linear_shapes(config), [], []
        for block in range(kind.blocks.start, kind.blocks.end):
            for module in ("q_proj", "gate_proj"):
                entries.append(LoraEntry(block=block, module=module, rank=2, scale=0.5))
                sizes.append(2 * sum(shapes[module]))
        flat = torch.randn(sum(sizes), generator=generator) * 0.3
        tuning = RemoteTuning(lora_flat=flat, entries=tuple(entries), sizes=tuple(sizes))
    if kind.prompts:
        tuning = tuning.with_tensors(torch.randn(NUM_BLOCKS, 3, HIDDEN, generator=generator) * 0.5, tuning.lora_flat)
    return tuning


def span_tuning(span: Span, kind: Kind, tuning: RemoteTuning) -> TuningInputs:
    """What a server makes of the tuning a client sends for `kind.blocks`."""
    fields, tensors = tuning.for_hop(kind.blocks)
    tensors = iter(tensors)
    prompts = next(tensors) if fields["prompts"] else None
    lora_flat = next(tensors) if fields["lora"] else None
    adapter = span.adapters[ADAPTER][kind.blocks.start : kind.blocks.end] if kind.adapter else None
    return TuningInputs(kind.blocks, prompts, lora_flat, fields["lora"], adapter)


def steps_of(kind: Kind, seed: int, prompt_length: int, decoding_steps: int) -> list[list[torch.Tensor]]:
    """Inputs of a prefill of `prompt_length` tokens, then of single-token decoding steps."""
    generator = torch.Generator().manual_seed(seed)
    steps, position = [], 0
    for length in [prompt_length] + [1] * decoding_steps:
        hidden = torch.randn(kind.batch, length, HIDDEN, generator=generator)
        positions = torch.arange(position, position + length).repeat(kind.batch, 1)
        mask = torch.ones(kind.batch, length, dtype=torch.bool)
        if kind.padded and position == 0:
            mask[0, :2] = False  # the first row is left-padded by two tokens
            positions[0] = (positions[0] - 2).clamp(min=0)
        elif kind.padded:
            positions[0] -= 2
        steps.append([hidden, positions, mask])
        position += length
    return steps


def alone(span: Span, kind: Kind, tuning: TuningInputs, steps, max_length: int) -> list[torch.Tensor]:
    session = Session.open(span, kind.blocks, kind.batch, max_length, tuning)
    return [session.step(span, *inputs) for inputs in steps]


def test_one_batched_pass_of_mixed_sessions_equals_each_session_alone(span):
    loop = ComputeLoop(chunk_tokens=16, max_decoding_tokens=4096)  # prompts longer than 16 tokens go in chunks
    cases = []
    for i in range(18):
        kind = KINDS[i % len(KINDS)]
        tuning = span_tuning(span, kind, session_tuning(kind, i, span.config))
        cases.append((kind, tuning, steps_of(kind, seed=i, prompt_length=3 + (7 * i) % 41, decoding_steps=4)))

    async def drive(kind: Kind, tuning: TuningInputs, steps) -> list[torch.Tensor]:
        session = Session.open(span, kind.blocks, kind.batch, 64, tuning)
        outputs = []
        for inputs in steps:
            decoding = inputs[0].shape[1] == 1
            outputs.append(await loop.run(session.step_pieces(*inputs, loop.chunk_tokens), span, "peer", 0, decoding, session))
        return outputs

    async def everyone():
        return await asyncio.gather(*(drive(*case) for case in cases))

    batched = asyncio.run(everyone())
    assert loop.iterations < sum(len(steps) for _, _, steps in cases) / 2  # sessions did share passes
    for (kind, tuning, steps), outputs in zip(cases, batched):
        for got, expected in zip(outputs, alone(span, kind, tuning, steps, 64)):
            assert (got - expected).abs().max().item() <= 1e-5, kind


def test_forward_and_training_requests_in_chunks_equal_one_piece(span):
    generator = torch.Generator().manual_seed(5)
    blocks, kind = span.range, KINDS[5]
    tuning = span_tuning(span, kind, session_tuning(kind, 5, span.config))
    hidden = torch.randn(3, 40, HIDDEN, generator=generator)
    positions, mask = torch.arange(40).repeat(3, 1), torch.ones(3, 40, dtype=torch.bool)
    mask[1, :5] = False
    grad = torch.randn(3, 40, HIDDEN, generator=generator)
    loop = ComputeLoop(chunk_tokens=16, max_decoding_tokens=4096)  # rows longer than a chunk use a temporary cache

    async def requests():
        forward = loop.run(span.forward_pieces(hidden, positions, mask, blocks, tuning, 16), span, "a")
        training = loop.run(span.graph_pieces(hidden, positions, mask, blocks, tuning, 16), span, "b")
        output, graphs = await training
        backward = loop.run(span.backward_pieces(hidden, positions, mask, blocks, grad, tuning, graphs, 16), span, "b")
        return await forward, output, await backward

    forward, output, grads = asyncio.run(requests())
    expected = span.run(hidden, positions, mask, blocks, tuning)
    assert (forward - expected).abs().max().item() <= 1e-5
    assert (output - expected).abs().max().item() <= 1e-5
    for got, want in zip(grads, span.backward(hidden, positions, mask, blocks, grad, tuning)):
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4


# --- a loaded server, through real processes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm(path, adapter):
    extra = ["--adapters", str(adapter), "--cache-tokens", str(CACHE_TOKENS), "--chunk-tokens", "32"]
    swarm = start_swarm(path, ["0:2", "2:4"], *extra)
    try:
        yield swarm
    finally:
        swarm.stop()


def server_info(sequence, peer) -> dict:
    info = run(sequence.p2p.call_protobuf_handler(peer, RPC_INFO, runtime_pb2.ExpertUID(), runtime_pb2.ExpertInfo))
    return msgpack.unpackb(info.serialized_info)


def memory_mib(process) -> float:
    """Resident memory of a server process and its children (its p2p daemon), in MiB."""
    status = Path(f"/proc/{process.popen.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def test_thirty_two_concurrent_sessions_of_mixed_kinds_are_each_exact(swarm, path, span):
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = local.config.vocab_size
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers)
    tuned = connect_sequence(str(path), span.config, swarm.initial_peers, active_adapter=ADAPTER)
    memory_before = [memory_mib(server) for server in swarm.servers]
    start = threading.Barrier(32)

    def greedy(i: int) -> None:
        # prompts from 2 to 77 tokens: the long ones are prefilled in chunks of 32 between the others' decoding
        prompt = torch.randint(4, vocab, (1, 2 + 5 * i), generator=torch.Generator().manual_seed(i))
        expected = local.generate(prompt, max_new_tokens=8, do_sample=False)
        start.wait()
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected), f"session {i}"

    def hidden_states(i: int) -> None:
        kind = replace(KINDS[(i // 2) % len(KINDS)], blocks=BlockRange(start=0, end=NUM_BLOCKS))  # the client's view
        tuning = session_tuning(kind, 100 + i, span.config)
        steps = steps_of(kind, seed=100 + i, prompt_length=4 + (9 * i) % 50, decoding_steps=6)
        expected = alone(span, kind, span_tuning(span, kind, tuning), steps, 64)
        sequence = tuned if kind.adapter else model.sequence
        start.wait()
        with sequence.inference_session(max_length=64, batch_size=kind.batch, tuning=tuning) as session:
            for inputs, want in zip(steps, expected):
                got = session.step(*inputs)
                assert (got - want).abs().max().item() <= 1e-4, f"session {i} ({kind})"

    try:
        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(greedy if i % 2 else hidden_states, i) for i in range(32)]
            for future in futures:
                future.result()
        peer = tuned.make_chain()[0].peer
        # every session's cache is back: a server frees it when it reads the end of the session's stream, a moment
        # after the client closed it
        deadline = time.monotonic() + 10
        while server_info(tuned, peer)["cache_tokens_left"] != CACHE_TOKENS and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server_info(tuned, peer)["cache_tokens_left"] == CACHE_TOKENS
    finally:
        model.sequence.close()
        tuned.close()
    # 32 sessions of up to 64 tokens on a 64-wide model: a few MiB of cache; a leak per step would show
    assert all(memory_mib(server) - before < 200 for server, before in zip(swarm.servers, memory_before))


def test_a_peer_cannot_take_a_whole_server_and_a_busy_server_is_skipped_not_banned(swarm, path, span, caplog):
    first, second = (connect_sequence(str(path), span.config, swarm.initial_peers) for _ in range(2))
    peer = first.make_chain()[0].peer
    share = int(0.75 * CACHE_TOKENS)  # the default max_peer_cache_share
    streams = []

    def open_session(sequence, peer, blocks: str, max_length: int) -> None:
        stream = transport.InferenceStream(sequence.p2p, peer)
        start, end = (int(b) for b in blocks.split(":"))
        run(stream.open(OpenSession(blocks=BlockRange(start=start, end=end), max_length=max_length, batch_size=1), 30))
        streams.append(stream)

    helper = None
    try:
        open_session(first, peer, "0:2", share - 10)
        with pytest.raises(RemoteError, match="one peer may hold at most") as busy:
            open_session(first, peer, "0:2", 20)
        assert busy.value.kind == "ServerBusy"
        open_session(second, peer, "0:2", 20)  # another peer still gets room
        with pytest.raises(RemoteError, match="not enough KV cache") as full:
            open_session(second, peer, "0:2", CACHE_TOKENS - share)
        assert full.value.kind == "ServerBusy"

        # a one-hop server that announced room, then filled up: the client meets ServerBusy there, goes on to the
        # two-hop chain, and does not count the busy server as failed
        helper = swarm.start_server(path, "--blocks", "0:4", "--cache-tokens", "200")
        helper_peer = wait_for_server(second, "0:4")
        open_session(second, helper_peer, "0:4", 150)  # leaves 50 of its 200 token slots
        client = connect_sequence(str(path), span.config, swarm.initial_peers)
        # the same round trip to every server, for good: a first ping, which may dial, can read several times
        # another's, and then two hops may beat one
        client.update_routes(force=True)
        client.rtt = dict.fromkeys(client.servers, 0.005)
        client.rtt_expires = dict.fromkeys(client.servers, float("inf"))
        kind = KINDS[0]
        steps = steps_of(kind, seed=7, prompt_length=5, decoding_steps=2)
        with caplog.at_level("INFO", logger="meadow.client"):
            with client.inference_session(max_length=100, batch_size=1) as session:  # needs 100 slots
                outputs = [session.step(*inputs) for inputs in steps]
                assert helper_peer not in [segment.hop.peer for segment in session.segments]
        assert "ServerBusy" in caplog.text  # the helper was tried first (one hop beats two)
        for got, want in zip(outputs, alone(span, kind, TuningInputs(kind.blocks), steps, 100)):
            assert (got - want).abs().max().item() <= 1e-4
        assert client.failures.get(helper_peer, 0) == 0
        client.close()
    finally:
        for stream in streams:
            run(stream.close())
        first.close()
        second.close()
        if helper is not None:
            helper.stop()


@pytest.fixture(scope="module")
def small_server(path):
    """One server of all blocks with room for 200 KV-cache token slots, of which it lends one peer 150 (0.75)."""
    with start_swarm(path, ["0:4"], "--cache-tokens", "200") as swarm:
        yield swarm


def test_a_full_server_is_waited_for_and_a_session_it_can_never_hold_is_refused_at_once(
    small_server, path, span, caplog
):
    """The only server of the blocks is full: a client waits for room (ServerBusy uses up none of its failovers)
    and is served, exactly, once another client's session ends; up to `busy_wait` seconds, or until it gives up. A
    session larger than the server lends one peer is refused with BadRequest at once: waiting would not help."""
    kind = KINDS[0]
    steps = steps_of(kind, seed=11, prompt_length=5, decoding_steps=3)
    # without the wait, two ServerBusy answers and it gave up; and a full server skipped for a while is no reason to
    # call its blocks missing, however short the wait for servers (the API's is 5 s)
    quick = dict(max_retries=1, busy_retry=1.5, wait_for_servers=0.5)
    peers = small_server.initial_peers
    clients = [
        connect_sequence(str(path), span.config, peers, client_config=ClientConfig(**quick, **extra))
        for extra in ({}, {}, {"busy_wait": 1.0})
    ]
    holder, patient, impatient = clients
    outputs, waited, abandoned = [], [], []

    def generate() -> None:
        began = time.monotonic()
        with patient.inference_session(max_length=100, batch_size=1) as session:
            outputs.extend(session.step(*inputs) for inputs in steps)
        waited.append(time.monotonic() - began)

    try:
        with pytest.raises(RemoteError, match="lends one peer at most 150") as too_large:
            with patient.inference_session(max_length=151, batch_size=1) as session:
                session.step(*steps[0])
        assert too_large.value.kind == "BadRequest"
        with holder.inference_session(max_length=150, batch_size=1) as held:
            held.step(*steps[0])  # 150 of the 200 slots: no room for another 100
            with pytest.raises(RemoteError, match="not enough KV cache") as busy:
                with impatient.inference_session(max_length=100, batch_size=1) as session:
                    session.step(*steps[0])
            assert busy.value.kind == "ServerBusy"
            give_up = threading.Event()  # whoever wanted the answer has gone (an API client, say): stop waiting
            waiting = threading.Thread(target=step_until_given_up, args=(patient, 100, steps[0], give_up, abandoned))
            waiting.start()
            time.sleep(2.0)
            assert waiting.is_alive()
            give_up.set()
            waiting.join(timeout=30)  # a try a second (busy_retry), not busy_wait's 300 s
            assert not waiting.is_alive() and abandoned[0].kind == "ServerBusy"
            with caplog.at_level("WARNING", logger="meadow.client"):
                waiting = threading.Thread(target=generate)
                waiting.start()
                time.sleep(4.0)  # long past the two tries it had before
                assert waiting.is_alive() and not outputs
        waiting.join(timeout=60)
        assert len(outputs) == len(steps) and waited[0] >= 4.0
        assert "waiting up to 300 s for room" in caplog.text
        for got, want in zip(outputs, alone(span, kind, TuningInputs(kind.blocks), steps, 100)):
            assert (got - want).abs().max().item() <= 1e-4
        assert not patient.failures and not patient.banned(skipped=False)
    finally:
        for client in clients:
            client.close()


def test_a_chat_whose_servers_are_full_says_it_waits_and_a_ctrl_c_stops_the_wait(
    small_server, path, capsys, caplog
):
    """`meadow chat` on a full server: the turn says, before any reply, that it waits for room. A Ctrl-C then stops
    the wait at once (not after busy_wait's 300 s), and the message is left out of the conversation; asked again,
    the reply comes once the other session ends."""
    import os
    import signal

    from meadow.client.chat import Conversation, Sampling, _answer
    from meadow.models import load_tokenizer

    peers, sampling = small_server.initial_peers, Sampling(max_new_tokens=60)  # 60-odd slots: not in the 50 left
    holder = connect_sequence(str(path), load_config(path), peers)
    quick = ClientConfig(busy_retry=0.5)
    with AutoDistributedModelForCausalLM.from_pretrained(str(path), peers, client_config=quick) as model:
        conversation = Conversation(model, load_tokenizer(path), max_length=512)

        def once_waiting(then) -> threading.Thread:
            """`then()` once the turn (on the main thread, as in `meadow chat`) has begun to wait for room."""
            waits = len([r for r in caplog.records if "is full (ServerBusy" in r.getMessage()])

            def watch() -> None:
                while len([r for r in caplog.records if "is full (ServerBusy" in r.getMessage()]) == waits:
                    time.sleep(0.05)
                time.sleep(0.5)  # the notice's check comes every 0.25 s
                then()

            thread = threading.Thread(target=watch, daemon=True)
            thread.start()
            return thread

        try:
            with caplog.at_level("WARNING", logger="meadow.client"), holder.inference_session(150, 1) as held:
                held.step(torch.randn(1, 3, HIDDEN), torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool))
                once_waiting(lambda: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C, as the terminal sends it
                assert _answer("Name a flower", conversation, sampling)
                shown = capsys.readouterr().out
                assert "waiting for room" in shown and "stopped: this message is not part" in shown
                assert conversation.messages == [] and conversation.ids is None
                once_waiting(held.close)
                assert _answer("Name a flower", conversation, sampling)
            shown = capsys.readouterr().out
            reply = conversation.messages[-1]["content"]
            assert [m["role"] for m in conversation.messages] == ["user", "assistant"] and reply
            assert shown.count("waiting for room") == 1 and shown.index("waiting for room") < shown.index(reply)
        finally:
            conversation.close()  # its session, as `meadow chat` closes it
            holder.close()


def test_room_that_frees_up_goes_to_the_session_that_waited_longest(small_server, path, span):
    """A newcomer that asks the moment room frees up does not take it from a session already waiting (which asks
    only every few seconds): it is told how many wait ahead of it, and the first in line gets the room."""
    kind = KINDS[0]
    steps = steps_of(kind, seed=12, prompt_length=5, decoding_steps=3)
    configs = ({}, {"busy_retry": 3.0}, {"busy_wait": 0.5, "busy_retry": 0.2})
    clients = [
        connect_sequence(str(path), span.config, small_server.initial_peers, client_config=ClientConfig(**config))
        for config in configs
    ]
    holder, first, newcomer = clients
    outputs = []

    def generate() -> None:
        with first.inference_session(max_length=120, batch_size=1) as session:
            outputs.extend(session.step(*inputs) for inputs in steps)

    try:
        peer = holder.make_chain()[0].peer
        newcomer.make_chain()  # its routes known: it asks within a moment of the room freeing up, well before the first
        with holder.inference_session(max_length=150, batch_size=1) as held:
            held.step(*steps[0])  # 50 slots left: not enough for 120
            waiting = threading.Thread(target=generate)
            waiting.start()
            announces_room(holder, peer, 0)  # the first is in line for 120
        # the holder is gone: 200 free, of which the first waits for 120, and asks again in 3 s
        announces_room(holder, peer, 200 - 120)
        with pytest.raises(RemoteError, match="sessions waiting ahead of yours claim 120") as busy:
            with newcomer.inference_session(max_length=120, batch_size=1) as session:
                session.step(*steps[0])
        assert busy.value.kind == "ServerBusy"
        waiting.join(timeout=60)
        assert len(outputs) == len(steps)
        for got, want in zip(outputs, alone(span, kind, TuningInputs(kind.blocks), steps, 120)):
            assert (got - want).abs().max().item() <= 1e-4
    finally:
        for client in clients:
            client.close()


def test_a_session_given_up_while_it_waits_leaves_the_line_at_once(small_server, path, span):
    """A session that waits for room and is given up (its user left) tells the full server: the room its place
    claimed is there for others at once, not only once the place would lapse (LINE_PATIENCE after its last ask)."""
    steps = steps_of(KINDS[0], seed=13, prompt_length=5, decoding_steps=0)
    config = ClientConfig(busy_retry=0.2)  # it asks often: its place would lapse about LINE_PATIENCE after it left
    holder, leaving = [
        connect_sequence(str(path), span.config, small_server.initial_peers, client_config=config) for _ in range(2)
    ]
    give_up, errors = threading.Event(), []
    try:
        peer = holder.make_chain()[0].peer
        with holder.inference_session(max_length=150, batch_size=1) as held:
            held.step(*steps[0])  # 50 slots left
            waiting = threading.Thread(target=step_until_given_up, args=(leaving, 120, steps[0], give_up, errors))
            waiting.start()
            announces_room(holder, peer, 0)  # the other session waits for 120
            give_up.set()
            waiting.join(timeout=30)
            assert errors and errors[0].kind == "ServerBusy"  # it gave up, refused for room
            announces_room(holder, peer, 50, within=LINE_PATIENCE / 2)
    finally:
        holder.close()
        leaving.close()


def test_a_session_grows_past_its_max_length_and_one_refused_room_to_grow_is_reopened_when_there_is(
    small_server, path, span, caplog
):
    """A session that outgrows the max_length it was opened with grows on its server, exactly; a server that has no
    room for the growth (ServerBusy) is not counted as failed: the session waits for room like a new one, is reopened
    at its grown length and its cache rebuilt from its history."""
    kind = KINDS[0]
    steps = steps_of(kind, seed=14, prompt_length=5, decoding_steps=4)
    expected = alone(span, kind, TuningInputs(kind.blocks), steps, 200)
    config = ClientConfig(max_retries=0, busy_retry=0.2)  # growth refused for room must not use up a failover
    grower, holder = (
        connect_sequence(str(path), span.config, small_server.initial_peers, client_config=config) for _ in range(2)
    )
    try:
        peer = grower.make_chain()[0].peer
        with grower.inference_session(max_length=6, batch_size=1) as session:
            outputs = [session.step(*inputs) for inputs in steps[:3]]  # 7 tokens: the third step grew it
            assert session.max_length == 6 + GROWTH_TOKENS
            assert [segment.max_length for segment in session.segments] == [session.max_length]  # grown: no more asked
            announces_room(grower, peer, 200 - session.max_length)  # the server holds the grown cache
            with holder.inference_session(max_length=60, batch_size=1) as held:
                held.step(*steps[0])
                session.max_length = 150  # the next step grows it by 16 slots: 200 - 134 - 60 = 6 are left
                releasing = threading.Timer(1.0, held.close)
                releasing.start()
                with caplog.at_level("INFO", logger="meadow.client"):
                    outputs += [session.step(*inputs) for inputs in steps[3:]]
                releasing.join()
            assert "not enough KV cache: growing the session needs" in caplog.text
            assert "rebuilt the cache of blocks 0:4" in caplog.text
            assert [segment.max_length for segment in session.segments] == [150]
        announces_room(grower, peer, 200)  # every slot back, the grown ones too
        for got, want in zip(outputs, expected):
            assert (got - want).abs().max().item() <= 1e-4
        assert not grower.failures
    finally:
        grower.close()
        holder.close()


def test_a_session_left_idle_gives_its_room_to_one_that_waits_and_is_rebuilt_when_it_returns(path, span, caplog):
    """A full server closes a session that has sat idle for --reclaim-idle seconds when another waits for its room
    (before then, the newcomer waits); the idle session's client, back, rebuilds it (here, once the newcomer is done)
    and gets exactly what it would have, and counts no server as failed."""
    kind = KINDS[0]
    steps = steps_of(kind, seed=15, prompt_length=5, decoding_steps=2)
    expected = alone(span, kind, TuningInputs(kind.blocks), steps, 120)
    config = ClientConfig(max_retries=0, busy_retry=0.2, busy_wait=10.0)
    with start_swarm(path, ["0:4"], "--cache-tokens", "200", "--reclaim-idle", "3") as swarm:
        idle, newcomer = (
            connect_sequence(str(path), span.config, swarm.initial_peers, client_config=config) for _ in range(2)
        )
        try:
            newcomer.make_chain()  # its routes known: what it waits for below is room
            with idle.inference_session(max_length=120, batch_size=1) as session:
                outputs = [session.step(*inputs) for inputs in steps[:2]]
                began = time.monotonic()
                with newcomer.inference_session(max_length=120, batch_size=1) as other:  # 120 + 120 > 200 slots
                    assert (other.step(*steps[0]) - expected[0]).abs().max().item() <= 1e-4
                    waited = time.monotonic() - began
                with caplog.at_level("INFO", logger="meadow.client"):
                    outputs.append(session.step(*steps[2]))
            assert waited >= 2.5  # not before the idle one had been idle for 3 s
            assert "session idle for" in caplog.text and "rebuilt the cache of blocks 0:4" in caplog.text
            assert session.replayed == 6  # the 6 tokens it held, sent again (what an API counts as not cached)
            for got, want in zip(outputs, expected):
                assert (got - want).abs().max().item() <= 1e-4
            assert not idle.failures and not newcomer.failures
        finally:
            idle.close()
            newcomer.close()


def step_until_given_up(sequence, max_length: int, inputs, give_up: threading.Event, errors: list) -> None:
    """A session's first step, on a thread while the server is full: what it raised (ServerBusy, once `give_up` is
    set and it stops waiting for room) goes to `errors`."""
    try:
        with sequence.inference_session(max_length=max_length, batch_size=1, give_up=give_up) as session:
            session.step(*inputs)
    except RemoteError as e:
        errors.append(e)


def announces_room(sequence, peer, tokens: int, within: float = 10.0) -> None:
    """Wait until the server tells routing it has room for `tokens` (free slots less those its line waits for)."""
    deadline = time.monotonic() + within
    while server_info(sequence, peer)["cache_tokens_left"] != tokens:
        assert time.monotonic() < deadline, f"the server did not announce room for {tokens} within {within} s"
        time.sleep(0.05)


def wait_for_server(sequence, blocks: str, timeout: float = 30.0):
    """The peer of a server of `blocks` once the DHT shows it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sequence.update_routes(force=True)
        for peer, info in sequence.servers.items():
            if f"{info.start}:{info.end}" == blocks:
                return peer
        time.sleep(0.5)
    raise TimeoutError(f"no server of blocks {blocks} appeared")


def test_a_chat_reply_that_must_wait_for_room_midway_says_so_and_goes_on(small_server, path):
    """A turn reserves 8 tokens of its reply; the server's room is taken by another session meanwhile, so the session
    cannot grow as the reply is written: the reply waits for room, says so on a line of its own (the chat would look
    hung), and goes on once the other session ends, to the same reply as with room."""
    from meadow.client.chat import Conversation, Sampling
    from meadow.models import load_tokenizer

    # the prompt is 31 tokens: with 8 of its reply, 39 fit in the 50 slots the holder leaves; with all 20, 51 do not
    # (and its growth asks no more than that: a step of GROWTH_TOKENS would pass the 150 the server lends one peer)
    peers, sampling, tokenizer = small_server.initial_peers, Sampling(max_new_tokens=20), load_tokenizer(path)
    holder = connect_sequence(str(path), load_config(path), peers)
    quick = ClientConfig(busy_retry=0.5)
    with AutoDistributedModelForCausalLM.from_pretrained(str(path), peers, client_config=quick) as model:
        roomy = Conversation(model, tokenizer, max_length=512, reserve_tokens=0)
        expected = roomy.reply("Name a flower", sampling, threading.Event(), lambda text: None)
        roomy.close()
        conversation, shown = Conversation(model, tokenizer, max_length=512, reserve_tokens=8), []
        try:
            with holder.inference_session(150, 1) as held:
                held.step(torch.randn(1, 3, HIDDEN), torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool))

                def write(text: str) -> None:
                    shown.append(text)
                    if "waits for room" in text:
                        threading.Thread(target=held.close, daemon=True).start()

                late = threading.Timer(60, held.close)  # without a notice, the room frees up anyway, later
                late.start()
                reply = conversation.reply("Name a flower", sampling, threading.Event(), write)
                late.cancel()
        finally:
            conversation.close()
            holder.close()
    notices = [i for i, text in enumerate(shown) if "waits for room" in text]
    assert len(notices) == 1 and 0 < notices[0] < len(shown) - 1 and shown[notices[0]].startswith("\n")
    assert reply == expected and "".join(shown).replace(shown[notices[0]], "") == expected


def test_an_api_reply_grows_its_session_by_no_more_than_it_needs(small_server, path):
    """The API reserves 8 tokens of a 20-token reply and grows the session as it is written: by no more than the
    prompt and the reply need, not by a step of GROWTH_TOKENS that would pass the 150 slots the server lends one peer
    (and be refused outright)."""
    from meadow.api.generation import Sampling as Asked, TextGeneration
    from meadow.models import load_tokenizer

    tokenizer = load_tokenizer(path)
    prompt = tokenizer("Which flowers grow best in a shady garden?", return_tensors="pt")["input_ids"]
    assert prompt.shape[1] + 8 + GROWTH_TOKENS > 150 >= prompt.shape[1] + 20

    async def generate(model) -> tuple[str, object]:
        generation = TextGeneration(model, tokenizer, prompt, Asked(max_tokens=20, temperature=0), reserve_tokens=8)
        await generation.start()
        text = "".join([delta.text async for delta in generation.deltas()])
        return text, generation.outcome

    with AutoDistributedModelForCausalLM.from_pretrained(str(path), small_server.initial_peers) as model:
        text, outcome = asyncio.run(generate(model))
    assert outcome.finish_reason == "length" and outcome.completion_tokens == 20 and text  # it grew, and went on
