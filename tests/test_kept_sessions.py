"""The API's kept sessions as a pool (the swarm's side is in test_api.py): which one a prompt takes, when they go."""

from __future__ import annotations

import threading
import time

import torch

from meadow.api.kept_sessions import MIN_SHARED_TOKENS, KeptSessions


class Session:
    """What the pool uses of a GenerationSession: the ids the servers hold, rewind, make_room, hand_over, close."""

    def __init__(self, ids: list[int], max_length: int = 1000):
        self.token_ids, self.max_length, self.closed, self.give_up = torch.tensor([ids]), max_length, False, None

    def rewind(self, position: int) -> None:
        self.token_ids = self.token_ids[:, :position]

    def make_room(self, max_length: int) -> None:
        self.max_length = max(self.max_length, max_length)

    def hand_over(self, give_up) -> None:
        self.give_up = give_up

    def close(self) -> None:
        self.closed = True


def prompt(ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids])


def test_a_prompt_takes_the_kept_session_it_shares_the_longest_start_with_rewound_to_where_they_part():
    pool, event = KeptSessions(keep_seconds=60), threading.Event()
    common = list(range(100, 100 + MIN_SHARED_TOKENS))
    short, long, other = Session(common + [1, 2]), Session(common + [1, 2, 3, 4]), Session(list(range(40)))
    for session in (short, long, other):
        pool.give(session)
    assert pool.take(prompt(common + [1, 2, 3, 9, 9]), 20, event) == (long, MIN_SHARED_TOKENS + 3)
    assert long.token_ids.tolist() == [common + [1, 2, 3]] and long.give_up is event
    # a prompt the servers hold whole still sends its last token (generate needs one new token)
    assert pool.take(prompt(common + [1, 2]), 20, event) == (short, MIN_SHARED_TOKENS + 1)
    assert pool.take(prompt(common + [7]), 20, event) == (None, 0)  # `other` shares nothing with it
    assert pool.take(prompt(list(range(MIN_SHARED_TOKENS - 1)) + [99]), 20, event) == (None, 0)  # too short a start
    assert pool.take(prompt(list(range(30))), 2000, event) == (other, 29)
    assert other.max_length == 2000 and long.max_length == 1000  # made to hold what its request needs, no less
    assert not any(session.closed for session in (short, long, other))


def test_kept_sessions_go_when_their_time_is_up_when_too_many_when_a_request_waits_and_when_the_api_stops():
    pool = KeptSessions(keep_seconds=0.5, max_kept=2)
    first, second, third = (Session([n] * 20) for n in range(3))
    for session in (first, second, third):
        pool.give(session)
    assert first.closed and not second.closed and not third.closed  # the oldest, past max_kept
    deadline = time.monotonic() + 10
    while not (second.closed and third.closed) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.closed and third.closed and pool.take(prompt([1] * 20), 10, threading.Event()) == (None, 0)

    pool = KeptSessions(keep_seconds=60)
    waited = Session([5] * 20)
    pool.give(waited)
    pool.release()  # a request waits for room
    deadline = time.monotonic() + 10
    while not waited.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert waited.closed and pool.take(prompt([5] * 21), 10, threading.Event()) == (None, 0)
    last, late = Session([6] * 20), Session([7] * 20)
    pool.give(last)
    pool.close()
    assert last.closed
    pool.give(late)  # a request that ends as the API stops
    assert late.closed

    off = KeptSessions(keep_seconds=0)
    unkept = Session([8] * 20)
    off.give(unkept)
    assert unkept.closed
