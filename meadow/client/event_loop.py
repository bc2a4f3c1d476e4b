"""The client's background event loop: one thread per process runs every coroutine that talks to the swarm.

It is the standard library's asyncio loop, not uvloop (which hivemind's RemoteExpertWorker installs): a user's
program frees objects from any thread, and when the garbage collector frees a uvloop transport outside its
loop thread, uvloop closes the libuv handle from that thread and the loop thread later crashes (segfaults
seen in our tests; uvloop issue #706). asyncio's transports tolerate that.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Awaitable, TypeVar

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None
_lock = threading.Lock()


def client_loop() -> asyncio.AbstractEventLoop:
    """This process's client loop, started on first use (again in a forked child: threads do not survive fork)."""
    global _loop, _loop_pid
    with _lock:
        if _loop is None or _loop_pid != os.getpid():
            loop = asyncio.SelectorEventLoop()  # the stdlib loop, whatever policy hivemind installed
            threading.Thread(target=loop.run_forever, name="meadow-client-loop", daemon=True).start()
            _loop, _loop_pid = loop, os.getpid()
        return _loop


def run(coroutine: Awaitable[T]) -> T:
    """Run a coroutine on the client loop and wait for its result (from any thread but the loop's own)."""
    loop = client_loop()  # once: this runs for every decoding step
    if _running_loop() is loop:
        raise RuntimeError("run() was called from the client loop itself; await the coroutine instead")
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result()


def on_client_loop() -> bool:
    """True in a coroutine or callback running on this process's client loop (where run() cannot wait)."""
    return _running_loop() is client_loop()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
