"""The split of a reasoning model's reply into its thinking and its answer, whole or as it streams."""

from __future__ import annotations

import random

import pytest

from meadow.client.reasoning import ThinkingReader, begins_thinking, split_reasoning, thinks

REPLIES = [  # (reply, whether the prompt opened the think block, (thinking, answer))
    ("<think>\nLet me see.\n</think>\n\nParis.", False, ("Let me see.", "Paris.")),  # Qwen3's
    ("Let me see.\n</think>\n\nParis.", True, ("Let me see.", "Paris.")),  # DeepSeek-R1's: opened by the template
    ("\n<think>a</think>b", False, ("a", "b")),
    ("<think></think>Hi", False, ("", "Hi")),
    ("Paris. <think>x</think>", False, ("", "Paris. <think>x</think>")),  # not at the beginning: the answer's text
    ("<think>cut off by max_tokens  ", False, ("cut off by max_tokens", "")),
    ("a </thin", True, ("a </thin", "")),  # the beginning of a tag that never came
    ("<thi", False, ("", "<thi")),
    ("Paris is <b>big</b>.", False, ("", "Paris is <b>big</b>.")),
    ("", False, ("", "")),
]


@pytest.mark.parametrize("reply, inside, expected", REPLIES)
def test_a_reply_splits_into_thinking_and_answer_whole_or_in_any_pieces(reply, inside, expected):
    assert split_reasoning(reply, inside) == expected
    for seed in range(40):
        rng, reader, got = random.Random(seed), ThinkingReader(inside), ["", ""]
        at = 0
        while at < len(reply):
            size = rng.randint(1, 5)
            thinking, answer = reader.feed(reply[at : at + size])
            got, at = [got[0] + thinking, got[1] + answer], at + size
        rest = reader.rest()
        assert (got[0] + rest[0], got[1] + rest[1]) == expected, seed


def test_nothing_is_handed_out_that_may_still_be_a_tag():
    reader = ThinkingReader()
    assert reader.feed("\n<th") == ("", "")  # may open a think block
    assert reader.feed("ink>Hmm. ") == ("Hmm.", "")  # the trailing space may end the thinking
    assert reader.feed("Yes.</thi") == (" Yes.", "")
    assert reader.feed("nk>\n\nIt is") == ("", "It is")
    assert reader.feed(" blue.") == ("", " blue.")


def test_templates_and_prompts_that_think():
    assert thinks("{{ content.split('</think>')[-1] }}") and not thinks("{{ content }}") and not thinks(None)
    assert begins_thinking("<|im_start|>assistant\n<think>\n")
    assert not begins_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n") and not begins_thinking("assistant:")
