"""Start a DHT node and servers as real processes on 127.0.0.1, and stop them all: for the demo, benchmarks and tests."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from meadow.wire import MeadowError


def die_with_parent() -> None:
    """Linux: SIGTERM this child when the process that started it dies, even by SIGKILL, so no swarm outlives its owner."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


class ProcessFailed(RuntimeError):
    """A swarm process exited or did not become ready in time."""


class TooManyServers(MeadowError):
    """More servers asked for than the model has blocks to give them."""


def split_evenly(num_blocks: int, parts: int) -> list[str]:
    """`parts` spans "START:END" covering the blocks, as equal as they can be, none empty."""
    if not 1 <= parts <= num_blocks:
        raise TooManyServers(f"--servers {parts}: the model has {num_blocks} blocks, and each server needs one at "
                             "least")  # fmt: skip
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [f"{start}:{end}" for start, end in zip(bounds, bounds[1:])]


class Process:
    """A `meadow ...` child (or `program ...`) in its own process group; its output is kept and optionally echoed."""

    forked = False  # `meadow ...` forked from a process that has imported its libraries already (`warm_start`)

    def __init__(
        self, args: list[str], name: str, echo: bool = False, program: list[str] | None = None, env: dict | None = None
    ):
        self.name, self.lines, self.echo, self.leaving = name, [], echo, False
        # processes of one swarm share this machine's cores: OpenMP threads that spin-wait after their work (the
        # default) steal them from the next server of the chain; passive waiting keeps the handoff fair
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        # `python script.py ...` (a doctored server of the tests) is forked as well as `meadow ...`
        script = program[1] if program and len(program) > 1 and program[0] == sys.executable else None
        if self.forked and (program is None or script is not None and script.endswith(".py")):
            from meadow.warm_start import ForkedCommand

            self.popen = ForkedCommand([*(program or [])[2:], *args], env, script)
        else:
            self.popen = subprocess.Popen(
                [*(program or [sys.executable, "-m", "meadow"]), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # its own group, so stop() reaches the DHT and p2pd children too
                preexec_fn=die_with_parent,
                env=env,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.echo:
                print(f"[{self.name}] {line}", end="", flush=True)

    def wait_for(self, predicate, timeout: float, after: int = 0) -> str:
        """The first output line from line number `after` on that satisfies `predicate`, waiting for it to come."""
        deadline, seen = time.monotonic() + timeout, after
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                line = self.lines[seen]
                seen += 1
                if predicate(line):
                    return line
            if self.popen.poll() is not None and seen >= len(self.lines):
                self._reader.join(1.0)  # its last lines may not be read yet
                if seen >= len(self.lines):
                    break
            time.sleep(0.05)
        tail = "\n".join(self.lines[-30:])
        state = f"exited with {self.popen.returncode}" if self.popen.poll() is not None else "timed out"
        raise ProcessFailed(f"{self.name} {state}; last output:\n{tail}")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:  # it ended meanwhile
                pass

    def leave(self) -> None:
        """SIGTERM to the main process only, once (graceful: a server announces it is offline and stops its own DHT
        and p2pd children in order; a second signal would end them at once)."""
        if self.popen.poll() is None and not self.leaving:
            self.leaving = True
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """`leave()`, wait for it, then SIGKILL what is left."""
        self.leave()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # also reaps p2pd / DHT children left behind
        except ProcessLookupError:
            pass
        self.popen.wait()


class LocalSwarm:
    """A DHT node plus servers on 127.0.0.1. Use as a context manager; every process is stopped on exit."""

    def __init__(self, echo: bool = False):
        self.echo = echo
        self.dht: Process | None = None
        self.servers: list[Process] = []
        self.extra: list[Process] = []  # other processes to stop with the swarm (an API server, say)
        self.initial_peers: list[str] = []

    def start_dht(self, timeout: float = 60.0) -> list[str]:
        self.dht = Process(["dht", "--host", "127.0.0.1"], "dht", self.echo)
        maddr = self.dht.wait_for(lambda line: line.startswith("/ip4/"), timeout)
        self.initial_peers = [maddr.strip()]
        return self.initial_peers

    def start_server(
        self, model: str | Path, *args: str, wait: bool = True, timeout: float = 120.0, program: list[str] | None = None
    ) -> Process:
        """`meadow serve model ...` (or `program serve model ...`: tests start doctored servers so)."""
        name = f"server{len(self.servers)}"
        server = Process(["serve", str(model), "--initial-peers", *self.initial_peers, *args], name, self.echo, program)
        self.servers.append(server)
        if wait:
            server.wait_for(lambda line: "ready" in line, timeout)
        return server

    def stop(self) -> None:
        """All processes leave at once (each takes a moment to say so), the DHT node last: the others tell it.
        Interrupted (Ctrl-C pressed again meanwhile), it ends them all at once."""
        processes = [*self.extra, *self.servers, *([self.dht] if self.dht else [])]
        try:
            for process in [*self.extra, *self.servers]:
                process.leave()
            for process in processes:
                process.stop()
        except KeyboardInterrupt:
            for process in processes:
                process.signal(signal.SIGKILL)
            raise

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
