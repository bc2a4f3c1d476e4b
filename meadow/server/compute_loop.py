"""The server's one compute loop: continuous batching with fair turns.

Work arrives as jobs: a session's inference step, a forward or a backward request. A job is a generator of pieces
(span.py) that yields a piece, is sent the piece's output and finally returns the job's result. Every iteration
the loop takes the next piece of every waiting decoding step and about `chunk_tokens` tokens of bigger work
(prefills, forwards, training), runs the packed pieces through the blocks as one pass on its compute thread (the
projections and MLP over all their tokens at once, attention per piece over its own cache) and hands each output
back. So many sessions decoding together cost little more than one, and a long prompt delays the others' decoding
by one chunk at most. Among peers, turns go round: a peer with fifty sessions does not starve a peer with one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Hashable, Iterable, Protocol, TypeVar

import torch

from meadow.server.span import Piece, Pieces, Separate, Span

logger = logging.getLogger(__name__)
INLINE_SECONDS = 0.002  # decoding passes quicker than this run on the event loop: a thread hand-off costs about as much
# A decoding step may wait this many passes' time for other sessions' steps to join it. Most of a pass's cost is
# fixed (reading the weights): on a CPU, 4 blocks of the 100M bench model take ~4.3 ms of CPU for one step and ~9.8 ms
# for sixteen (packed weights), so a step that joins a pass costs ~0.4 ms instead of ~4. 4 rather than 2: with 8
# clients on a 2-core machine, server CPU per token 7.0 -> 5.9 ms, passes per 656 tokens 116 -> 90 (first server);
# with packed weights, 2 and 1 were no better (8 clients 128 and 116 tokens/s vs 128, 16 clients 142 and 127 vs 146),
# and not waiting at all was worse (4096-vocabulary bench model: 8 clients 136 tokens/s vs 170, server CPU per token
# 9.6 vs 4.7 ms).
# A new prompt waits too (gather_until): run alone, it costs a pass of its own and holds up the steps that arrive
# meanwhile.
# A server on a GPU does not wait: its cores are free and a pass's cost grows with its pieces, so waiting only holds
# the chain in lock-step (16 cores, H200, 2 servers: 16 clients 277 tokens/s without waiting vs 243 with).
GATHER_PASSES = 4.0
MAX_REMEMBERED_PEERS = 10_000  # whose last turns are kept; beyond it, the longest ago are forgotten
RESERVED_EVERY = 4  # every 4th pass serves the lowest priority first: requesters without points are never starved


@dataclass(eq=False)  # jobs are compared by identity
class Job:
    """A peer's work waiting for the compute loop, and the piece of it that runs next."""

    pieces: Pieces
    span: Span
    peer: Hashable
    priority: int  # higher first; 0 unless something (contribution points, say) raises it
    decoding: bool  # a decoding step: joins every iteration; other work shares chunk_tokens per iteration
    order: int  # arrival order
    session: Hashable = None  # the session whose step this is, if any
    arrived: float = 0.0  # event loop time of arrival
    piece: Piece | Separate | None = None
    finished: bool = False
    result: Any = None
    error: BaseException | None = None
    future: asyncio.Future | None = field(default=None, repr=False)

    @property
    def tokens(self) -> int:
        return self.piece.tokens

    def advance(self, output: Any = None, first: bool = False) -> None:
        """Send the last piece's output and take the next piece, or the job's result when it has none left."""
        try:
            self.piece = next(self.pieces) if first else self.pieces.send(output)
        except StopIteration as stop:
            self.finished, self.result = True, stop.value


@dataclass
class Decoder:
    """A session that decodes: when its last step ended and how long it takes to send the next one."""

    ended: float = 0.0
    interval: float | None = None  # seconds from a step's end to the next step's arrival, on average lately

    def arrived(self, now: float) -> None:
        seconds = now - self.ended
        self.interval = seconds if self.interval is None else 0.7 * self.interval + 0.3 * seconds

    @property
    def next(self) -> float:
        """When its next step should come."""
        return self.ended + self.interval if self.interval is not None else float("inf")

    @property
    def due(self) -> float:
        """When its next step is overdue: no more waiting for it."""
        return self.ended + 1.5 * self.interval if self.interval is not None else float("-inf")


class Waiting(Protocol):
    """What the scheduling decisions read of a job (tests pass plain records)."""

    peer: Hashable
    priority: int
    decoding: bool
    order: int

    @property
    def tokens(self) -> int: ...


W = TypeVar("W", bound=Waiting)


def fair_order(jobs: Iterable[W], last_turn: dict[Hashable, int], lowest_first: bool = False) -> list[W]:
    """Jobs in the order they should be served: higher priority first (lower first if `lowest_first`); within a
    priority, peers take turns, one job each per round, the peer whose last turn is longest ago first; each peer's
    jobs in arrival order."""
    levels: dict[int, dict[Hashable, list[W]]] = defaultdict(lambda: defaultdict(list))
    for job in sorted(jobs, key=lambda job: job.order):
        levels[job.priority][job.peer].append(job)
    ordered = []
    for priority in sorted(levels, reverse=not lowest_first):
        queues = sorted(levels[priority].values(), key=lambda queue: (last_turn.get(queue[0].peer, -1), queue[0].order))
        for round_ in range(max(len(queue) for queue in queues)):
            ordered.extend(queue[round_] for queue in queues if round_ < len(queue))
    return ordered


def choose_batch(
    jobs: Iterable[W], last_turn: dict[bool, dict[Hashable, int]], max_decoding_tokens: int, chunk_tokens: int,
    reserved: bool = False,
) -> list[W]:
    """The jobs whose next pieces run in the next pass: decoding steps up to max_decoding_tokens tokens and other
    work up to chunk_tokens tokens, each kind taken in its fair order (`last_turn` per kind; a `reserved` pass takes
    the lowest priority first) and given at least one job if it has any waiting."""
    jobs, chosen = list(jobs), []
    for decoding, limit in ((True, max_decoding_tokens), (False, chunk_tokens)):
        used = 0
        for job in fair_order([job for job in jobs if job.decoding == decoding], last_turn[decoding], reserved):
            if used == 0 or used + job.tokens <= limit:
                chosen.append(job)
                used += job.tokens
    return chosen


class Arrival(Protocol):
    """What `gather_until` reads of a waiting job."""

    session: Hashable
    arrived: float


def gather_until(waiting: list[Arrival], decoders: dict[Hashable, Decoder], now: float, pass_seconds: float) -> float:
    """When the next pass should start: once the steps of the decoding sessions due soon have come (or are overdue),
    and no later than GATHER_PASSES passes' time after the oldest waiting job came. A prefill waits too: run alone,
    it would cost a whole pass, and the steps that come meanwhile would wait for it (a job's later chunks come with
    its first arrival time, so a long prompt's chunks never wait)."""
    queued = {job.session for job in waiting}
    deadline = min(job.arrived for job in waiting) + GATHER_PASSES * pass_seconds
    coming = [d.due for s, d in decoders.items() if s not in queued and now < d.due and d.next <= deadline]
    return min(deadline, max(coming, default=now))


class ComputeLoop:
    """Runs every job of this server, batched and in fair turns, on one compute thread."""

    def __init__(self, chunk_tokens: int, max_decoding_tokens: int):
        self.chunk_tokens, self.max_decoding_tokens = chunk_tokens, max_decoding_tokens
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meadow-compute")
        self.waiting: list[Job] = []
        self.last_turn: dict[bool, dict[Hashable, int]] = {True: {}, False: {}}  # per kind: peer -> last iteration
        self.iterations = 0
        self.orders = count()
        self.changed: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.decoders: dict[Hashable, Decoder] = {}  # sessions that decode, and when their next step should come
        self.pass_seconds = 0.0  # how long a batched pass with decoding steps takes, on average lately
        self.threads = torch.get_num_threads()

    async def run(
        self, pieces: Pieces, span: Span, peer: Hashable, priority: int = 0, decoding: bool = False,
        session: Hashable = None,
    ) -> Any:  # fmt: skip
        """Queue a job and wait for its result. Its first piece is made here, so a step that does not fit its
        session raises (BadRequest) at once."""
        arrived = asyncio.get_running_loop().time()
        if decoding and session in self.decoders:
            self.decoders[session].arrived(arrived)
        job = Job(pieces, span, peer, priority, decoding, next(self.orders), session, arrived)
        job.advance(first=True)
        if job.finished:
            return job.result
        job.future = asyncio.get_running_loop().create_future()
        self.waiting.append(job)
        self._wake()
        try:
            return await job.future
        finally:
            if job in self.waiting:  # cancelled while waiting: its client is gone
                self.waiting.remove(job)

    def forget(self, session: Hashable) -> None:
        """The session has ended: expect no more steps from it."""
        self.decoders.pop(session, None)

    def _wake(self) -> None:
        if self.task is None:
            self.changed = asyncio.Event()
            self.task = asyncio.ensure_future(self._loop())
        self.changed.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.waiting:
                self.changed.clear()
                await self.changed.wait()
                continue
            await self._gather()
            reserved = self.iterations % RESERVED_EVERY == RESERVED_EVERY - 1
            chosen = choose_batch(self.waiting, self.last_turn, self.max_decoding_tokens, self.chunk_tokens, reserved)
            if not chosen:
                continue
            self.iterations += 1
            for job in chosen:
                self.waiting.remove(job)
                turns = self.last_turn[job.decoding]
                turns.pop(job.peer, None)  # re-inserted last: dicts keep the order of their last turns
                turns[job.peer] = self.iterations
                if len(turns) > MAX_REMEMBERED_PEERS:
                    del turns[next(iter(turns))]
            began = loop.time()
            try:
                if self.pass_seconds and self.pass_seconds < INLINE_SECONDS and all(job.decoding for job in chosen):
                    self._compute(chosen)
                else:
                    await loop.run_in_executor(self.thread, self._compute, chosen)
            except Exception as e:  # a bug or out of memory: the jobs of this pass fail, the loop goes on
                logger.exception("a batched pass failed")
                for job in chosen:
                    job.finished, job.error = True, e
            ended = loop.time()
            if any(job.decoding for job in chosen):
                self.pass_seconds = 0.8 * self.pass_seconds + 0.2 * (ended - began) if self.pass_seconds else ended - began
            for job in chosen:
                if job.decoding and job.session is not None:
                    self.decoders.setdefault(job.session, Decoder()).ended = ended
            for job in chosen:
                if job.future.done():  # cancelled: its client is gone
                    continue
                if job.error is not None:
                    job.future.set_exception(job.error)
                elif job.finished:
                    job.future.set_result(job.result)
                else:
                    self.waiting.append(job)

    async def _gather(self) -> None:
        """Before a pass, wait a little for the steps of other sessions that decode regularly and should send their
        next step soon (`gather_until`): batching them now saves a whole pass later. (A server shares its cores with
        its clients: while it waits, they compute the steps it waits for.) Not on a GPU."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.waiting or self.waiting[0].span.device.type != "cpu":
                return
            now = loop.time()
            until = gather_until(self.waiting, self.decoders, now, self.pass_seconds)
            if until <= now:
                return
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), until - now)
            except asyncio.TimeoutError:
                return

    def _compute(self, jobs: list[Job]) -> None:
        """One pass (on the compute thread): the packed pieces of each span together, then each separate piece."""
        # Several sessions' decoding steps run on one core: the swarm's other processes (its clients, the next
        # server) have work for the others, and waking OpenMP workers for each small matmul costs more than they
        # add. A lone step (one client, waiting) and bigger work (prefills, training) use every thread. The setting
        # is the calling thread's own (OpenMP's per-thread ICV).
        torch.set_num_threads(1 if len(jobs) > 1 and all(job.decoding for job in jobs) else self.threads)
        by_span: dict[int, list[Job]] = defaultdict(list)
        separate = [job for job in jobs if isinstance(job.piece, Separate)]
        for job in jobs:
            if isinstance(job.piece, Piece):
                by_span[id(job.span)].append(job)
        for packed in by_span.values():
            outputs = packed[0].span.run_pieces([job.piece for job in packed])
            for job, output in zip(packed, outputs):
                self._advance(job, output)
        for job in separate:
            try:
                output = job.piece.run()
            except Exception as e:
                job.finished, job.error = True, e
                continue
            self._advance(job, output)

    @staticmethod
    def _advance(job: Job, output: Any) -> None:
        try:
            job.advance(output)
        except Exception as e:
            job.finished, job.error = True, e
