"""The KV-cache budget: how many token slots a server lends to sessions, and who holds them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from meadow.wire import ServerBusy


class CacheBudget:
    """Token slots (batch x length) of KV cache for every hosted block; a session holds its slots until it ends."""

    def __init__(self, tokens: int):
        self.total = tokens
        self.used = 0

    @property
    def left(self) -> int:
        return self.total - self.used

    @contextmanager
    def reserve(self, tokens: int) -> Iterator[None]:
        if tokens > self.left:
            raise ServerBusy(
                f"not enough KV cache: the session needs {tokens} token slots (batch x max_length), "
                f"{self.left} of {self.total} are free"
            )
        self.used += tokens
        try:
            yield
        finally:
            self.used -= tokens
