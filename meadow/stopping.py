"""How a process that owns a hivemind DHT process (`meadow dht`, `meadow serve`) stops on SIGINT or SIGTERM, sent to it
or to its whole process group (`kill -- -PGID`, supervisors, systemd), without leaving a process behind.

hivemind's DHT runs in a forked child, which runs a p2pd daemon. Two things used to hang: the child inherited our
signal handler, so a SIGTERM to the group did not end it and our orderly shutdown waited for it forever; and a
signal during start-up left us waiting for a DHT process that had died (it never reports ready). So children get
the default actions back, and a stop before start-up is over (or a second one) ends our children and us at once.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, NoReturn

_fork_hook_registered = False


def on_stop_signals(handler: Callable[[], None]) -> None:
    """Call `handler` (in the main thread) on the first SIGINT or SIGTERM to this process; a second one (even while the
    handler runs: Ctrl-C pressed again) ends the process and its children at once. Forked children keep the defaults.
    A handler runs between two bytecodes of the main thread, so it must not wait for a lock that thread may hold (an
    Event's, say): set a flag, or hand the work to an event loop."""
    global _fork_hook_registered
    stopping = []

    def handle(*_) -> None:
        if stopping:
            exit_now(1)
        stopping.append(True)
        handler()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_default_stop_signals)
        _fork_hook_registered = True


def _default_stop_signals() -> None:
    signal.set_wakeup_fd(-1)  # an asyncio loop's wakeup socket belongs to the parent
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def exit_now(code: int = 1) -> NoReturn:
    """SIGTERM every descendant (the DHT process and its p2pd: they keep the default action) and exit at once,
    without waiting for threads stuck in calls to a DHT process that may be gone."""
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def exit_without_teardown(code: int = 0) -> NoReturn:
    """Exit once a command has stopped in order: the atexit handlers run (logging's flush, multiprocessing's joins)
    and the streams are flushed, but the interpreter does not tear down every module one by one, which takes
    0.3-0.5 s with torch loaded: a swarm's processes, and every test that starts some, stop that much sooner.
    A thread still at work (not a daemon) is waited for by the usual exit instead."""
    others = [thread for thread in threading.enumerate() if thread is not threading.main_thread()]
    if any(thread.is_alive() and not thread.daemon for thread in others):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: nothing left to tell anyone
            pass
    os._exit(code)


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid` (Linux: read from /proc; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])  # "pid (comm) state ppid ...": comm may hold spaces
        except (OSError, ValueError):
            continue
        children.setdefault(parent, []).append(int(proc.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found
