"""A `meadow` command forked from the zygote (`meadow.warm_start`: how the suite starts its processes) is what
`python -m meadow` would be: the same output and exit code, with the environment and working folder it was given, in
its own session; and it ends when the process that started it dies, whatever else that process forked meanwhile."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from meadow.warm_start import ForkedCommand
from test_stopping import HANG, group_members

PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDDafu3S7oDo7ALzd8SK8rosWJ1agT1jckbFPwxPUWBU7"  # never reached
COMMANDS = [
    ["--help"],
    ["serve", "no-such-model", "--initial-peers", PEER],  # the path in the error is absolute: the command's folder
    ["generate", "no-such-model"],  # with MEADOW_INITIAL_PEERS, which is not a multiaddr
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: " ".join(args))
def test_a_forked_command_says_and_exits_what_a_fresh_process_would(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "MEADOW_INITIAL_PEERS": "not-a-multiaddr"}
    fresh = subprocess.run([sys.executable, "-m", "meadow", *args], capture_output=True, text=True, env=env, timeout=60)
    forked = ForkedCommand(args, env)
    assert forked.wait(60) == fresh.returncode and forked.returncode == fresh.returncode
    output = forked.stdout.read()
    assert output == fresh.stdout + fresh.stderr and output, output
    said = {"--help": "usage", "serve": f"{tmp_path}/no-such-model does not exist", "generate": "MEADOW_INITIAL_PEERS"}
    assert said[args[0]] in output


def test_a_forked_command_leads_its_own_session_and_ends_with_the_process_that_started_it(tmp_path):
    """Its starter, SIGKILLed, cannot stop it: it ends because the zygote sees its starter gone and ends too. The
    starter had forked a child of its own (a DHT process does so), which lives on: it must not keep the zygote."""
    script = textwrap.dedent("""
        import os, time
        from meadow.local_swarm import Process
        Process.forked = True
        dht = Process(["dht", "--host", "127.0.0.1"], "dht")
        dht.wait_for(lambda line: line.startswith("/ip4/"), 60)
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
        print(dht.popen.pid, flush=True)
        time.sleep(600)
    """)
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        pid = int(starter.stdout.readline())
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid  # its own session, whose group it leads
        assert group_members(pid), "the DHT node's group is empty"
        starter.kill()
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline and group_members(pid):
            time.sleep(0.1)
        assert not group_members(pid), group_members(pid)
    finally:
        os.killpg(starter.pid, signal.SIGKILL)  # the starter's own child, and the zygote if it is still there
        starter.wait()


def test_a_zygote_that_died_is_replaced_and_its_commands_end_with_it():
    """Killed (out of memory, say), the zygote takes its commands with it, and the next command gets a new one."""
    from meadow import warm_start

    dht = ForkedCommand(["dht", "--host", "127.0.0.1"], dict(os.environ))
    assert dht.stdout.readline().startswith("/ip4/")
    zygote = warm_start._the_zygote()
    zygote.process.kill()
    zygote.process.wait()
    assert dht.wait(HANG) == -signal.SIGTERM  # what it got; the zygote could no longer tell how it ended
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline and group_members(dht.pid):
        time.sleep(0.1)
    assert not group_members(dht.pid), group_members(dht.pid)
    again = ForkedCommand(["--help"], dict(os.environ))
    assert again.wait(60) == 0 and "usage" in again.stdout.read()
    assert warm_start._the_zygote() is not zygote


def test_a_command_killed_holding_a_lock_does_not_hang_the_others(tmp_path):
    """A forked command that dies holding every multiprocessing lock it has (hivemind makes some as it is imported,
    and a DHT process can be killed or stopped while it holds one) does not hang the commands forked after it."""
    from meadow import warm_start

    script = tmp_path / "locks.py"  # "hold": take them all and die; "count": how many are held by another process
    script.write_text(textwrap.dedent("""
        import gc, multiprocessing.synchronize, os, signal, sys
        locks = [thing for thing in gc.get_objects() if isinstance(thing, multiprocessing.synchronize.SemLock)]
        if sys.argv[1] == "count":
            print(len(locks), sum(not lock.acquire(timeout=5) for lock in locks), flush=True)
        else:
            for lock in locks:
                lock.acquire()
            os.kill(os.getpid(), signal.SIGKILL)
    """))
    try:
        assert ForkedCommand(["hold"], dict(os.environ), script=str(script)).wait(60) == -signal.SIGKILL
        count = ForkedCommand(["count"], dict(os.environ), script=str(script))
        assert count.wait(60) == 0
        found, held = map(int, count.stdout.read().split()[-2:])
        assert found >= 4 and held == 0, f"{held} of the {found} locks of a command are held by one that died"
        dht = ForkedCommand(["dht", "--host", "127.0.0.1"], dict(os.environ))
        assert select.select([dht.stdout], [], [], 60)[0], "a DHT node forked next said nothing in 60 s"
        assert dht.stdout.readline().startswith("/ip4/")
    finally:  # the next test gets a zygote that no lock-holder has touched, whatever happened here
        zygote = warm_start._the_zygote()
        zygote.process.kill()
        zygote.process.wait()
