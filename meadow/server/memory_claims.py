"""Memory that servers on this machine have claimed and not yet taken. A server sizes its span by the free memory; two
started at once would each count all of it, and together take twice what there is. So each server claims, in a file of
MEADOW_HOME/memory-claims, what its span will take: the whole span while it loads, then its KV cache (taken only as
sessions come); a server sizing itself counts the free memory less the others' claims on its device. The claims are
read and written under a lock; a claim of a process that has ended is ignored and removed."""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import torch

from meadow.home import meadow_home


def device_name(device: torch.device) -> str:
    """The device as claims name it: "cpu", "cuda:0"..."""
    return f"cuda:{device.index or 0}" if device.type == "cuda" else device.type


def _started(pid: int) -> float | None:
    """When process `pid` started, or None if there is none (a claim's pid may have been reused since)."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class MemoryClaims:
    """This process's claim on `device`, among those of the other servers on this machine."""

    def __init__(self, device: torch.device, folder: Path | None = None):
        self.device, self.folder = device_name(device), folder or meadow_home() / "memory-claims"
        self.path = self.folder / f"{os.getpid()}.json"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the claims still: read the others' and set ours in one go."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def others(self) -> int:
        """Bytes the other live servers claim on this device (read under `locked`)."""
        total = 0
        for path in self.folder.glob("*.json"):
            if path == self.path:
                continue
            try:
                claim, pid = json.loads(path.read_text()), int(path.stem)
            except (OSError, ValueError):
                continue  # a claim being replaced, or no claim
            if _started(pid) != claim.get("started"):  # its process has ended
                path.unlink(missing_ok=True)
            elif claim.get("device") == self.device:
                total += int(claim.get("bytes", 0))
        return total

    def set(self, nbytes: int) -> None:
        """Claim `nbytes` (replacing this process's claim)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        claim = {"device": self.device, "bytes": int(nbytes), "started": _started(os.getpid())}
        written = self.path.with_suffix(".new")
        written.write_text(json.dumps(claim))
        written.replace(self.path)  # whole or not at all, for readers without the lock

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
