"""`meadow chat` as a person uses it: the real command on stdin/stdout against a loopback swarm. Replies equal the local
model's greedy continuation of the conversation's ids, and the conversation stays in one inference session: each
turn sends only its new tokens (the chat's debug log says what the session held and what was sent)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer

from conftest import start_swarm
from meadow.cli import build_parser
from meadow.client.chat_prompt import chat_prompt_ids, stop_strings
from meadow.models.reference import load_reference_model
from meadow.swarm import dht_prefix_for
from tests.test_api import THINKING_TEMPLATE

# a ChatML-like template over the tiny tokenizer's special tokens; a turn ends with </s>, its end-of-sequence token
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
TURN = re.compile(r"the session holds (\d+) tokens, (\d+) new tokens sent; room for (?P<room>\d+); ids \[([\d, ]*)\]")
REPLY = re.compile(r"reply: (\d+) new tokens")
WAIT = 180.0


@pytest.fixture(scope="module")
def chat_swarm(checkpoints, tmp_path_factory):
    """A swarm of a tiny model whose tokenizer has a chat template, and a copy of the model without one (plain
    transcript prompts) that finds the same servers through --dht-prefix. The servers also serve a LoRA adapter."""
    path = checkpoints("llama", num_layers=4)
    templated = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(path, templated)
    tokenizer = AutoTokenizer.from_pretrained(templated)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(templated)
    adapter = tmp_path_factory.mktemp("adapters") / "tiny-adapter"
    peft_model = get_peft_model(load_reference_model(templated), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # peft starts B at zero: the adapter would change nothing
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    peft_model.save_pretrained(adapter)
    with start_swarm(templated, ["0:2", "2:4"], "--adapters", str(adapter)) as swarm:
        yield swarm, templated, path, load_reference_model(templated), adapter


class Chat:
    """A `meadow -v chat` process: lines go to its stdin; its stdout is kept as text, its debug log as lines."""

    def __init__(self, *args: str):
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "meadow", "-v", "chat", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            start_new_session=True,
        )  # fmt: skip
        self.out, self.log = "", []
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=lambda: self.log.extend(line.rstrip("\n") for line in self.popen.stderr), daemon=True).start()

    def _read_out(self) -> None:
        while chunk := self.popen.stdout.read(1):
            self.out += chunk

    def wait(self, predicate, what: str, timeout: float = WAIT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if result := predicate():
                return result
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {what}; stdout:\n{self.out[-2000:]}\nlog:\n" + "\n".join(self.log[-40:]))

    def send(self, line: str) -> int:
        """Type a line; return where its answer starts in stdout."""
        start = len(self.out)
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()
        return start

    def turn(self, message: str, interrupt: bool = False) -> tuple[int, list[int], str, int]:
        """Send a message and wait for the reply (Ctrl-C once it is coming, if `interrupt`): the tokens the session
        held, the ids the turn sent, what stdout showed, and how many tokens the reply has."""
        turns, replies = self.matches(TURN), self.matches(REPLY)
        start = self.send(message)
        if interrupt:
            self.wait(lambda: len(self.out) > start + 10, "streamed reply")  # it comes token by token
            self.interrupt()
        self.wait(lambda: len(self.matches(REPLY)) > len(replies), "reply")
        self.wait(lambda: self.out.endswith("> "), "prompt")
        held, sent, _, ids = self.matches(TURN)[len(turns)].groups()
        ids = [int(i) for i in ids.split(", ")]
        assert len(ids) - int(held) == int(sent)
        return int(held), ids, self.out[start:], int(self.matches(REPLY)[-1].group(1))

    def interrupt(self) -> None:
        """Ctrl-C: a terminal sends SIGINT to the whole foreground process group (the client's DHT process and p2pd too)."""
        os.killpg(self.popen.pid, signal.SIGINT)

    def matches(self, pattern: re.Pattern) -> list[re.Match]:
        return [m for line in list(self.log) if (m := pattern.search(line))]

    def close(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


def local_reply(reference, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
    """transformers' greedy reply to a conversation's ids, and its text as the chat shows it."""
    strings = stop_strings(tokenizer)
    extra = dict(stop_strings=strings, tokenizer=tokenizer) if strings else {}
    inputs = torch.tensor([ids])
    output = reference.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id, **extra)[0, len(ids) :].tolist()  # fmt: skip
    text = tokenizer.decode(output, skip_special_tokens=True).lstrip()
    for stop in strings:
        text = text.split(stop, 1)[0]
    return output, text


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "plain-transcript"])
def test_replies_are_local_greedy_and_each_turn_sends_only_new_tokens(chat_swarm, template):
    """...and a turn reserves its prompt and --reserve-tokens of the reply (the plain copy's chat: 2 of its 8), its
    session growing on the servers as the reply is written."""
    swarm, templated, plain, reference, _ = chat_swarm
    path = templated if template else plain  # the plain copy has the same weights and no chat template
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert bool(tokenizer.chat_template) == template
    reserve = 128 if template else 2  # the default, above the longest reply, or below it
    chat = Chat(str(path), "--initial-peers", *swarm.initial_peers, "--dht-prefix", dht_prefix_for(templated),
                "--max-new-tokens", "8", *([] if template else ["--reserve-tokens", "2"]))  # fmt: skip
    try:
        chat.wait(lambda: chat.out.endswith("> "), "prompt")
        start = chat.send("/retry")
        chat.wait(lambda: "no message to ask again" in chat.out[start:], "/retry refused before any message")
        held, ids, shown, made = chat.turn("Hello there")
        assert held == 0 and ids == chat_prompt_ids(tokenizer, [user("Hello there")])[0].tolist()
        first, text = local_reply(reference, tokenizer, ids, 8)
        assert text and text in shown and made == len(first) > 2
        assert int(chat.matches(TURN)[-1]["room"]) == len(ids) + min(8, reserve)

        # the second turn continues the session: the servers hold the first turn but for the reply's last token
        held, ids2, shown, _ = chat.turn("Tell me more")
        conversation = ids + first
        assert held == len(conversation) - 1
        assert ids2[: len(conversation)] == conversation and "Tell me more" in tokenizer.decode(ids2[len(conversation) :])
        _, text = local_reply(reference, tokenizer, ids2, 8)
        assert text and text in shown
        # /retry drops that reply and asks again: the session, rewound, is sent only the second message again
        held_again, ids_again, shown, _ = chat.turn("/retry")
        assert (held_again, ids_again) == (held, ids2) and text in shown

        if template:  # /system and /reset start new sessions from the template's prompt
            start = chat.send("/system Be brief.")
            chat.wait(lambda: "(system prompt set" in chat.out[start:], "system prompt notice")
            held, ids, shown, _ = chat.turn("Hello there")
            assert held == 0 and ids == chat_prompt_ids(tokenizer, [{"role": "system", "content": "Be brief."}, user("Hello there")])[0].tolist()
            assert local_reply(reference, tokenizer, ids, 8)[1] in shown
            chat.send("/reset")
            held, again, shown, _ = chat.turn("Hello there")
            assert held == 0 and again == ids  # a new conversation, with the same system prompt
            # a message of several lines, between """ marks as in Ollama's chat (a line in it is never a command)
            chat.send("/reset")
            chat.send('"""First line')
            chat.send("/reset")
            held, ids, shown, _ = chat.turn('last line"""')
            message = "First line\n/reset\nlast line"
            system = {"role": "system", "content": "Be brief."}
            assert held == 0 and ids == chat_prompt_ids(tokenizer, [system, user(message)])[0].tolist()
            assert local_reply(reference, tokenizer, ids, 8)[1] in shown
        chat.popen.stdin.close()  # Ctrl-D
        assert chat.popen.wait(60) == 0
    finally:
        chat.close()


def test_a_reasoning_models_thinking_is_shown_apart_from_its_answer(chat_swarm, tmp_path):
    """A copy of the model whose template opens the reply's think block: the greedy reply (all thinking in 8 tokens)
    is shown between "Thinking..." and "...done thinking.", as Ollama's terminal chat shows it; --reasoning-effort
    reaches the template (and is refused for a model that does not reason)."""
    swarm, templated, _, reference, _ = chat_swarm
    path = tmp_path / "tiny-thinking"
    shutil.copytree(templated, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.save_pretrained(path)
    chat = Chat(str(path), "--initial-peers", *swarm.initial_peers, "--dht-prefix", dht_prefix_for(templated),
                "--max-new-tokens", "8", "--reasoning-effort", "low")  # fmt: skip
    try:
        chat.wait(lambda: chat.out.endswith("> "), "prompt")
        _, ids, shown, _ = chat.turn("Why is the sky blue?")
        assert tokenizer.decode(ids).startswith("effort: low\n")  # the template shows it
        thought = local_reply(reference, tokenizer, ids, 8)[1].strip()
        assert thought and shown.startswith(f"Thinking...\n{thought}\n...done thinking.\n\n"), shown
    finally:
        chat.close()
    refused = subprocess.run([sys.executable, "-m", "meadow", "chat", str(templated), "--initial-peers",
                              *swarm.initial_peers, "--reasoning-effort", "low"], capture_output=True, text=True)
    assert refused.returncode != 0 and "does not reason" in refused.stderr


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(chat_swarm):
    swarm, templated, _, reference, _ = chat_swarm
    tokenizer = AutoTokenizer.from_pretrained(templated)
    chat = Chat(str(templated), "--initial-peers", *swarm.initial_peers, "--max-new-tokens", "400", "--max-length", "1024")
    try:
        chat.wait(lambda: chat.out.endswith("> "), "prompt")
        held, ids, shown, made = chat.turn("Tell me a story", interrupt=True)
        assert held == 0 and 0 < made < 400  # cut short
        reply, text = local_reply(reference, tokenizer, ids, made)
        assert text in shown and "(stopped)" in shown

        # the next turn goes on from the cut reply, in the same session
        held, ids2, shown, made = chat.turn("Go on", interrupt=True)
        assert held == len(ids) + len(reply) - 1 and ids2[: len(ids) + len(reply)] == ids + reply
        assert local_reply(reference, tokenizer, ids2, made)[1] in shown

        chat.interrupt()  # at the prompt: a hint, then a second Ctrl-C leaves
        chat.wait(lambda: "Ctrl-C again" in chat.out, "hint")
        chat.interrupt()
        assert chat.popen.wait(60) == 0
    finally:
        chat.close()


def test_chat_and_generate_use_a_served_adapter(chat_swarm):
    swarm, templated, _, reference, adapter = chat_swarm
    tokenizer = AutoTokenizer.from_pretrained(templated)
    tuned = PeftModel.from_pretrained(load_reference_model(templated), adapter).eval()
    prompt = "Hello there"
    ids = chat_prompt_ids(tokenizer, [user(prompt)])[0].tolist()
    _, text = local_reply(tuned, tokenizer, ids, 8)
    assert text != local_reply(reference, tokenizer, ids, 8)[1]  # the adapter changes the reply

    chat = Chat(str(templated), "--initial-peers", *swarm.initial_peers, "--max-new-tokens", "8", "--adapter", adapter.name)
    try:
        chat.wait(lambda: chat.out.endswith("> "), "prompt")
        assert text in chat.turn(prompt)[2]
    finally:
        chat.close()

    result = subprocess.run(
        [sys.executable, "-m", "meadow", "generate", str(templated), "--initial-peers", *swarm.initial_peers,
         "--prompt", prompt, "--max-new-tokens", "8", "--adapter", adapter.name],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    inputs = tokenizer(prompt, return_tensors="pt")
    expected = tuned.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    base = reference.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert not torch.equal(expected, base) and tokenizer.decode(expected[0], skip_special_tokens=True) in result.stdout


def test_model_is_optional_and_defaults_to_the_default_model(capsys):
    peer = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDDafu3S7oDo7ALzd8SK8rosWJ1agT1jckbFPwxPUWBU7"
    parser, peers = build_parser(), ["--initial-peers", peer]
    args = parser.parse_args(["serve", *peers, "--blocks", "0:10"])
    assert args.model is None and args.blocks.end == 10
    assert parser.parse_args(["generate", *peers, "--prompt", "hi"]).model is None
    assert parser.parse_args(["chat", *peers]).model is None
    for command in ("serve", "generate", "chat"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert "default: SmolLM2-135M-Instruct" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):  # a MODEL after --initial-peers would be taken for a peer: say so
        parser.parse_args(["chat", *peers, "some-model"])
    assert "a MODEL goes before --initial-peers" in capsys.readouterr().err
