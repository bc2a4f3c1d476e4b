"""Inference sessions an API keeps open for a while after their request, so that the next request of the same
conversation (a chat's next turn, an agent's next step) sends the servers only what is new: the servers still hold
the KV cache of the conversation so far. A request takes the kept session that shares the longest start with its
prompt, rewinds it to where they part, and goes on from there; OpenAI's usage tells how many prompt tokens that saved
(`cached_tokens`).

A kept session holds KV cache on servers that others share, so it is kept briefly (`keep_seconds` after its request),
a few at most, and all are let go at once when a request of this API waits for room. A session is opened for what
its request needs; the next turn's prompt is the last one's plus the answer and a new message: the session grows on
the servers with the next step (on a server with no room to grow, it moves to one that has)."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (the CLI reads KEEP_SECONDS here: no torch for that)
    import torch

logger = logging.getLogger(__name__)

KEEP_SECONDS = 30.0  # a chat's next question, an agent's next step after a tool ran
MAX_KEPT = 4
MIN_SHARED_TOKENS = 16  # a shorter common start saves too little to be worth a session another request may want


class KeptSessions:
    """The sessions kept for one model's requests. Thread-safe: requests take and give back on their own threads."""

    def __init__(self, keep_seconds: float = KEEP_SECONDS, max_kept: int = MAX_KEPT):
        self.keep_seconds, self.max_kept = keep_seconds, max_kept
        self._kept: list[tuple[float, object]] = []  # (when it was given back, the GenerationSession), oldest first
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closed = False
        self._expirer: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.keep_seconds > 0

    def take(self, prompt_ids: torch.Tensor, needed: int, give_up: threading.Event):
        """(session, cached tokens): the kept session sharing the longest start (at least MIN_SHARED_TOKENS) with
        `prompt_ids` (1, L), rewound to where they part (before the prompt's last token at most: generate needs one new
        token) and made to hold `needed` tokens; or (None, 0)."""
        prompt = prompt_ids[0]
        with self._lock:
            best, best_shared = None, 0
            for entry in self._kept:
                session = entry[1]
                if session.token_ids is None or session.token_ids.shape[0] != 1:
                    continue
                shared = _shared_start(session.token_ids[0], prompt)
                if shared > best_shared:
                    best, best_shared = entry, shared
            if best is None or best_shared < MIN_SHARED_TOKENS:
                return None, 0
            self._kept.remove(best)
        session = best[1]
        session.rewind(best_shared)
        session.make_room(needed)
        session.hand_over(give_up)
        return session, best_shared

    def give(self, session) -> None:
        """Keep `session` (its request is done with it) for the next request of its conversation; or close it."""
        if not self.enabled or session.token_ids is None:
            close_quietly(session)
            return
        with self._lock:
            if self._closed:
                dropped = [session]
            else:
                self._kept.append((time.monotonic(), session))
                dropped = [s for _, s in self._kept[: max(0, len(self._kept) - self.max_kept)]]
                del self._kept[: len(dropped)]
                self._changed.notify()
                if self._expirer is None:
                    self._expirer = threading.Thread(target=self._expire, name="meadow-kept-sessions", daemon=True)
                    self._expirer.start()
        close_quietly(*dropped)

    def release(self) -> None:
        """Let every kept session go (on a thread of its own: closing waits for the servers), e.g. because a request
        waits for room on full servers: theirs may be that room."""
        with self._lock:
            dropped, self._kept = [s for _, s in self._kept], []
        if dropped:
            logger.info(f"letting {len(dropped)} kept session(s) go: a request waits for room")
            threading.Thread(target=close_quietly, args=dropped, daemon=True).start()

    def close(self) -> None:
        """Close every kept session now, and keep none from here on (the API stops)."""
        with self._lock:
            self._closed = True
            dropped, self._kept = [s for _, s in self._kept], []
            self._changed.notify()
        close_quietly(*dropped)

    def _expire(self) -> None:
        """Close each kept session `keep_seconds` after it was given back."""
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                expired = [s for kept_at, s in self._kept if now - kept_at >= self.keep_seconds]
                if not expired:  # until the oldest is due, or another is given back
                    self._changed.wait(self.keep_seconds - (now - self._kept[0][0]) if self._kept else None)
                    continue
                self._kept = [entry for entry in self._kept if entry[1] not in expired]
            close_quietly(*expired)  # (closing waits for the servers: not under the lock)


def _shared_start(stored: torch.Tensor, prompt: torch.Tensor) -> int:
    """How many first tokens the two id sequences share, short of the prompt's last token."""
    n = min(stored.shape[0], prompt.shape[0] - 1)
    differ = (stored[:n] != prompt[:n]).nonzero()
    return int(differ[0, 0]) if differ.numel() else n


def close_quietly(*sessions) -> None:
    """Close each session; one whose server is gone meanwhile is gone on its side too (logged only)."""
    for session in sessions:
        try:
            session.close()
        except Exception as e:  # a server gone meanwhile: its side of the session is gone too
            logger.debug(f"closing a kept session: {e!r}")
