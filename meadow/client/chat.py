"""`meadow chat`: a conversation in the terminal, kept in one inference session on the swarm.

The servers keep the session's KV cache, so each turn must send them only what is new. The conversation is kept as
the token ids the session holds: prompts as the chat template renders them, replies as they were generated (a
template may re-render a past reply differently, e.g. close it with an end-of-turn token the model never produced).
A turn's new ids are the text by which the template's rendering of the whole conversation extends that: found by
comparing the two as text, whitespace aside. Should they disagree otherwise, or the conversation outgrow the
session, it goes on in a new session.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from meadow.client.config import RESERVE_TOKENS, ClientConfig, reserved_reply
from meadow.client.chat_prompt import chat_prompt_ids, stop_strings
from meadow.client.harmony import reply_reader
from meadow.client.reasoning import ThinkingReader, opens_thinking, split_reasoning, thinks

logger = logging.getLogger(__name__)
MULTILINE = '"""'  # around a message of several lines, as in Ollama's terminal chat
WAIT_CHECK_SECONDS = 0.25  # how often a reply that has not begun looks whether it waits for room

HELP = """Commands:
  /reset          start a new conversation
  /system TEXT    set the system prompt (and start a new conversation); /system alone clears it
  /retry          drop the last reply and ask the last message again (the same reply, if greedy)
  /help           this help
  /quit           leave (so do Ctrl-D, and Ctrl-C twice at the prompt)
A message over several lines goes between \"\"\" marks: \"\"\" on its first line, \"\"\" at the end of its last.
Ctrl-C while the model writes stops its reply; the reply so far stays in the conversation. Ctrl-C while the reply
waits for room on full servers stops waiting; the message is then not part of the conversation."""


@dataclass(frozen=True)
class Sampling:
    """How replies are generated."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 512

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return dict(do_sample=False)
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p)


class Conversation:
    """The messages of a chat and the inference session that holds them: `ids` (1, L) are the tokens it was sent
    and the last reply's tokens (whose last one the servers get with the next turn). A turn reserves its prompt and
    `reserve_tokens` of the reply on the servers (0: the whole max_new_tokens); the session grows as the reply does."""

    def __init__(
        self,
        model,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        system: str | None = None,
        reserve_tokens: int = RESERVE_TOKENS,
        reasoning_effort: str | None = None,
    ):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.reserve_tokens = reserve_tokens
        # the chat template's variables: how long a reasoning model thinks, which gpt-oss's template reads
        self.variables = {"reasoning_effort": reasoning_effort} if reasoning_effort else {}
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.thinks = thinks(tokenizer.chat_template)  # a reasoning model: its thinking is shown apart
        self._session = ExitStack()  # holds the model's inference session open from turn to turn
        self.system: str | None = None
        self.messages: list[dict[str, str]] = []
        self.ids: torch.Tensor | None = None
        # before the last message: the messages, the ids and the session's position, for /retry; and the message
        self._before_last: tuple[list[dict[str, str]], torch.Tensor | None, int] | None = None
        self.last_message: str | None = None
        self.reset(system)

    def reset(self, system: str | None = None) -> None:
        """A new conversation (with this system prompt), in a new session."""
        self.system = system
        self.messages = [{"role": "system", "content": system}] if system else []
        self._close_session()
        self._before_last = self.last_message = None

    def _close_session(self) -> None:
        self._session.close()
        self.ids = None

    def close(self) -> None:
        self._close_session()

    def reply(self, text: str, sampling: Sampling, stop: threading.Event, write: Callable[[str], None]) -> str:
        """Generate the model's reply to the user's `text`, `write`ing it as it comes, until the model ends its turn,
        `sampling.max_new_tokens` are made, or `stop` is set. The reply (so far) joins the conversation."""
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self._continued(messages)
        if ids is None or ids.shape[1] + sampling.max_new_tokens > self.max_length:
            kept, ids = self._fit(messages, sampling.max_new_tokens)
            if len(kept) < len(messages):
                write(f"(the conversation outgrew the {self.max_length} tokens a session may hold: its oldest "
                      "messages are dropped, and it goes on in a new session)\n")  # fmt: skip
            messages = kept
        # the servers hold the prompt and the start of the reply; the session grows on them as the reply does
        needed = ids.shape[1] + reserved_reply(sampling.max_new_tokens, self.reserve_tokens)
        if self.ids is None:
            self._session.enter_context(self.model.inference_session(max_length=needed))
        session = self.model.session
        session.make_room(needed, most=ids.shape[1] + sampling.max_new_tokens)
        session.hand_over(stop)  # a Ctrl-C ends a wait for room on full servers too, not only the token loop
        held = session.position
        self._before_last, self.last_message = (messages[:-1], self.ids, held), text
        logger.debug(f"turn: the session holds {held} tokens, {ids.shape[1] - held} new tokens sent; room for "
                     f"{session.max_length}; ids {ids[0].tolist()}")  # fmt: skip
        notify, inside = write, self.thinks and opens_thinking(self.tokenizer, ids)
        if self.thinks:
            write = ThoughtsApart(write, inside, dim=sys.stdout.isatty())
        printer = ReplyPrinter(self.tokenizer, write)
        try:
            with WaitNotice(session, printer, notify):
                output = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                    streamer=printer, stopping_criteria=StoppingCriteriaList([StopWhenSet(stop)]),
                    pad_token_id=self.pad_token_id, **self._stop_strings(), **sampling.generate_kwargs(),
                )  # fmt: skip
        except BaseException:
            self._close_session()  # the servers may hold part of the reply: the next turn starts a new session
            raise
        self.ids = output
        reply = printer.finish(output[0, ids.shape[1] :])
        if self.thinks:
            write("", last=True)
        logger.debug(f"reply: {output.shape[1] - ids.shape[1]} new tokens")
        answer = split_reasoning(reply, inside)[1] if self.thinks else reply  # templates leave earlier thinking out
        self.messages = [*messages, {"role": "assistant", "content": answer.strip()}]
        return reply

    def retry(self, sampling: Sampling, stop: threading.Event, write: Callable[[str], None]) -> str:
        """Drop the last reply and reply to the last message again. The session is rewound to where it was before
        that message, so only the message is sent again (unless the session was new then, or closed since)."""
        if self._before_last is None:
            raise ValueError("there is no message to ask again yet")
        messages, ids, position = self._before_last
        if ids is not None and self.ids is not None:
            self.model.session.rewind(position)
            self.ids = ids
        else:
            self._close_session()
        self.messages = messages
        return self.reply(self.last_message, sampling, stop, write)

    def _continued(self, messages: list[dict[str, str]]) -> torch.Tensor | None:
        """The ids of `messages` as a continuation of what the session holds (all of them when it holds nothing);
        None when the template's rendering does not extend the session's tokens."""
        prompt = chat_prompt_ids(self.tokenizer, messages, **self.variables)
        if self.ids is None:
            return prompt
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        target, sent = decode(prompt[0].tolist()), self.ids[0].tolist()
        rest = text_extension(decode(sent), target)
        if rest is None:  # a plain transcript does not show the end-of-sequence token that ended the last reply
            while sent and sent[-1] in self.tokenizer.all_special_ids:
                sent = sent[:-1]
            rest = text_extension(decode(sent), target)
        new = self.tokenizer(rest, add_special_tokens=False, return_tensors="pt")["input_ids"] if rest else None
        if new is None or new.shape[1] == 0:
            logger.debug("the chat template does not extend this session's tokens: going on in a new session")
            return None
        return torch.cat([self.ids, new], dim=1)

    def _fit(self, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[list[dict[str, str]], torch.Tensor]:
        """Start a new session with as many of the latest messages as fit in it with room for the reply."""
        self._close_session()
        system = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(system) :]
        while True:
            ids = chat_prompt_ids(self.tokenizer, system + turns, **self.variables)
            if ids.shape[1] + max_new_tokens <= self.max_length:
                break
            if len(turns) == 1:
                raise ValueError(
                    f"this message ({ids.shape[1]} tokens with the prompt) and a reply of up to {max_new_tokens} tokens "
                    f"do not fit in a session of {self.max_length} tokens: raise --max-length or lower --max-new-tokens"
                )
            turns = turns[2:] if len(turns) > 2 else turns[-1:]  # drop the oldest exchange
        return system + turns, ids

    def _stop_strings(self) -> dict:
        strings = stop_strings(self.tokenizer)
        return dict(stop_strings=strings, tokenizer=self.tokenizer) if strings else {}


def text_extension(sent: str, target: str) -> str | None:
    """What `target` adds after `sent`, if `target` starts with `sent` up to whitespace (a template may trim a reply
    or put a space after "Assistant:"); None if it does not."""
    i = j = 0
    while i < len(sent):
        if j < len(target) and sent[i] == target[j]:
            i, j = i + 1, j + 1
        elif sent[i].isspace():
            i += 1
        elif j < len(target) and target[j].isspace():
            j += 1
        else:
            return None
    return target[j:]


class StopWhenSet(StoppingCriteria):
    """Ends generation after the current token once `event` is set (by Ctrl-C): the session stays consistent."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ReplyPrinter(BaseStreamer):
    """Writes a reply as its tokens come, holding back what may be the start of a stop string or of a character
    whose bytes are not all there yet."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.read = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # a reply's ids as text
        self.stops = stop_strings(tokenizer)
        self.ids: list[int] = []
        self.prompt_seen = False
        self.written = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate passes the prompt first: it tells how to read the reply (harmony.py)
            self.prompt_seen = True
            self.read = reply_reader(self.tokenizer, value.reshape(1, -1))
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.text(self.ids).rstrip("\ufffd")
        for stop in self.stops:  # hold back a tail that could grow into a stop string
            text = text[: len(text) - max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)]
        self._write_up_to(text)

    def end(self) -> None:
        pass

    def finish(self, reply_ids: torch.Tensor) -> str:
        """Write the rest of the reply; return its text."""
        text = self.text(reply_ids.tolist())
        self._write_up_to(text)
        return text

    def text(self, ids: list[int]) -> str:
        text = self.read(ids).lstrip()
        for stop in self.stops:
            text = text.split(stop, 1)[0]
        return text

    def _write_up_to(self, text: str) -> None:
        if len(text) > self.written:
            self.write(text[self.written :])
            self.written = len(text)


class WaitNotice:
    """Tells the user once per wait that every server that could hold the conversation is full and the reply waits for
    room (until another session ends: the chat would look hung otherwise): before the reply begins, or in the middle of
    it, on a line of its own (a session that could not grow as the reply was written, or one moved to another server
    that is full)."""

    def __init__(self, session, printer: ReplyPrinter, write: Callable[[str], None]):
        self.session, self.printer, self.write = session, printer, write
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="meadow-chat-wait-notice", daemon=True)

    def __enter__(self) -> "WaitNotice":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def _watch(self) -> None:
        told = None
        while not self.done.wait(WAIT_CHECK_SECONDS):
            waiting = self.session.waiting_for_room
            if waiting and not told and not self.printer.written:
                self.write("(the servers are full: waiting for room; Ctrl-C stops waiting)\n")
            elif waiting and not told:
                self.write("\n(the servers are full: the reply waits for room to go on; Ctrl-C stops it here)\n")
            told = waiting


class ThoughtsApart:
    """Writes a reasoning model's reply as Ollama's terminal chat shows it: the thinking between "Thinking..." and
    "...done thinking." (dimmed on a terminal), then the answer."""

    def __init__(self, write: Callable[[str], None], inside: bool, dim: bool):
        self.reader, self.write, self.dim = ThinkingReader(inside), write, dim
        self.phase = "before"  # before -> thinking -> answer

    def __call__(self, text: str, last: bool = False) -> None:
        thought, answer = self.reader.take(text, last)
        if thought:
            if self.phase == "before":
                self.write("Thinking...\n")
                self.phase = "thinking"
            self.write(f"\033[2m{thought}\033[0m" if self.dim else thought)
        if self.phase == "thinking" and (answer or last):
            self.write("\n...done thinking.\n\n")
            self.phase = "answer"
        if answer:
            self.write(answer)


@contextmanager
def sigint_sets_event() -> Iterator[threading.Event]:
    """While inside, a first Ctrl-C (SIGINT) sets the yielded event; a second raises KeyboardInterrupt as usual."""
    event, signals = threading.Event(), []

    def interrupted(*_) -> None:
        signals.append(True)  # counted apart from the event: a second Ctrl-C may come while the first sets it
        if len(signals) > 1:
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def chat_loop(conversation: Conversation, sampling: Sampling, read: Callable[[str], str] = input) -> None:
    """Read the user's lines and answer them until /quit, end of input, or Ctrl-C twice at the prompt."""
    interrupts = 0
    while True:
        try:
            line = read("> ").strip()
            interrupts = 0
            if line.startswith(MULTILINE):
                _answer(_multiline(line[len(MULTILINE) :], read), conversation, sampling, message=True)
            elif not _answer(line, conversation, sampling):
                return
        except EOFError:
            _write("\n")
            return
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts >= 2:
                _write("\n")
                return
            _write("\n(Ctrl-C again, /quit or Ctrl-D to leave)\n")


def _multiline(first: str, read: Callable[[str], str]) -> str:
    """The rest of a message begun with MULTILINE: its lines up to the one that ends with MULTILINE."""
    lines = [first]
    while not lines[-1].rstrip().endswith(MULTILINE):
        lines.append(read("... "))
    lines[-1] = lines[-1].rstrip().removesuffix(MULTILINE)
    return "\n".join(lines).strip()


def _answer(line: str, conversation: Conversation, sampling: Sampling, message: bool = False) -> bool:
    """Carry out a command or reply to a message (a `message` is never a command); False when the user leaves."""
    command, _, argument = ("", "", "") if message else line.partition(" ")
    if not line:
        pass
    elif command in ("/quit", "/exit"):
        return False
    elif command == "/help":
        _write(HELP + "\n")
    elif command == "/reset":
        conversation.reset(conversation.system)
        _write("(new conversation)\n")
    elif command == "/system":
        conversation.reset(argument.strip() or None)
        _write(f"(system prompt {'set' if argument.strip() else 'cleared'}; new conversation)\n")
    elif command.startswith("/") and command != "/retry":
        _write(f"(unknown command {command}; /help lists them)\n")
    else:
        with sigint_sets_event() as stop:
            try:
                if command == "/retry":
                    conversation.retry(sampling, stop, _write)
                else:
                    conversation.reply(line, sampling, stop, _write)
                _write("\n(stopped)\n" if stop.is_set() else "\n")
            except Exception as e:
                if stop.is_set():  # while it waited for room, say: nothing of the turn was kept
                    _write("\n(stopped: this message is not part of the conversation)\n")
                else:
                    _write(f"\n(error: {e})\n")
    return True


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_chat(
    model: str,
    initial_peers: list[str],
    sampling: Sampling,
    max_length: int = 2048,
    system: str | None = None,
    dht_prefix: str | None = None,
    adapter: str | None = None,
    client_config: ClientConfig | None = None,
    reserve_tokens: int = RESERVE_TOKENS,
    reasoning_effort: str | None = None,
) -> None:
    """`meadow chat`: join the swarm, then chat in the terminal until the user leaves."""
    from meadow.client.model import AutoDistributedModelForCausalLM
    from meadow.models import load_tokenizer

    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())

    tokenizer = load_tokenizer(model)
    if reasoning_effort and not thinks(tokenizer.chat_template):
        raise SystemExit(f"meadow chat: --reasoning-effort: {Path(model).name} does not reason (its chat template "
                         "writes no thinking)")  # fmt: skip
    with AutoDistributedModelForCausalLM.from_pretrained(
        model, initial_peers, dht_prefix=dht_prefix, active_adapter=adapter, client_config=client_config
    ) as distributed:
        conversation = Conversation(distributed, tokenizer, max_length, system, reserve_tokens, reasoning_effort)
        print(f"Chatting with {Path(model).name} through the swarm. /help lists the commands.", flush=True)
        try:
            chat_loop(conversation, sampling)
        finally:
            conversation.close()
