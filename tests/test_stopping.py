"""`meadow dht` and `meadow serve` stop for good, whichever way they are stopped: SIGINT or SIGTERM, sent to the main
process or to its whole process group (as `kill -- -PGID`, supervisors and systemd do). No process of the group
(hivemind's DHT process, the p2pd daemons) survives. A client's close() ends its own DHT process and p2pd. And a
node or server whose DHT process died says so and exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from meadow.client.model import AutoDistributedModelForCausalLM
from meadow.client.sequence import ClosedError
from meadow.local_swarm import LocalSwarm, Process
from meadow.stopping import descendants

HANG = 20.0  # seconds: a hang detector, not a speed requirement


def group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of process group `pgid`, as "pid command" lines."""
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces, so split after its ")"
            stat = (proc / "stat").read_text()
            state, _ppid, group = stat[stat.rindex(")") + 2 :].split()[:3]
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            members.append(f"{proc.name} {command}")
    return members


def assert_group_ends(process: Process, pgid: int) -> None:
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline and (process.popen.poll() is None or group_members(pgid)):
        time.sleep(0.1)
    assert process.popen.poll() is not None, "the main process still runs:\n" + "\n".join(process.lines[-20:])
    assert not group_members(pgid), group_members(pgid)


WAYS = [(sig, target) for sig in (signal.SIGINT, signal.SIGTERM) for target in ("main", "group")]


def start(command: str, initial_peers: list[str], model: Path, *extra: str) -> Process:
    if command == "dht":
        return Process(["dht", "--initial-peers", *initial_peers], "dht")
    args = ["serve", str(model), "--initial-peers", *initial_peers, "--blocks", "0:2", "--throughput", "100", *extra]
    return Process(args, "serve")


def wait_ready(process: Process) -> None:
    process.wait_for(lambda line: line.startswith("/ip4/") or "Server ready" in line, timeout=180)


@pytest.fixture(scope="module")
def started(checkpoints):
    """A bootstrap node, then a `meadow dht` and a `meadow serve` for each way of stopping (and for a burst of
    signals), all started at once."""
    model = checkpoints("llama", num_layers=2)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        ways = [*WAYS, ("burst", "main")]
        processes = {
            (command, *way): start(command, swarm.initial_peers, model) for command in ("dht", "serve") for way in ways
        }
        try:
            yield processes, swarm.initial_peers, model
        finally:
            for process in processes.values():
                process.stop(timeout=1)


@pytest.mark.parametrize("command", ["dht", "serve"])
@pytest.mark.parametrize("sig, target", WAYS, ids=[f"{signal.Signals(sig).name}-{target}" for sig, target in WAYS])
def test_every_process_ends_whichever_way_it_is_stopped(command, sig, target, started):
    process = started[0][(command, sig, target)]
    wait_ready(process)
    pgid = process.popen.pid  # Process starts a new session: the main process leads its group
    # the main process, hivemind's DHT process and its p2pd: each must go
    assert len(group_members(pgid)) >= 3, group_members(pgid)
    if target == "main":
        process.popen.send_signal(sig)
    else:
        os.killpg(pgid, sig)
    assert_group_ends(process, pgid)


@pytest.mark.parametrize("command", ["dht", "serve"])
def test_every_process_ends_when_stop_signals_come_in_a_burst(command, started):
    """Ctrl-C pressed again and again, or a supervisor's SIGTERM on top of a dying parent's: a signal that comes while
    the last one's handler runs must end the process at once, not deadlock it."""
    process = started[0][(command, "burst", "main")]
    wait_ready(process)
    pgid = process.popen.pid
    for sig in [signal.SIGTERM, signal.SIGINT] * 100:
        try:
            os.kill(pgid, sig)
        except ProcessLookupError:
            break
    assert_group_ends(process, pgid)


@pytest.mark.parametrize("command", ["dht", "serve"])
def test_every_process_ends_when_the_group_is_stopped_during_start_up(command, started):
    """The DHT process dies before it reports ready: the main process must not wait for it."""
    _, initial_peers, model = started
    process = start(command, initial_peers, model)
    pgid = process.popen.pid
    try:
        deadline = time.monotonic() + 3 * HANG
        while len(group_members(pgid)) < 3 and time.monotonic() < deadline:  # the DHT process and its p2pd exist
            time.sleep(0.01)
        os.killpg(pgid, signal.SIGTERM)
        assert_group_ends(process, pgid)
    finally:
        process.stop(timeout=1)


def test_closing_a_client_ends_its_dht_process_and_p2p_daemon(started):
    _, initial_peers, model_path = started
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers) as model:
        dht_process = model.sequence.dht.pid
        ours = {dht_process, *descendants(dht_process)}
        assert len(ours) >= 2 and ours <= set(descendants(os.getpid())), ours  # hivemind's DHT process and its p2pd
    deadline = time.monotonic() + HANG
    while ours & set(descendants(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not ours & set(descendants(os.getpid()))
    model.close()  # again: nothing to do
    with pytest.raises(ClosedError, match="closed"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    with pytest.raises(ClosedError, match="closed"):
        model(torch.tensor([[1, 2, 3]]))


def test_a_chats_dht_process_and_p2pd_miss_its_ctrl_c_and_end_with_it(started):
    """A terminal's Ctrl-C goes to the whole foreground process group: the chat takes it (to stop a reply), and its DHT
    process and p2pd, in a group of their own, never see it. Killed alone, the chat leaves nothing behind."""
    _, initial_peers, model_path = started
    chat = subprocess.Popen(
        [sys.executable, "-m", "meadow", "chat", str(model_path), "--initial-peers", *initial_peers],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def alive(pids: list[int]) -> list[int]:
        return [pid for pid in pids if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()]

    try:
        def apart(helpers: list[int]) -> bool:  # its DHT process and p2pd, moved to a group of their own
            try:
                return len(helpers) >= 2 and all(os.getpgid(pid) != chat.pid for pid in helpers)
            except ProcessLookupError:
                return False

        deadline = time.monotonic() + 180  # a forked DHT process leaves the group as it starts: a moment after fork
        while not apart(descendants(chat.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        helpers = descendants(chat.pid)
        assert len(helpers) >= 2 and all(os.getpgid(pid) != chat.pid for pid in helpers), helpers
        time.sleep(2)  # p2pd is up and serving
        os.killpg(chat.pid, signal.SIGINT)  # Ctrl-C
        time.sleep(2)
        assert alive(helpers) == helpers
        chat.kill()  # the chat alone, as `kill -9 PID` does
        chat.wait()
        deadline = time.monotonic() + HANG
        while alive(helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(helpers)
    finally:
        if chat.poll() is None:
            os.killpg(chat.pid, signal.SIGKILL)
        chat.wait()


# torch's file_system sharing strategy starts torch_shm_manager on a process's first shared tensor (hivemind's first
# DHT call); here every SIGTERM comes to a process whose handler ignores it, without pause, while that happens
SIGNALS_DURING_SHARED_MEMORY_START = """
import os, signal, subprocess, time
signal.signal(signal.SIGTERM, lambda *_: None)
from meadow.swarm.dht import start_shared_memory
pester = subprocess.Popen(["bash", "-c", f"while kill -TERM {os.getpid()} 2>/dev/null; do :; done"])
time.sleep(0.5)
start_shared_memory()
pester.kill()
print("started")
"""


def test_a_stop_signal_while_torch_starts_its_shared_memory_manager_is_handled_after_it():
    """A handled signal that interrupts that start made torch retry the same failed read forever (a process spinning
    at full CPU, which only SIGKILL ends: seen when a demo was stopped while its servers started). start_dht holds
    SIGINT and SIGTERM back until the manager is up. Meadow shares through file descriptors, which need no manager,
    unless told to use named files, as here."""
    environment = {**os.environ, "HIVEMIND_MEMORY_SHARING_STRATEGY": "file_system"}  # not Meadow's default
    result = subprocess.run([sys.executable, "-c", SIGNALS_DURING_SHARED_MEMORY_START], capture_output=True,
                            text=True, timeout=HANG, env=environment)  # fmt: skip
    assert result.returncode == 0 and result.stdout.split() == ["started"], result.stderr[-2000:]


def dht_process_of(pid: int) -> int:
    """The DHT process hivemind forked from `pid` (a child running Python, not its torch_shm_manager)."""
    found = [child.pid for child in psutil.Process(pid).children() if child.name().startswith("python")]
    assert len(found) == 1, f"not one DHT process under {pid}: {found}"
    return found[0]


@pytest.mark.parametrize("command", ["dht", "serve"])
def test_a_process_whose_dht_process_died_says_so_and_exits_with_its_group(command, started):
    """Its DHT process killed (out of memory, say), a node or server can no longer be found in the swarm: it says so
    and exits, rather than living on unseen."""
    _, initial_peers, model = started
    process = start(command, initial_peers, model, "--update-period", "1")
    try:
        wait_ready(process)
        os.kill(dht_process_of(process.popen.pid), signal.SIGKILL)
        assert process.popen.wait(HANG) == 1, "\n".join(process.lines[-20:])
        assert f"meadow {command}: error: the DHT process ended (exit code -9)" in process.lines[-1], process.lines[-5:]
        assert_group_ends(process, process.popen.pid)
    finally:
        process.stop(timeout=1)


@pytest.mark.parametrize("command", ["dht", "serve"])
def test_a_process_whose_dht_process_hangs_still_obeys_its_stop(command, started):
    """Its DHT process stopped (SIGSTOP: alive, but it never answers), a node or server still stops on SIGTERM, and its
    DHT process goes with it. The server had an announcement under way (every second), which never returns."""
    _, initial_peers, model = started
    process = start(command, initial_peers, model, "--update-period", "1")
    try:
        wait_ready(process)
        os.kill(dht_process_of(process.popen.pid), signal.SIGSTOP)
        time.sleep(2.5)  # an announcement begins meanwhile, and hangs
        process.popen.send_signal(signal.SIGTERM)
        assert process.popen.wait(HANG) == 0, "\n".join(process.lines[-20:])
        assert_group_ends(process, process.popen.pid)
    finally:
        process.stop(timeout=1)
