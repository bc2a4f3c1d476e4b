"""Many users at once, as threads of one benchmark process: each one's outcome and time."""

from __future__ import annotations

import threading
import time
from typing import Callable


def at_once(
    work: Callable[[int], str], count: int, local: float, local_name: str, stagger: float = 0.0
) -> list[str]:
    """Run work(0), ..., work(count - 1) on threads, all at once, or each `stagger` seconds after the one before. For
    each: what it returned (or the error it raised), its seconds, and their ratio to `local`, the seconds of
    `local_name` in this process; with a stagger, also when it began and ended."""
    outcomes, began = [""] * count, time.perf_counter()

    def timed(index: int) -> None:
        time.sleep(index * stagger)
        started = time.perf_counter()
        try:
            outcome = work(index)
        except Exception as e:
            outcome = f"failed ({type(e).__name__}: {e})"
        seconds = time.perf_counter() - started
        outcomes[index] = f"{outcome} after {seconds:.1f} s, {seconds / local:.2f}x {local_name}"
        if stagger:
            outcomes[index] += f" (from {started - began:.1f} s to {started + seconds - began:.1f} s)"

    threads = [threading.Thread(target=timed, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes
