"""An inference session along a chain of servers that keeps going when one of them fails.

Each segment (one server, some blocks) remembers every input it was sent. When a server dies, hangs or
leaves, the client bans it, routes a replacement for exactly its blocks (one server or several, maybe
ones that joined after the session began), replays the remembered inputs to rebuild their KV caches
(a replacement that fails meanwhile is replaced in turn; those before it keep theirs), and resends the step
that failed. Downstream servers never notice, so greedy results stay identical.

A step may be spot-checked (ClientConfig.verify, verify.py): then every segment's outputs so far are recomputed by
another server from the segment's history. A server found wrong is banned, and it and the servers after it (which
stored what it returned) are replaced with the same replay; the step runs again from there."""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch
from hivemind.p2p import PeerID

from meadow.client import transport
from meadow.client.routing import Hop, MeasuredStep
from meadow.client.config import ClientConfig
from meadow.client.event_loop import run
from meadow.client.retries import Retries, is_busy
from meadow.client.sequence import RemoteSequence, full_mask
from meadow.client.tuning import RemoteTuning
from meadow.client.verify import WrongOutputs
from meadow.wire import RPC_FORWARD, BlockRange, OpenSession, PushTarget, Step

logger = logging.getLogger(__name__)

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden, position_ids, key_mask
MAX_PUSH_MISSES = 2  # after this many late pushes to a server, the client passes its steps on itself
DECODING_TOKENS = 4  # steps of at most this many new tokens are decoding steps, timed against the server's own pace
GROWTH_TOKENS = 128  # a session that outgrows its max_length grows by this many tokens at least: not a copy per token


def grown_length(max_length: int, needed: int, most: int | None = None) -> int:
    """The max_length a session of `max_length` grows to when it needs `needed` tokens: GROWTH_TOKENS more at least,
    but no more than the `most` it will ever hold (a server that lends a peer fewer slots may still hold all of it)."""
    if needed <= max_length:
        return max_length
    return max(needed, max_length + GROWTH_TOKENS if most is None else min(max_length + GROWTH_TOKENS, most))


class HopFailed(Exception):
    """A server failed while its part of a chain was opened or replayed: which server, and its error."""

    def __init__(self, peer: PeerID, error: BaseException):
        super().__init__(f"{peer}: {error!r}")
        self.peer, self.error = peer, error


@dataclass(eq=False)  # segments are compared by identity
class Segment:
    """One server's part of the chain, the inputs it has been sent (for replay) and how long its decoding steps took."""

    hop: Hop
    stream: transport.InferenceStream
    session_id: str  # the session's name on its server: the previous server pushes decoding steps to it
    max_length: int  # what its server holds for the session: below the session's, the next step grows it
    history: list[Inputs] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)  # what it returned for them (kept if verify > 0)
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=16))
    push_misses: int = 0  # pushed steps whose output did not come in time
    usual_step: float | None = None  # the median of step_times, kept up to date by `timed`

    def rewind(self, position: int) -> None:
        """Keep the history (and outputs) of the first `position` tokens only."""
        self.history = [tuple(t[:, :keep] for t in inputs) for inputs, keep in _kept(self.history, position)]
        self.outputs = [output[:, :keep] for output, keep in _kept(self.outputs, position)]

    def timed(self, seconds: float) -> None:
        """Count a decoding step that took `seconds`."""
        self.step_times.append(seconds)
        self.usual_step = statistics.median(self.step_times)

    def push_grace(self, config: ClientConfig) -> float:
        """How long to wait for the output of a step pushed to this server before sending the step ourselves."""
        if self.usual_step is None:
            return min(0.5, config.step_timeout)
        return min(self.decoding_timeout(config), max(0.05, 3 * self.usual_step))

    def decoding_timeout(self, config: ClientConfig) -> float:
        """A server that takes `step_slowdown` times its usual step is taken as hung (a killed server's connection
        is not always seen to drop): never under min_step_timeout, never over step_timeout."""
        if self.usual_step is None:
            return config.step_timeout
        usual = self.usual_step * config.step_slowdown
        return min(config.step_timeout, max(config.min_step_timeout, usual))


@dataclass(eq=False)
class _Walk:
    """A step on its way along the chain: its inputs to the next segment, that segment's index, and the segments
    that get it pushed by the previous server."""

    inputs: Inputs
    index: int
    decoding: bool
    pushing: bool = False
    pushed_to: list[Segment] = field(default_factory=list)


class InferenceSession:
    """A server-side KV cache along the chain. `step` sends new tokens' hidden states through every server. The
    servers hold `max_length` tokens per row at first; a step past that grows the session on every server (one that
    has no room for it is replaced, as a failed one, by one that has)."""

    def __init__(
        self,
        sequence: RemoteSequence,
        max_length: int,
        batch_size: int,
        tuning: RemoteTuning | None = None,
        give_up: threading.Event | None = None,
    ):
        self.sequence, self.max_length, self.batch_size = sequence, max_length, batch_size
        self.give_up = give_up  # set when nobody waits for this session any more: no more failovers or waits for room
        self.tuning = tuning or RemoteTuning()  # deep prompts and LoRA weights, sent once per server at open
        self.most: int | None = None  # the most tokens per row it will hold, if known: growth asks no more
        self.position = 0
        self.stored = 0  # tokens the servers hold: more than `position` after a rewind, until the next step
        self.replayed = 0  # tokens (per row) sent again to rebuild servers' caches (failover, a session closed as idle)
        self.segments: list[Segment] | None = None
        self.waiting_for_room: str | None = None  # while every server that could hold the session is full: why
        # keeps our place in full servers' lines for room, from try to try: one session, one place at each server
        self.ticket = uuid.uuid4().hex
        self.waiting_at: set[PeerID] = set()  # full servers that keep a place for our ticket in their lines
        self.owner = os.getpid()  # the process whose event loop holds the session's streams

    @property
    def hops(self) -> list[Hop]:
        """The servers this session runs on now and their blocks (none before its first step)."""
        return [segment.hop for segment in self.segments or []]

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        length = hidden.shape[1]
        self.max_length = grown_length(self.max_length, self.position + length, self.most)
        if self.segments is None:
            self.segments = self._open(self.sequence.blocks)
        inputs: Inputs = (hidden, position_ids, full_mask(hidden, key_mask))
        check, index, rechecks = self.sequence.checker.due(), 0, 0
        while True:
            output = self._run(inputs, index)
            caught = self._spot_check() if check else None
            if caught is None:
                break
            # its server is banned; the servers after it stored what it returned: rebuild the chain from it, and run
            # the step again from there
            index, error = caught
            rechecks += 1
            if rechecks > self.sequence.config.max_retries:
                raise error
            inputs = self.segments[index].history[-1]
            self._rebuild_from(index)
        self.position += length
        self.stored = self.position
        return output

    def rewind(self, position: int) -> None:
        """Drop the tokens from `position` on (drafts rejected by speculative decoding): the next step is sent at
        `position`, and each server rewinds its cache to it; failover replays only what is kept."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to position {position}: this session holds tokens [0, {self.position})")
        for segment in self.segments or []:
            segment.rewind(position)
        self.position = position

    def _run(self, inputs: Inputs, index: int) -> torch.Tensor:
        """Send a step through the segments from `index` on; a server that fails is replaced (its replacement gets the
        history replayed) and the step resent to it. The last segment's output."""
        walk = _Walk(inputs, index, decoding=inputs[0].shape[1] <= DECODING_TOKENS)
        # a step that rewinds is not pushed: a server waits for pushes at its own position, not an earlier one; nor
        # is one that grows the session: a push does not say how much to hold
        growing = any(segment.max_length < self.max_length for segment in self.segments[index:])
        walk.pushing = walk.decoding and self.sequence.config.push_steps and self.position == self.stored
        walk.pushing = walk.pushing and not growing
        retries = Retries(self.sequence.config, self.give_up)
        # the whole pass is one coroutine: one hand-off to the loop thread per step, not one per server
        while (error := run(self._walk(walk))) is not None:
            segment = self.segments[walk.index]
            if not retries.allow(error):
                raise error
            self.sequence.ban(segment.hop.peer, error, segment.stream.p2p)
            self.segments[walk.index : walk.index + 1] = self._replace(segment)  # routes and replays: not on the loop
        return walk.inputs[0]

    async def _walk(self, walk: _Walk) -> Exception | None:
        """Carry `walk` through the segments from walk.index on (on the client loop); stops at a segment whose server
        fails and returns the error, to be failed over by the caller, which then calls again."""
        config = self.sequence.config
        while walk.index < len(self.segments):
            segment, inputs = self.segments[walk.index], walk.inputs
            began = time.perf_counter()
            try:
                output = None
                if segment in walk.pushed_to:
                    output = await segment.stream.pushed_output(segment.push_grace(config), like=inputs[0])
                    segment.push_misses += output is None
                if output is None:  # not pushed, or the push is late: send the step ourselves
                    resent = segment in walk.pushed_to
                    walk.pushed_to = self._push_chain(walk.index + 1) if walk.pushing else []
                    targets = [PushTarget(peer=s.hop.peer.to_base58(), session_id=s.session_id) for s in walk.pushed_to]
                    timeout = segment.decoding_timeout(config) if walk.decoding else self.sequence.work_timeout(
                        segment.hop.peer, segment.hop.blocks, inputs[0])  # fmt: skip
                    grow_to = self.max_length if segment.max_length < self.max_length else None
                    meta = Step(position=self.position, resent=resent, push_to=targets, max_length=grow_to).to_wire()
                    output = await segment.stream.step(list(inputs), timeout, meta)
                    segment.max_length = self.max_length
            except Exception as e:
                return e
            if walk.decoding:
                segment.timed(time.perf_counter() - began)
                usual = MeasuredStep(segment.usual_step, len(segment.hop.blocks))
                self.sequence.steps[segment.hop.peer] = usual  # routing avoids servers slower than they announce
            segment.history.append(inputs)
            if self.sequence.payer is not None:
                self.sequence.payer.served(segment.hop.peer, segment.hop.blocks, inputs[0].shape[0] * inputs[0].shape[1], "inference")
            if config.verify > 0:  # for spot-checks; without them, not worth the memory
                segment.outputs.append(output)
            walk.inputs = (output, inputs[1], inputs[2])
            walk.index += 1
        return None

    def _spot_check(self) -> tuple[int, WrongOutputs] | None:
        """Check every segment's outputs so far on other servers holding its blocks, all at once: each gets the
        segment's whole history in one forward pass (no cache), so a cheat at any earlier step shows too. The index
        and error of the first segment found wrong (its server now banned), if any."""

        async def check(segment: Segment) -> None:
            hidden, position_ids, key_mask = (torch.cat(parts, dim=1) for parts in zip(*segment.history))
            outputs = [torch.cat(segment.outputs, dim=1)]
            recompute = lambda other: self.sequence._call(RPC_FORWARD, other, hidden, position_ids, key_mask, self.tuning)
            await self.sequence.checker.check(segment.hop, outputs, recompute)

        async def check_all() -> list:
            return await asyncio.gather(*(check(segment) for segment in self.segments), return_exceptions=True)

        results = run(check_all())
        for index, (segment, result) in enumerate(zip(self.segments, results)):
            if isinstance(result, WrongOutputs):
                self.sequence.ban(segment.hop.peer, result)
                return index, result
            if isinstance(result, BaseException):
                raise result
        return None

    def _rebuild_from(self, index: int) -> None:
        """Replace the segments from `index` on with a new chain for their blocks, fed the history of the first one
        up to (not including) this step."""
        first = self.segments[index]
        for segment in self.segments[index:]:
            run(segment.stream.close())
        blocks = BlockRange(start=first.hop.blocks.start, end=self.segments[-1].hop.blocks.end)
        self.segments[index:] = self._open(blocks, first.history[:-1])

    def _push_chain(self, start: int) -> list[Segment]:
        """The segments from `start` on that the step can be pushed along: up to one whose pushes keep not arriving
        (its server cannot be reached by the previous one, say)."""
        chain = []
        for segment in self.segments[start:]:
            if segment.push_misses >= MAX_PUSH_MISSES:
                break
            chain.append(segment)
        return chain

    def _open(self, blocks: BlockRange, history: list[Inputs] | None = None) -> list[Segment]:
        """Segments covering `blocks`, their caches rebuilt from `history`; a server that fails meanwhile is
        banned and another tried, up to max_retries times; while all are full, it waits for room (Retries). Segments
        already rebuilt are kept when a later one fails: only the blocks after them are routed and rebuilt again."""
        retries = Retries(self.sequence.config, self.give_up)
        kept: list[Segment] = []  # rebuilt from history, from blocks.start on
        while True:
            fresh: list[Segment] = []
            try:
                rest = BlockRange(start=kept[-1].hop.blocks.end if kept else blocks.start, end=blocks.end)
                cache_tokens = self.batch_size * self.max_length  # what each server must have room for
                chain = self.sequence.make_chain(rest, cache_tokens)  # here, not on the loop: make_chain waits on it
                fresh = run(self._open_streams(chain, self.ticket))
                while history and fresh:
                    history = self._replay(history, fresh[0])
                    kept.append(fresh.pop(0))
                self.waiting_for_room = None
                segments = kept + fresh
                self._leave_lines(keep={segment.hop.peer for segment in segments})
                return segments
            except HopFailed as e:
                peer, error = e.peer, e.error
            except Exception as e:
                peer, error = None, e
            if is_busy(error) and peer is not None:
                self.waiting_at.add(peer)  # it keeps our place in its line: we leave it when served or gone
            if not retries.allow(error):
                for segment in kept + fresh:
                    run(segment.stream.close())
                raise error  # outside the except clauses: the error as it came, not "during handling of" its wrapper
            self.waiting_for_room = error.remote_message if is_busy(error) else None
            for segment in fresh:
                run(segment.stream.close())
            if peer is not None:
                self.sequence.ban(peer, error)

    def _replace(self, failed: Segment) -> list[Segment]:
        run(failed.stream.close())
        return self._open(failed.hop.blocks, failed.history)

    async def _open_streams(self, chain: list[Hop], ticket: str) -> list[Segment]:
        opened: list[Segment] = []
        try:
            for hop in chain:
                stream = transport.InferenceStream(self.sequence.p2p, hop.peer)
                fields, tensors = self.tuning.for_hop(hop.blocks)
                session_id = uuid.uuid4().hex
                if self.sequence.payer is not None:
                    await self.sequence.payer.introduce(hop.peer)
                request = OpenSession(
                    blocks=hop.blocks, max_length=self.max_length, batch_size=self.batch_size,
                    adapter=self.sequence.active_adapter, session_id=session_id, wire=self.sequence.wire_for(hop.peer),
                    ticket=ticket, **fields,
                )  # fmt: skip
                try:
                    await stream.open(request, self.sequence.config.connect_timeout, tensors)
                except Exception as e:
                    raise HopFailed(hop.peer, e) from e
                opened.append(Segment(hop, stream, session_id, self.max_length))
        except BaseException:
            for segment in opened:
                await segment.stream.close()
            raise
        return opened

    def _replay(self, history: list[Inputs], segment: Segment) -> list[Inputs]:
        """Send a failed segment's past inputs through (the first server of) its replacement, in chunks a server
        accepts, to rebuild its cache; the history of the server after it."""
        hidden, position_ids, key_mask = (torch.cat(parts, dim=1) for parts in zip(*history))
        chunk = max(1, self.sequence.config.replay_chunk_tokens // hidden.shape[0])
        outputs = []
        for start in range(0, hidden.shape[1], chunk):
            piece = [tensor[:, start : start + chunk] for tensor in (hidden, position_ids, key_mask)]
            try:
                meta = Step(position=start).to_wire()
                timeout = self.sequence.work_timeout(segment.hop.peer, segment.hop.blocks, piece[0])
                outputs.append(run(segment.stream.step(piece, timeout, meta)))
            except Exception as e:
                raise HopFailed(segment.hop.peer, e) from e
        segment.history = [(hidden, position_ids, key_mask)]
        self.replayed += hidden.shape[1]
        tokens = hidden.shape[0] * hidden.shape[1]
        if self.sequence.payer is not None:
            self.sequence.payer.served(segment.hop.peer, segment.hop.blocks, tokens, "inference")
        logger.info(f"rebuilt the cache of blocks {segment.hop.blocks} on server {segment.hop.peer} ({tokens} tokens)")
        output = torch.cat(outputs, dim=1)
        segment.outputs = [output] if self.sequence.config.verify > 0 else []
        return [(output, position_ids, key_mask)]

    def _leave_lines(self, keep: set[PeerID] = frozenset()) -> None:
        """Leave the lines we wait in, so that our places claim no room, but at `keep` (which let us in: our place
        there is gone already)."""
        if self.waiting_at - keep:
            self.sequence.leave_lines(self.waiting_at - keep, self.ticket)
        self.waiting_at.clear()

    def close(self) -> None:
        if os.getpid() != self.owner:
            # a copy in a child forked from the owner (a fork-based DataLoader's worker, say, whose garbage collector
            # finalizes what it inherited): the streams are the owner's, and closing them from here would wait
            # forever or end the owner's session; the owner closes it, or the servers drop it when it falls idle
            self.segments = None
            return
        self._leave_lines()
        if self.segments is not None:
            for segment in self.segments:
                run(segment.stream.close())
                if self.sequence.payer is not None:
                    self.sequence.payer.flush(segment.hop.peer)  # the session's last receipt
            self.segments = None

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kept(steps: list[torch.Tensor | Inputs], position: int) -> list[tuple[torch.Tensor | Inputs, int]]:
    """The steps (each tensors of shape (B, T, ...)) that hold the first `position` tokens, each with how many of its
    tokens to keep."""
    kept = []
    for step in steps:
        length = (step[0] if isinstance(step, tuple) else step).shape[1]
        if position <= 0:
            break
        kept.append((step, min(length, position)))
        position -= length
    return kept
