"""JSON mode's state machine against Python's own JSON parser: a text is a whole JSON object exactly when json.loads
reads it as one, and every prefix of one is accepted as it grows."""

from __future__ import annotations

import json
import random

import pytest

from meadow.api.json_mode import MAX_WHITESPACE, JsonPrefix


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


def accepts(text: str) -> bool:
    """Whether JsonPrefix takes `text` whole and sees a closed object at its end."""
    state = JsonPrefix()
    return state.feed(text) and state.closed


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
        state = JsonPrefix()
        for i, c in enumerate(text):
            assert not state.closed, text[:i]
            assert state.feed(c), (text, i)
        assert state.closed, text


@pytest.mark.parametrize(
    "text",
    ['[1, 2]', '"a"', '3', '{"a" 1}', '{"a": 01}', '{"a": tru}', '{"a": "x\ny"}', '{,}', '{"a": 1,}', '{"a": [1,]}',
     '{} x', '{"a": -}', '{"a": 1.}', '{"a": .5}', '{"a": 1e}', '{"a": "\\x"}', '{"a": "\\u12g4"}', "{'a': 1}",
     '{"a": 1]', '{"a": [1}', '{"a": NaN}', '{"a": nulls}', '{1: 2}', '{"a": 1}}',
     "{" + " " * (MAX_WHITESPACE + 1) + "}"],
)
def test_what_is_not_a_json_object_is_refused(text):
    assert not accepts(text)


def test_texts_near_json_are_taken_exactly_when_python_reads_an_object():
    """Random edits of JSON objects, and random strings of JSON's characters: accepted iff json.loads gives a dict."""
    rng = random.Random(1)
    alphabet = '{}[]":,0123456789-.eE+ tfnrulas\\\n'
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))) for _ in range(3000)]
    for _ in range(3000):
        text = list(json.dumps({f"k{i}": random_value(rng) for i in range(rng.randint(1, 3))}))
        for _ in range(rng.randint(1, 2)):
            place = rng.randrange(len(text) + 1)
            edit = rng.choice(["insert", "delete", "replace"])
            if edit == "insert":
                text.insert(place, rng.choice(alphabet))
            elif place < len(text):
                text[place : place + 1] = [] if edit == "delete" else [rng.choice(alphabet)]
        texts.append("".join(text))
    objects = 0
    for text in texts:
        assert accepts(text) == is_object(text), text
        objects += is_object(text)
    assert objects > 300  # the check saw both kinds
