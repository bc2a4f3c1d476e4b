"""The machine that holds replies to JSON. JSON mode against Python's own JSON parser: a text is a whole JSON object
exactly when json.loads reads it as one, and every prefix of one is accepted as it grows. JSON schemas against the
jsonschema package: every text the machine takes, walked at random or edited from valid ones, is valid."""

from __future__ import annotations

import datetime
import json
import random
import uuid

import pytest

import jsonschema
import pydantic

import re

from meadow.api.json_mode import MAX_INDENT, JsonPrefix, token_texts
from meadow.api.json_schema import OBJECT, SchemaError, compile_schema


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["int", "float", "str", "bool", "null", "list", "dict"] if depth < 3 else ["int", "str", "null"])
    if kind == "int":
        return rng.choice([0, -0, 7, -12, 10**rng.randint(0, 12)])
    if kind == "float":
        return rng.choice([0.5, -3.25e-7, 1e21, 12.0])
    if kind == "str":
        return "".join(rng.choice('ab "\\/\n\té😀\u0001') for _ in range(rng.randint(0, 6)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}


def accepts(text: str, node=OBJECT) -> bool:
    """Whether the machine takes `text` whole and sees a complete value at its end (by default, any JSON object)."""
    state = JsonPrefix(node).fed(text)
    return state is not None and state.complete


def is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def test_every_prefix_of_a_json_object_is_accepted_and_only_the_whole_one_is_closed():
    rng = random.Random(0)
    for _ in range(300):
        value = {f"key{i}": random_value(rng) for i in range(rng.randint(0, 4))}
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))
        state = JsonPrefix(OBJECT)
        for i, c in enumerate(text):
            assert not state.complete, text[:i]
            state = state.fed(c)
            assert state is not None, (text, i)
        assert state.complete and state.finished, text


@pytest.mark.parametrize(
    "text",
    ['[1, 2]', '"a"', '3', '{"a" 1}', '{"a": 01}', '{"a": tru}', '{"a": "x\ny"}', '{,}', '{"a": 1,}', '{"a": [1,]}',
     '{} x', '{"a": -}', '{"a": 1.}', '{"a": .5}', '{"a": 1e}', '{"a": "\\x"}', '{"a": "\\u12g4"}', "{'a': 1}",
     '{"a": 1]', '{"a": [1}', '{"a": NaN}', '{"a": nulls}', '{1: 2}', '{"a": 1}}',
     # whitespace Python would take but the machine keeps out of replies
     " {}", "{}\n", "{  }", "{\n\n}", "{ \n}", "{\t}", '{"a" : 1}', '{"a": 1 , "b": 2}', "{\r\n}",
     "{\n" + " " * (MAX_INDENT + 1) + "}"],
)
def test_what_is_not_a_json_object_is_refused(text):
    assert not accepts(text)


def tidy(text: str) -> bool:
    """Whether each run of whitespace outside strings is one space or a line break and an indent, none comes first or
    last, and none before a comma or a colon: the whitespace the machine allows."""
    outside = re.sub(r'"(\\.|[^"\\])*"', '""', text)  # strings emptied (json.loads has read them whole)
    return outside.strip() == outside and all(re.fullmatch(r"( |\n[ \t]{0,%d})" % MAX_INDENT, run) for run in
                                              re.findall(r"\s+", outside)) and not re.search(r"\s[,:]", outside)


def edited(text: str, rng: random.Random, alphabet: str) -> str:
    """`text` with a character or two of `alphabet` inserted, deleted or replaced at random places."""
    text = list(text)
    for _ in range(rng.randint(1, 2)):
        place = rng.randrange(len(text) + 1)
        edit = rng.choice(["insert", "delete", "replace"])
        if edit == "insert":
            text.insert(place, rng.choice(alphabet))
        elif place < len(text):
            text[place : place + 1] = [] if edit == "delete" else [rng.choice(alphabet)]
    return "".join(text)


def test_texts_near_json_are_taken_exactly_when_python_reads_an_object():
    """Random edits of JSON objects, and random strings of JSON's characters: accepted iff json.loads gives a dict
    and its whitespace is tidy."""
    rng = random.Random(1)
    alphabet = '{}[]":,0123456789-.eE+ tfnrulas\\\n'
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))) for _ in range(3000)]
    for _ in range(3000):
        texts.append(edited(json.dumps({f"k{i}": random_value(rng) for i in range(rng.randint(1, 3))}), rng, alphabet))
    objects = 0
    for text in texts:
        assert accepts(text) == (is_object(text) and tidy(text)), text
        objects += is_object(text) and tidy(text)
    assert objects > 300  # the check saw both kinds


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ["red", "blue", 'say "hi"']}, "minItems": 1, "maxItems": 3},
        "nick": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
        "naïve \"key\"": {"type": "boolean"},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
TREE = {
    "$defs": {"tree": {"type": "object", "properties": {"v": {"enum": [1, 10, -2.5, None]},
                                                        "kids": {"type": "array", "items": {"$ref": "#/$defs/tree"}}},
                       "required": ["v"]}},
    "$ref": "#/$defs/tree",
}  # fmt: skip
SCHEMAS = [
    PERSON,
    TREE,
    {"type": "object", "additionalProperties": {"type": "integer"}},  # any keys, integer values
    {"type": "object", "properties": {"a": {"const": "x"}, "b": {"type": ["string", "null"], "maxLength": 2}},
     "required": ["b"]},
    {"type": "array", "items": {"type": ["integer", "boolean"]}, "maxItems": 4},
    {"type": "string", "minLength": 2, "maxLength": 4},
    {"type": "number"},
    {"anyOf": [{"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}},
                "required": ["kind", "x"], "additionalProperties": False},
               {"type": "object", "properties": {"kind": {"const": "b"}, "y": {"type": "string", "maxLength": 3}},
                "required": ["kind", "y"], "additionalProperties": False}]},
    {"type": "object", "required": ["free"]},  # a required key not declared: any value
    {"type": "array", "items": {"anyOf": [{"type": "integer", "minimum": 60, "maximum": 70},
                                          {"type": "number", "exclusiveMinimum": -1.5, "exclusiveMaximum": 0.25},
                                          {"type": "integer", "maximum": -120}]}},
    {"type": "array", "items": {"anyOf": [{"type": "string", "pattern": "^[a-c]+x?$", "maxLength": 4},
                                          {"type": "string", "pattern": "^y[0-9]{2}"}]}, "maxItems": 3},
]  # fmt: skip


FORMATS = jsonschema.FormatChecker(["date", "email", "ipv4", "uuid"])  # its "time" is another one than RFC 3339's


class Event(pydantic.BaseModel):
    """Fields a pydantic user writes: formats and bounds."""

    when: datetime.datetime
    day: datetime.date
    at: datetime.time
    key: uuid.UUID
    mail: str = pydantic.Field(json_schema_extra={"format": "email"})
    guests: int = pydantic.Field(ge=1, le=12)
    share: float = pydantic.Field(gt=0, lt=1)
    code: str = pydantic.Field(pattern=r"^[A-Z]{2}-\d{2}$")


SCHEMAS.append(Event.model_json_schema())


def walk(schema, rng: random.Random, limit: int = 160) -> str | None:
    """A random text the machine takes for `schema`, one character at a time among those it allows (drawn from the
    schema's own characters and JSON's), ended once complete by chance; None if it grew past `limit`."""
    json_characters = '{}[]",:0123456789-.eE+ \n\\/"é😀truefalsenullTZ@'
    alphabet = sorted(set(json.dumps(schema, ensure_ascii=False)) | set(json_characters))
    state, text = JsonPrefix(compile_schema(schema)), ""
    while len(text) < limit:
        if state.finished or state.complete and rng.random() < 0.3:
            return text
        options = [(c, after) for c in alphabet if (after := state.fed(c)) is not None]
        closing = [(c, after) for c, after in options if c in '}]"'] if len(text) > limit // 2 else []
        c, state = rng.choice(closing or options)
        text += c
    return None


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_every_text_walked_through_the_machine_is_valid_for_its_schema(index):
    schema, rng = SCHEMAS[index], random.Random(index)
    texts = [text for _ in range(25) if (text := walk(schema, rng, limit=300)) is not None]
    assert len(set(texts)) > 10  # the walks went somewhere
    for text in texts:
        jsonschema.validate(json.loads(text), schema, format_checker=FORMATS)
        if schema is SCHEMAS[-1]:
            Event.model_validate_json(text)  # dates and times as pydantic reads them


VALID = [
    (PERSON,
     {"name": "Ann", "age": 30, "height": 1.7, "tags": ["red", 'say "hi"'], "nick": None, "naïve \"key\"": True}),
    (PERSON, {"name": "Bo", "age": -4, "tags": ["blue"]}),
    (PERSON, {"name": "Bo", "age": 0, "tags": ["blue"], "nick": "B"}),
    (TREE, {"v": 1, "kids": [{"v": 10}, {"v": None, "kids": [{"v": -2.5, "kids": []}]}]}),
    (SCHEMAS[2], {"a": 1, "b": -20}),
    (SCHEMAS[3], {"a": "x", "b": None}),
    (SCHEMAS[4], [1, True, 0]),
    (SCHEMAS[5], "abcd"),
    (SCHEMAS[6], -1.5e-3),
    (SCHEMAS[7], {"kind": "b", "y": "ok"}),
    (SCHEMAS[8], {"free": [1, {"x": None}]}),
]  # fmt: skip


@pytest.mark.parametrize("schema, value", VALID)
def test_valid_values_written_in_the_schemas_order_are_taken(schema, value):
    for indent in (None, 2):
        assert accepts(json.dumps(value, ensure_ascii=False, indent=indent), compile_schema(schema))


def test_edited_valid_texts_are_taken_only_when_still_valid():
    """Random edits of valid texts: whatever the machine takes is valid (the converse need not hold: keys must come in
    the schema's order, enum values written as the schema writes them)."""
    rng = random.Random(2)
    alphabet = '{}[]":,0123456789-.eE+ tfnul"abxyz'
    taken = 0
    for schema, value in VALID * 150:
        text = edited(json.dumps(value), rng, alphabet)
        if accepts(text, compile_schema(schema)):
            taken += 1
            jsonschema.validate(json.loads(text), schema)
    assert taken > 50


@pytest.mark.parametrize(
    "schema, text",
    [
        (PERSON, '{"name": "Ann", "tags": ["red"]}'),  # a required key missing
        (PERSON, '{"name": "", "age": 1, "tags": ["red"]}'),  # minLength
        (PERSON, '{"name": "Annabel", "age": 1, "tags": ["red"]}'),  # maxLength
        (PERSON, '{"name": "Ann", "age": 1.5, "tags": ["red"]}'),  # not an integer
        (PERSON, '{"name": "Ann", "age": 1, "tags": []}'),  # minItems
        (PERSON, '{"name": "Ann", "age": 1, "tags": ["red", "red", "red", "red"]}'),  # maxItems
        (PERSON, '{"name": "Ann", "age": 1, "tags": ["green"]}'),  # not in the enum
        (PERSON, '{"name": "Ann", "age": 1, "tags": ["red"], "nick": "Annie"}'),  # no alternative allows it
        (PERSON, '{"name": "Ann", "age": 1, "tags": ["red"], "extra": 1}'),  # additionalProperties false
        (TREE, '{"v": 2}'),
        (TREE, '{"v": 1, "kids": [{"kids": []}]}'),
        (SCHEMAS[2], '{"a": "1"}'),
        (SCHEMAS[4], "[1, 2, 3, 4, 5]"),
        (SCHEMAS[6], '"1"'),
        (SCHEMAS[7], '{"kind": "a", "y": "ok"}'),
        (SCHEMAS[9], "[5]"),  # below the minimum
        (SCHEMAS[9], "[71]"),
        (SCHEMAS[9], "[0.25]"),  # the exclusive maximum
        (SCHEMAS[9], "[-119]"),
        (SCHEMAS[10], '["abcd"]'),  # maxLength
        (SCHEMAS[10], '["abx", "y1"]'),  # the pattern
        (SCHEMAS[10], '["aa", "abc", "b", "c"]'),  # maxItems
    ],
)
def test_what_the_schema_does_not_allow_is_refused(schema, text):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(text), schema)  # the case is really invalid
    assert not accepts(text, compile_schema(schema))


def test_keys_are_taken_only_in_the_schemas_order():
    """Stricter than the schema, on purpose: a reply gives its keys as the schema lists them (as OpenAI's does)."""
    text = '{"age": 30, "name": "Ann", "tags": ["red"]}'
    jsonschema.validate(json.loads(text), PERSON)
    assert not accepts(text, compile_schema(PERSON))
    assert accepts('{"name": "Ann", "age": 30, "tags": ["red"]}', compile_schema(PERSON))


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "integer", "multipleOf": 3}, "'multipleOf' is not supported"),
        ({"type": "object", "properties": {"n": {"type": "array", "uniqueItems": True}}}, "schema.properties.n"),
        ({"oneOf": [{"type": "string"}, {"type": "null"}]}, "'oneOf' is not supported"),
        ({"type": "string", "pattern": "(["}, "no regular expression"),
        ({"type": "number", "minimum": "1"}, "minimum must be a number"),
        ({"type": "string", "format": ["date"]}, "format must be a name"),
        ({"type": "strange"}, "type must be one of"),
        ({"$ref": "#"}, "refers back to itself"),
        ({"$ref": "#/$defs/missing"}, "refers to nothing"),
        ({"$ref": "https://example.org/schema.json"}, "only references into the schema itself"),
        ({"type": "object", "required": ["x"], "additionalProperties": False}, "'x' is required"),
        ({"enum": ["a"], "type": "integer"}, "no value of its enum"),
        ({"anyOf": []}, "anyOf must list"),
        ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems <= maxItems"),
        ({"anyOf": [{"type": "string"}], "type": "string"}, "together with"),
        ([1], "must be a JSON schema"),
    ],
)
def test_schemas_meadow_cannot_hold_a_reply_to_are_refused_saying_why(schema, words):
    with pytest.raises(SchemaError, match=words):
        compile_schema(schema)


def sentencepiece_style_tokenizer():
    """A tokenizer that marks a word's leading space with "▁" and drops it at the start of a text, as Llama 2's and
    Mistral's do."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["a", "▁a", "{", '"', '▁"', "key", "▁key", ":", "▁1", "1", "2", "▁2", "}", "▁}", ",", "▁", "x"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def test_token_texts_spell_the_reply_as_it_is_decoded_whole():
    """The machine reads a reply as the concatenation of its tokens' texts: that must be the text the reply decodes
    to, leading spaces of words included (`{"key": 1 2}` must not read as `{"key":12}`)."""
    tokenizer = sentencepiece_style_tokenizer()
    texts = token_texts(tokenizer)
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.randrange(1, len(tokenizer)) for _ in range(rng.randint(1, 8))]
        assert "".join(texts[i] for i in ids[1:]) == tokenizer.decode(ids)[len(tokenizer.decode(ids[:1])) :], ids
    number, space_two = tokenizer.convert_tokens_to_ids(["▁1", "▁2"])
    assert tokenizer.decode([number, space_two]) == "1 2" and texts[space_two] == " 2"


@pytest.mark.parametrize(
    "format, good, bad",
    [
        ("date", "2024-02-28", "2024-02-30"),
        ("date-time", "2024-01-31T23:59:59.250Z", "2024-01-31 23:59:59Z"),
        ("time", "00:00:00+05:30", "24:00:00Z"),
        ("uuid", "0f8fad5b-d9cb-469f-a165-70867728950e", "0f8fad5b-d9cb-469f-a165-70867728950"),
        ("email", "ann.lee@example.org", "ann@example"),
        ("ipv4", "10.0.0.255", "10.0.0.256"),
    ],
)
def test_formats_hold_strings_to_their_shape(format, good, bad):
    node = compile_schema({"type": "string", "format": format})
    assert accepts(json.dumps(good), node) and not accepts(json.dumps(bad), node)
    assert not accepts(json.dumps(good + "\n"), node)


def test_unknown_formats_are_annotations_as_json_schema_says():
    assert accepts('"not a host"', compile_schema({"type": "string", "format": "hostname"}))
