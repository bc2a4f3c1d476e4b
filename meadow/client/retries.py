"""How long one request keeps trying: a few failovers when servers fail, a longer wait when they are only full."""

from __future__ import annotations

import logging
import threading
import time

from meadow.client.config import ClientConfig
from meadow.client.transport import is_server_failure
from meadow.wire import RemoteError

logger = logging.getLogger(__name__)


def is_busy(error: BaseException) -> bool:
    """A healthy server that has no room for us now (KV cache, sessions, requests): it will, once others finish."""
    return isinstance(error, RemoteError) and error.kind == "ServerBusy"


class Retries:
    """One request's tries. A server that failed may be replaced `max_retries` times. A full one (ServerBusy) is no
    failure and uses up none of them: the request tries other servers and, while every one is full, waits for
    room, up to `busy_wait` seconds after the first such answer (a wait that the user is told about). Once `give_up`
    is set (whoever wanted the answer has gone), no more tries."""

    def __init__(self, config: ClientConfig, give_up: threading.Event | None = None):
        self.config, self.give_up, self.failovers, self.busy_until = config, give_up, 0, None

    def allow(self, error: BaseException) -> bool:
        """True if the request may go on after `error`: on another server, or on the same one once it has room."""
        if not is_server_failure(error) or (self.give_up is not None and self.give_up.is_set()):
            return False
        if is_busy(error):
            if self.busy_until is None:
                self.busy_until = time.monotonic() + self.config.busy_wait
                logger.warning(
                    f"server {error.peer} is full (ServerBusy: {error.remote_message}): waiting up to "
                    f"{self.config.busy_wait:.0f} s for room there or on another server"
                )
            return time.monotonic() < self.busy_until
        self.failovers += 1
        return self.failovers <= self.config.max_retries
