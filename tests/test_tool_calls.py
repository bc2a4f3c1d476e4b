"""Tool calls: the machine a reply with tools follows, against the jsonschema package (every call it lets through can
be made: a known name, arguments valid for that tool), the reader that takes calls back out of the reply, whole or as
it streams, and the conversation as chat templates are given it."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import jsonschema
import pytest

from meadow.api.errors import APIError
from meadow.client.chat_prompt import ConversationRefused, chat_prompt_ids
from meadow.models.tiny import make_tokenizer
from meadow.api.tool_calls import (
    HERMES, LLAMA, OPEN, CallReader, NamedChoice, Tool, conversation, dialect_of, read_reply, tool_prompt_ids, toolbox,
)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["C", "F"]},
    },
    "required": ["city"],
    "additionalProperties": False,
}
NOTE = {"type": "object", "required": ["text", "tags"], "properties": {
    "text": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}}}  # fmt: skip
TOOLS = [
    Tool.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}),
    Tool.model_validate({"type": "function", "function": {"name": "add_note", "parameters": NOTE}}),
    Tool.model_validate({"type": "function", "function": {"name": "now"}}),  # no parameters: {} only
]
SCHEMAS = {"get_weather": WEATHER, "add_note": NOTE, "now": {"type": "object", "additionalProperties": False}}
NAMED = NamedChoice(function={"name": "add_note"})
# (tool_choice, parallel_tool_calls, dialect): Meadow's own description (the Hermes form), Llama 3's bare JSON
MODES = [(None, None, None), ("auto", False, None), ("required", None, None), ("required", False, None),
         (NAMED, None, None), ("none", None, None),
         (None, None, LLAMA), ("required", None, LLAMA), (NAMED, None, LLAMA), ("none", None, LLAMA)]  # fmt: skip


def walk(box, rng: random.Random, limit: int = 600) -> str | None:
    """A random reply the machine takes, a character at a time among those it allows (and, now and then, a whole
    OPEN where one may come), ended once complete by chance; None if it grew past `limit`."""
    alphabet = sorted(set(json.dumps([tool.model_dump() for tool in TOOLS])) | set(' \n\\"0123456789-.:<>/_abcé'))
    state, text, opener = box.prefix(), "", box.dialect.marker or "{"
    while len(text) < limit:
        if state.finished or state.complete and rng.random() < 0.2:
            return text
        if rng.random() < 0.1 and (after := state.fed(opener)) is not None:
            state, text = after, text + opener
            continue
        options = [(c, after) for c in alphabet if (after := state.fed(c)) is not None]
        closing = [(c, after) for c, after in options if c in '}]"'] if len(text) > limit // 2 else []
        c, state = rng.choice(closing or options)
        text += c
    return None


@pytest.mark.parametrize("choice, parallel, dialect", MODES)
def test_every_reply_walked_through_the_machine_reads_back_as_calls_that_can_be_made(choice, parallel, dialect):
    box, rng = toolbox(TOOLS, choice, parallel), random.Random(str(choice))
    box = box.speaking(dialect) if dialect else box
    d, callable_ = box.dialect, bool(box.callable)
    several = box.parallel and d.again is not None
    replies = [text for _ in range(60) if (text := walk(box, rng)) is not None]
    assert len(set(replies)) > 20
    counts = []
    for text in replies:
        content, calls = read_reply(text, d, callable_)
        counts.append(len(calls))
        for call in calls:
            assert call.name in box.callable
            jsonschema.validate(call.arguments, SCHEMAS[call.name])
        if not box.free:  # the reply is calls only
            assert content == "" and calls and text.startswith(d.marker or "{")
        if choice == "none":
            assert not calls and content == text.rstrip() and (OPEN not in text or not d.marker)
        opened = OPEN in text if d.marker else callable_ and text.startswith("{")
        assert bool(calls) == opened and len(calls) <= (99 if several else 1)  # each call opened is whole
        assert len({json.dumps([call.name, call.arguments], sort_keys=True) for call in calls}) == len(calls)
        # read as it streams, in random pieces: the same content and calls
        reader, streamed, said = CallReader(d, callable_), [], ""
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 6)))
        for start, end in zip([0, *cuts], [*cuts, len(text)]):
            piece, new = reader.feed(text[start:end])
            said, streamed = said + piece, streamed + new
        assert said + reader.rest() == content
        assert [(call.name, call.arguments) for call in streamed] == [(call.name, call.arguments) for call in calls]
        # and piece by piece: each call begins once, with its id and name, and its arguments' text adds up to them
        reader, texts, wholes = CallReader(d, callable_), {}, []
        for start, end in zip([0, *cuts], [*cuts, len(text)]):
            for piece in reader.stream(text[start:end])[1]:
                assert piece.begins == (piece.index not in texts) and piece.name in box.callable
                texts[piece.index] = texts.get(piece.index, "") + piece.arguments
                if piece.whole is not None:
                    assert (piece.whole.id, piece.whole.text) == (piece.id, texts[piece.index])
                    assert json.loads(piece.whole.text) == piece.whole.arguments and piece.whole.text in text
                    wholes.append(piece.whole)
        assert [(call.name, call.arguments) for call in wholes] == [(call.name, call.arguments) for call in calls]
        assert list(texts) == list(range(len(calls)))  # numbered in order, none begun that did not end whole
    if choice != "none":
        assert max(counts) >= (2 if several else 1)  # the walks made calls, several in a reply when allowed


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize(
    "choice, parallel, text",
    [
        ("required", None, "Sure." + CALL),  # text before a call that is required
        ("required", None, CALL.replace("get_weather", "get_wether")),  # no such tool
        ("required", None, CALL.replace('"Paris"}', '"Paris", "when": 1}')),  # no such argument
        ("required", None, CALL.replace('"Paris"', '"Paris", "days": 8')),  # above its maximum
        ("required", None, CALL.replace('"Paris"', '"Paris", "unit": "K"')),  # not in its enum
        ("required", None, CALL.replace("{\"city\": \"Paris\"}", "[]")),  # arguments must be an object
        ("required", None, CALL.replace('"name": "get_weather", "arguments"', '"arguments"')),  # the name first
        ("required", None, CALL.replace("\n{", "{")),  # the call on a line of its own
        ("required", None, CALL.replace("</tool_call>", "</tool>")),
        ("auto", None, CALL + " Done."),  # nothing but calls after a call
        ("auto", False, CALL + "\n" + CALL),  # one call only
        (NAMED, None, CALL),  # another tool than the one named
        ("none", None, "I will call it: " + CALL),  # no call at all
    ],
)
def test_replies_that_break_the_form_are_refused(choice, parallel, text):
    box = toolbox(TOOLS, choice, parallel)
    assert box.prefix().fed(text) is None


LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


@pytest.mark.parametrize(
    "choice, text",
    [
        ("required", "Sure. " + LLAMA_CALL),  # the call is the whole reply
        ("required", CALL),  # not the Hermes form
        ("required", LLAMA_CALL.replace("parameters", "arguments")),  # Llama's key for them
        ("auto", LLAMA_CALL + "\n" + LLAMA_CALL.replace("Paris", "Rome")),  # one call a reply
        ("auto", LLAMA_CALL + " Done."),
    ],
)
def test_llama_replies_that_break_its_form_are_refused(choice, text):
    assert toolbox(TOOLS, choice, None).speaking(LLAMA).prefix().fed(text) is None


def test_a_llama_call_is_the_whole_reply_or_none_of_it():
    auto = toolbox(TOOLS, "auto", None).speaking(LLAMA).prefix()
    assert auto.fed("It is " + LLAMA_CALL).complete  # a call only as the reply begins: here, text
    assert read_reply("It is " + LLAMA_CALL, LLAMA) == ("It is " + LLAMA_CALL, [])
    assert auto.fed(LLAMA_CALL).finished and read_reply(LLAMA_CALL, LLAMA)[1][0].arguments == {"city": "Paris"}
    none = toolbox(TOOLS, "none", None).speaking(LLAMA).prefix()  # any text, a call's too, and no call read in it
    assert none.fed(LLAMA_CALL).complete and read_reply(LLAMA_CALL, LLAMA, callable=False) == (LLAMA_CALL, [])


def test_the_reply_may_end_where_a_call_or_text_has_ended_and_must_once_nothing_else_may_come():
    auto, one = toolbox(TOOLS, "auto", None), toolbox(TOOLS, "required", False)
    assert auto.prefix().fed("Hello").complete and auto.prefix().fed(CALL).complete
    assert not auto.prefix().fed(CALL[:-1]).complete and not auto.prefix().fed(CALL).finished
    assert not one.prefix().fed("").complete and one.prefix().fed(CALL).finished
    assert read_reply("It is sunny.\n" + CALL)[0] == "It is sunny."
    assert read_reply(CALL[:-20])[1] == []  # cut short (max_tokens): no call


def test_a_call_that_repeats_one_already_made_ends_the_reply_and_is_not_read_back():
    """A small model asked for calls repeats its first until max_tokens: the repeat ends the reply instead."""
    box = toolbox(TOOLS, "required", None)
    other = CALL.replace("Paris", "Rome")
    assert not box.prefix().fed(CALL + "\n" + other).finished
    for again in (CALL, CALL.replace('{"city": "Paris"}', '{\n  "city":"Paris"}')):
        state = box.prefix().fed(CALL + "\n" + other + "\n" + again)
        assert state.finished and state.fed("\n") is None
        content, calls = read_reply(CALL + "\n" + other + "\n" + again)
        assert [call.arguments["city"] for call in calls] == ["Paris", "Rome"]


def test_a_streamed_call_comes_as_its_arguments_are_written_a_second_of_one_function_whole_and_a_repeat_not():
    other, time = CALL.replace("Paris", "Rome"), '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    reply = "Let me look.\n" + CALL + "\n" + time + "\n" + other + "\n" + CALL
    for dialect, text in ((HERMES, reply), (LLAMA, LLAMA_CALL)):
        reader, said, pieces = CallReader(dialect), "", []
        for c in text:  # a character at a time
            content, new = reader.stream(c)
            said, pieces = said + content, pieces + [(len(said), piece) for piece in new]
        assert said + reader.rest() == ("Let me look." if dialect is HERMES else "")
        first = [piece for _, piece in pieces if piece.index == 0]
        assert first[0].begins and first[0].name == "get_weather" and first[0].arguments == ""  # its name, at once
        assert "".join(piece.arguments for piece in first) == '{"city": "Paris"}' == first[-1].whole.text
        assert len(first) == 1 + len('{"city": "Paris"}') and first[-1].whole.arguments == {"city": "Paris"}
        assert len({piece.id for piece in first}) == 1 and not any(piece.begins for piece in first[1:])
        if dialect is HERMES:  # then "now" (no arguments), and a second call of get_weather, whole in one piece
            assert [(p.index, p.name, p.arguments, p.begins) for _, p in pieces if p.index > 0] == [
                (1, "now", "", True), (1, "now", "{", False), (1, "now", "}", False),
                (2, "get_weather", '{"city": "Rome"}', True)]  # fmt: skip
            assert pieces[-1][1].whole.arguments == {"city": "Rome"}  # and the repeat of the first: nothing


HERMES_LIKE = "{% for m in messages %}{{ m.content }}{% endfor %}" \
         "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}<tool_call>"  # fmt: skip
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}},
    ]},
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "rain"},
]  # fmt: skip


LLAMA_LIKE = '{% if tools %}Respond in the format {"name": function name, "parameters": dictionary of argument ' \
             'name and its value}.{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}'  # fmt: skip


def test_a_template_that_shows_tools_gets_them_others_see_them_described_and_calls_written_as_replies_write_them():
    assert [dialect_of(template).shown for template in (HERMES_LIKE, LLAMA_LIKE, None, "{{ messages }}")] == [
        True, True, False, False]  # fmt: skip
    assert dialect_of(LLAMA_LIKE) == LLAMA and dialect_of(HERMES_LIKE).marker == dialect_of(None).marker == OPEN
    box = toolbox(TOOLS, None, None)
    assert conversation(dialect_of(HERMES_LIKE), HISTORY, box) == (HISTORY, box.shown())
    assert conversation(dialect_of(HERMES_LIKE), HISTORY, toolbox(TOOLS, "none", None)) == (HISTORY, None)
    messages, tools = conversation(dialect_of(None), HISTORY, box)
    assert tools is None and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n") and all(json.dumps(tool.model_dump(exclude_none=True)) in system
                                                      for tool in TOOLS)  # fmt: skip
    assert messages[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
    # the calls of the history are written as the machine holds a reply to: read back, they are the same calls
    written = messages[2]["content"]
    assert toolbox(TOOLS, "required", None).prefix().fed(written).complete
    assert [(call.name, call.arguments) for call in read_reply(written)[1]] == [("get_weather", {"city": "Paris"}),
                                                                          ("get_weather", {"city": "Rome", "days": 2})]
    none = conversation(dialect_of(None), HISTORY[1:2], toolbox(TOOLS, "none", None))[0]
    assert none == HISTORY[1:2]  # tools that may not be called are not described


@pytest.mark.parametrize(
    "tools, choice, words",
    [
        ([], "required", "tool_choice needs tools"),
        (TOOLS + TOOLS[:1], None, "two tools are named"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None,
         "must be an object"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}], None,
         "tools[0].function.parameters: the keyword 'not'"),
        (TOOLS, NamedChoice(function={"name": "fly"}), "no tool is named 'fly'"),
        (TOOLS * 50, None, "at most 128"),
    ],
)
def test_tools_that_cannot_be_followed_are_refused_saying_why(tools, choice, words):
    tools = [tool if isinstance(tool, Tool) else Tool.model_validate(tool) for tool in tools]
    with pytest.raises(APIError) as refused:
        toolbox(tools, choice, None)
    assert refused.value.status == 400 and words in refused.value.message


# as Mistral's first templates: user and assistant alternate from the start, no system message
ALTERNATING = ("{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
               "[{{ m.role }}] {{ m.content }}\n{% endfor %}")  # fmt: skip


def test_a_template_without_a_system_message_gets_it_and_the_tools_in_the_first_user_message():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = ALTERNATING
    box, hi = toolbox(TOOLS, None, None), {"role": "user", "content": "hi"}
    for messages, last in (([hi], "hi"), ([hi, *HISTORY[2:]], "rain\n</tool_response>")):  # results: one message
        text = tokenizer.decode(tool_prompt_ids(tokenizer, dialect_of(ALTERNATING), messages, box)[0])
        assert text.startswith("[user] You can call functions") and text.count("<tools>") == 1
        assert text.rstrip().endswith(last)
    # a system message of the user's own: its text first, then the tools, then the user's
    text = tokenizer.decode(tool_prompt_ids(tokenizer, dialect_of(ALTERNATING), [HISTORY[0], hi], box)[0])
    assert text.startswith("[user] Be brief.\n\nYou can call functions")
    assert text.rstrip().endswith("</tool_response>.\n\nhi")
    text = tokenizer.decode(chat_prompt_ids(tokenizer, [HISTORY[0], hi, {"role": "system", "content": "Be kind."}])[0])
    assert text == "[user] Be brief.\n\nBe kind.\n\nhi\n"  # every system message, in their order
    with pytest.raises(ConversationRefused, match="must alternate"):  # the template's refusal when folding is no help
        chat_prompt_ids(tokenizer, [HISTORY[0], hi, hi])
    with pytest.raises(ConversationRefused, match="must alternate"):  # nothing to fold into
        chat_prompt_ids(tokenizer, [HISTORY[0]])


def test_a_reasoning_models_think_block_opens_no_call():
    """In a think block (opened by the template, or the reply's first words) a call's marker is text; after it, and
    in a reply that does not begin with one, a call is held to the tools as ever."""
    box = toolbox(TOOLS, None, None).speaking(dialect_of("{{ tools }}" + OPEN))
    inside, may = replace(box, thinking="inside"), replace(box, thinking="may")
    bogus, good = '<tool_call>\n{"name": "bogus', '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    assert inside.prefix().fed(f"I could write {bogus}").complete  # thinking: any text, the reply may end there
    assert inside.prefix().fed(f"x</think>\n\n{bogus}") is None and inside.prefix().fed(f"x</think>\n\n{good}")
    assert may.prefix().fed(f"\n<think>{bogus}</think>\n\n{good}").finished is False  # another call may follow
    for reply in (bogus, f"Hello {bogus}", f"<think>x</think>{bogus}"):
        assert may.prefix().fed(reply) is None and box.prefix().fed(reply.replace("<think>x</think>", "")) is None
    assert may.prefix().fed(good) and may.prefix().fed(f"<th{good}")  # "<th" was no think block: free text


def test_a_template_that_fails_on_a_variable_of_another_type_refuses_the_conversation_naming_it():
    """Not a 500: a request's chat_template_kwargs may give a variable a value the template cannot use."""
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{{ bos_token + messages[0]['content'] }}"
    hi = [{"role": "user", "content": "hi"}]
    assert tokenizer.decode(chat_prompt_ids(tokenizer, hi, bos_token="<s>")[0]) == "<s>hi"
    with pytest.raises(ConversationRefused, match="with the variables bos_token: TypeError"):
        chat_prompt_ids(tokenizer, hi, bos_token={"a": 1})
