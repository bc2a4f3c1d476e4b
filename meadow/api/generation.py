"""One request's generation: `model.generate` on a worker thread of its own (its own inference session on the
servers), its tokens handed to the event loop and turned into text deltas there, stop strings and cancellation."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

import torch
from transformers import LogitsProcessorList, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from meadow.api.json_mode import token_texts
from meadow.api.kept_sessions import KeptSessions, close_quietly
from meadow.api.logprobs import Recorder, TokenLogprob, prompt_logprobs
from meadow.api.sampling import logits_processors
from meadow.client.config import RESERVE_TOKENS, reserved_reply
from meadow.client.harmony import reply_reader
from meadow.client.reasoning import split_reasoning

logger = logging.getLogger(__name__)

WAIT_CHECK_SECONDS = 0.25  # how often a request that has no new token looks whether it waits for room


@dataclass(frozen=True)
class Sampling:
    """What a request asks of the generation, already checked."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0  # Ollama's: transformers' repetition penalty over the last repeat_last_n tokens
    repeat_last_n: int = 64  # -1: every token
    constraint: object | None = None  # what the reply is held to, at its start: a JsonPrefix or a ToolCallPrefix
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # each token's log-probability and this many likeliest at its place (None: none)
    prompt_logprobs: bool = False  # the prompt's tokens' too (text completions' echo)


@dataclass
class Outcome:
    """How a generation ended: filled in by the time `TextGeneration.deltas` is exhausted."""

    finish_reason: str | None = None  # "stop" (end of sequence or a stop string), "length"; or "cancelled", "error"
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # the reply's tokens, its end-of-sequence token too
    servers: list[dict] = field(default_factory=list)  # the chain that served it: [{"peer", "blocks"}]
    seconds: float = 0.0
    first_token_seconds: float | None = None


@dataclass(frozen=True)
class Delta:
    """A piece of the reply's text, and the entries of the tokens whose text begins in it (if logprobs were asked)."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Waiting:
    """The request waits for room on full servers (`reason`: the servers' words), told by `deltas(tell_waits=True)`."""

    reason: str


class _Cancelled(StoppingCriteria):
    """Stops generate at its next step once the request is done with (a stop string, a disconnected client)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _ToLoop(BaseStreamer):
    """A streamer that hands each new token's id to the event loop, with its logprob entry if there is a `recorder`
    (generate first puts the prompt: skipped)."""

    def __init__(self, send, recorder: Recorder | None):
        self.send, self.recorder, self.prompt_seen = send, recorder, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        ids = value.flatten().tolist()
        self.send(("tokens", ids, [self.recorder.describe(i) for i in ids] if self.recorder else [None] * len(ids)))

    def end(self) -> None:
        pass


class TextGeneration:
    """`start()` runs generate on a new thread and returns at its first token (raising what it raised before that:
    missing blocks, a refused session), or once the request waits for room on full servers; `deltas()` then yields
    the text as it grows (and, if asked, each wait for room), up to a stop string, and leaves how it ended in `outcome`.
    `close()` (a client that went away) stops generate, which closes its inference session on the servers. With
    `sampling.prompt_logprobs`, the prompt tokens' entries are in `prompt_logprobs` by the first token."""

    def __init__(
        self, model, tokenizer: PreTrainedTokenizerBase, prompt_ids: torch.Tensor, sampling: Sampling,
        kept: KeptSessions | None = None, reserve_tokens: int = RESERVE_TOKENS,
    ):  # fmt: skip
        self.model, self.tokenizer, self.prompt_ids, self.sampling = model, tokenizer, prompt_ids, sampling
        self.reserve_tokens = reserve_tokens  # of the reply, reserved up front (0: all of max_tokens); the rest grows
        self.kept = kept  # sessions kept from earlier requests: one may hold this prompt's start already
        self.prompt_tokens = prompt_ids.shape[1]
        self.cached_tokens = 0  # prompt tokens the servers held already (a kept session's), set by the first token
        self.outcome = Outcome()
        self.cancelled = threading.Event()
        self.eos_ids = _eos_ids(model, tokenizer)
        self._text = reply_reader(tokenizer, prompt_ids)  # gpt-oss's channels read into think blocks (harmony.py)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._first: tuple | None = None
        self._next: asyncio.Future | None = None  # the next item, awaited still (start() returned as it waits for room)
        self.session = None  # the GenerationSession, once the worker thread has made it
        self.prompt_logprobs: list[TokenLogprob] = []
        self._unsent: list[TokenLogprob] = []  # entries of tokens whose text has not been yielded yet
        self._began = 0.0
        self._closed = False

    async def start(self) -> None:
        loop, self._began = asyncio.get_running_loop(), time.perf_counter()

        def send(item: tuple) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: the API is shutting down and nobody is listening
                pass

        threading.Thread(target=self._generate, args=(send,), name="meadow-api-generate", daemon=True).start()
        first = asyncio.ensure_future(self._queue.get())
        while not first.done():
            await asyncio.wait((first,), timeout=WAIT_CHECK_SECONDS)
            if not first.done() and self._waiting_for_room():
                self._next = first  # the response can begin, and say why nothing comes yet
                return
        self._first = first.result()
        if self._first[0] == "done" and self._first[2] is not None:
            self.outcome.finish_reason = "error"
            self.close()
            raise self._first[2]

    def _generate(self, send) -> None:
        """The worker thread: inside one inference session (a kept one, if one holds the prompt's start), the prompt's
        logprobs if asked for and one generate call; then the chain it used, or its error."""
        hops, error, s, session = [], None, self.sampling, None
        sent = False  # whether a token went out: a kept session that failed before can be replaced unseen
        replayed = None  # what a kept session had replayed when taken

        def sending(item: tuple) -> None:
            nonlocal sent
            if not sent and replayed is not None and session.replayed > replayed:
                self.cached_tokens = 0  # its servers had lost it (closed as idle, gone): the prompt was computed again
            sent = True
            send(item)

        try:
            # a client gone away (`cancelled`) stops waits for room and failovers too, not only the token loop
            length = self.prompt_tokens + reserved_reply(s.max_tokens, self.reserve_tokens)
            if self.kept is not None and not s.prompt_logprobs:  # (those need the whole prompt's logits)
                session, self.cached_tokens = self.kept.take(self.prompt_ids, length, self.cancelled)
            if session is not None:
                replayed = session.replayed
                try:
                    hops = self._run_in(session, sending)
                except Exception as e:
                    if sent or self.cancelled.is_set():
                        raise
                    # e.g. a server closed it as idle (its --idle-timeout shorter than our keep): a session of our own
                    logger.info(f"a kept session failed ({e!r}): the request goes on in a new one")
                    close_quietly(session)
                    session, self.cached_tokens = None, 0
            if session is None:
                session = self.model.open_session(length, batch_size=1, give_up=self.cancelled)
                hops = self._run_in(session, sending)
        except BaseException as e:  # handed to the request; the thread itself has nobody to tell
            error = e
        if session is not None and self.kept is not None and error is None:
            self.kept.give(session)  # whole steps went through it: it holds what it says
        elif session is not None:
            close_quietly(session)
        send(("done", hops, error))

    def _run_in(self, session, send) -> list[dict]:
        """The prompt's logprobs if asked for and generate, inside `session`; the chain that served them."""
        s = self.sampling
        self.session = session  # start() asks it whether it waits for room
        session.make_room(self.prompt_tokens, most=self.prompt_tokens + s.max_tokens)  # growth: no more than needed
        with torch.no_grad(), self.model.use_session(session):
            if s.prompt_logprobs:  # the prompt but its last token, into the session: generate sends only that one
                self.prompt_logprobs = prompt_logprobs(self.model, self.tokenizer, self.prompt_ids, s.logprobs or 0)
            if s.max_tokens > 0:  # 0: the prompt's logprobs were all it asked for
                self._run_generate(send)
        remote = session.remote
        return [{"peer": str(hop.peer), "blocks": str(hop.blocks)} for hop in (remote.hops if remote else [])]

    def _run_generate(self, send) -> None:
        """generate, inside the session, its tokens sent as they come."""
        s, length = self.sampling, self.prompt_tokens
        recorder = Recorder(self.tokenizer, s.logprobs) if s.logprobs is not None else None
        processors = logits_processors(
            length, s.temperature, s.top_p, s.presence_penalty, s.frequency_penalty, s.seed, s.logit_bias, s.top_k,
            s.repeat_penalty, s.repeat_last_n, s.constraint,
            token_texts(self.tokenizer) if s.constraint else (), self.eos_ids,
        )
        self.model.generate(
            self.prompt_ids,
            attention_mask=torch.ones_like(self.prompt_ids),
            max_new_tokens=s.max_tokens,
            do_sample=False,  # a SeededSampler in the processors samples, when temperature > 0
            logits_processor=LogitsProcessorList([recorder, *processors] if recorder else processors),
            stopping_criteria=StoppingCriteriaList([_Cancelled(self.cancelled)]),
            streamer=_ToLoop(send, recorder),
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
        )

    def _waiting_for_room(self) -> str | None:
        waiting = self.session.waiting_for_room if self.session is not None else None
        if waiting and self.kept is not None:
            self.kept.release()  # the room this request waits for may be what our kept sessions hold
        return waiting

    async def deltas(self, tell_waits: bool = False) -> AsyncIterator[Delta | Waiting]:
        """The reply's text, piece by piece, as the tokens come; raises what generate raised. With `tell_waits`, also a
        `Waiting` whenever the request begins to wait for room on full servers (before its first token, or after a
        failover mid-reply), so that a streamed response can say why nothing comes."""
        ids: list[int] = []
        sent = ""  # text already yielded
        text = ""
        told = None  # the wait already told of, while it lasts
        try:
            while True:
                item = self._first
                if item is None:
                    self._next = pending = self._next or asyncio.ensure_future(self._queue.get())
                    while tell_waits and not pending.done():
                        waiting = self._waiting_for_room()
                        if waiting and not told:
                            yield Waiting(waiting)
                        told = waiting
                        await asyncio.wait((pending,), timeout=WAIT_CHECK_SECONDS)
                    item = await pending
                self._first = self._next = None
                if item[0] == "done":
                    _, hops, error = item
                    self.outcome.servers = hops
                    if error is not None and self.outcome.finish_reason is None:
                        self.outcome.finish_reason = "error"
                        raise error
                    break
                if self.outcome.finish_reason is not None:
                    continue  # generate has not seen the cancellation yet: drain until it returns
                if self.outcome.first_token_seconds is None:
                    self.outcome.first_token_seconds = time.perf_counter() - self._began
                text, safe = self._add(ids, item[1], item[2])
                if safe > len(sent):
                    yield Delta(text[len(sent) : safe], self._entries_before(safe))
                    sent = text[:safe]
                if self.outcome.finish_reason is not None:
                    self.cancelled.set()
            if self.outcome.finish_reason is None:
                self.outcome.finish_reason = "length" if self.outcome.completion_tokens >= self.sampling.max_tokens else "stop"
            # what was held back as a possible start of a stop string that never came
            rest = text[len(sent) :] if not text.endswith("\ufffd") else ""
            entries, self._unsent = self._unsent, []  # with those of tokens whose text is empty at its end
            if rest or entries:
                yield Delta(rest, entries)
        finally:
            if self._next is not None:  # the response ended while it waited for a token
                self._next.cancel()
            self.close()

    def _add(self, ids: list[int], new: list[int], entries: list[TokenLogprob | None]) -> tuple[str, int]:
        """Take new token ids (and their logprob entries) until one ends the reply; return the text so far and how much
        of it is safe to send (not a possible start of a stop string, not half a character)."""
        for token, entry in zip(new, entries):
            self.outcome.completion_tokens += 1
            self.outcome.token_ids.append(token)
            if token in self.eos_ids:
                self.outcome.finish_reason = "stop"
                break
            if entry is not None:
                self._unsent.append(replace(entry, offset=len(self._text(ids))))
            ids.append(token)
            if self.outcome.completion_tokens >= self.sampling.max_tokens:
                self.outcome.finish_reason = "length"
                break
        text = self._text(ids)
        hits = [i for i in (text.find(stop) for stop in self.sampling.stop) if i >= 0]
        if hits:
            self.outcome.finish_reason = "stop"
            text = text[: min(hits)]
            self._unsent = [entry for entry in self._unsent if entry.offset < len(text)]  # not the stop string's
            return text, len(text)
        if self.outcome.finish_reason is not None:
            return text, len(text)
        safe = len(text) - max((n for stop in self.sampling.stop for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        while safe > 0 and text[safe - 1] == "\ufffd":  # a character whose bytes are not all generated yet
            safe -= 1
        return text, safe

    def reasoning_tokens(self, inside: bool) -> int:
        """How many of the reply's tokens are a reasoning model's thinking (`inside`: its prompt opened the think
        block): those written before its answer began, the think block's tags too; 0 when it did not think."""
        ids = self.outcome.token_ids[: self.outcome.completion_tokens]
        ids = ids[:-1] if ids and ids[-1] in self.eos_ids else ids
        answer = lambda n: split_reasoning(self._text(ids[:n]), inside)[1]
        if not split_reasoning(self._text(ids), inside)[0]:
            return 0
        low, high = 0, len(ids)  # the most tokens whose text has no answer yet: once the answer begins, it stays
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if not answer(middle) else (low, middle - 1)
        return low

    def _entries_before(self, end: int) -> list[TokenLogprob]:
        """Take the entries of the tokens whose text begins before `end`."""
        taken = [entry for entry in self._unsent if entry.offset < end]
        self._unsent = self._unsent[len(taken) :]
        return taken

    def close(self) -> None:
        """Stop generating (if it still runs) and log how the request went; the response calls it however it ends."""
        self.cancelled.set()
        if self._closed:
            return
        self._closed, out = True, self.outcome
        out.finish_reason = out.finish_reason or "cancelled"
        out.seconds = time.perf_counter() - self._began
        chain = " ".join(f"{server['peer'][-6:]}[{server['blocks']}]" for server in out.servers) or "-"
        logger.info(
            f"generation {out.finish_reason}: {self.prompt_tokens} prompt + {out.completion_tokens} completion tokens "
            f"in {out.seconds:.2f} s (first token {out.first_token_seconds or 0:.3f} s) via {chain}"
        )


def _eos_ids(model, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end a reply: the generation config's end-of-sequence ids and the tokenizer's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [*ids, tokenizer.eos_token_id]
    return sorted({int(i) for i in ids if i is not None})
