"""Start `meadow` commands as children forked from a process that has already imported what they need.

A fresh `python -m meadow serve` spends 2-3 s of CPU importing torch, hivemind and transformers before it does any
work; the test suite starts hundreds of servers, clients and API servers, and on two cores those imports are a large
share of its time. Here they happen once, in a zygote: a single-threaded process that imports them and then forks a
child per command, which runs the command exactly as `python -m meadow ARGS` would and exits as Python does.

A child is what `subprocess.Popen([python, "-m", "meadow", *args], start_new_session=True)` gives, but for its
command line as `ps` shows it (the zygote's): its own session and process group, the environment and working folder
it was given, its output (stdout and stderr together) on a pipe, and its exit code, which the zygote reports.

Python's `multiprocessing` fork server does much of this, but it runs the parent's main script again in the child and
wraps the exit; a command must start as a fresh `meadow` process does. So a child also gets multiprocessing locks of
its own for those that hivemind makes as it is imported: forked, they would be shared by every command, and one command
killed while holding one (a DHT process stopped in the middle of a reply, say) would hang all the others.
"""

from __future__ import annotations

import json
import multiprocessing.synchronize
import os
import queue
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading

# what the commands import before they work (the zygote imports them once; a child imports only what is left)
PRELOAD = ["meadow.cli", "meadow.server.server", "meadow.server.handler", "meadow.swarm", "meadow.points.service",
           "meadow.client.model", "meadow.client.text", "meadow.client.chat", "meadow.api.serve"]  # fmt: skip
MESSAGE_BYTES = 1 << 20


class _Zygote:
    """The parent's end: one zygote per process, started when the first command is."""

    def __init__(self):
        self.socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # libraries read some variables as they load, so in the zygote: OpenMP's threads must wait passively, as
        # in every process of a local swarm (see `local_swarm.Process`)
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "meadow.warm_start", str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self.owner = os.getpid()
        self.lock, self.started = threading.Lock(), queue.Queue()
        self.exit_codes: dict[int, int] = {}
        self.exited = threading.Condition()
        self.gone = False
        threading.Thread(target=self._receive, daemon=True, name="zygote").start()

    def start(self, args: list[str], env: dict[str, str], output: int, script: str | None) -> int:
        """Fork `meadow *args` (or `python script *args`) with `output` as its stdout and stderr; its pid."""
        request = json.dumps({"args": args, "env": env, "cwd": os.getcwd(), "script": script}).encode()
        with self.lock:
            if self.gone:
                raise RuntimeError("the zygote that starts meadow commands has exited")
            socket.send_fds(self.socket, [request], [output])
            pid = self.started.get()
        if pid is None:
            raise RuntimeError("the zygote that starts meadow commands has exited")
        return pid

    def _receive(self) -> None:
        while message := self.socket.recv(MESSAGE_BYTES):
            message = json.loads(message)
            with self.exited:
                if "started" in message:
                    # a pid is used again once its process has been reaped: an old exit code must not pass for the
                    # new process's (the zygote reports an exit before it can fork again with that pid)
                    self.exit_codes.pop(message["started"], None)
                    self.started.put(message["started"])
                else:
                    self.exit_codes[message["exited"]] = message["code"]
                    self.exited.notify_all()
        with self.exited:
            self.gone = True
            self.started.put(None)
            self.exited.notify_all()

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        with self.exited:
            self.exited.wait_for(lambda: pid in self.exit_codes or self.gone, timeout)
            # the zygote's children die with it (SIGTERM): the code of one it could no longer report
            return self.exit_codes.get(pid, -signal.SIGTERM if self.gone else None)


_zygote: _Zygote | None = None
_zygote_lock = threading.Lock()


def _forget_zygote() -> None:
    """In a process forked from one with a zygote (a DHT process, say): the zygote ends when its parent does, as it
    reads the end of its control socket, so no other process may hold that socket open."""
    global _zygote
    if _zygote is not None:
        _zygote.socket.close()
        _zygote = None


os.register_at_fork(after_in_child=_forget_zygote)


def _the_zygote() -> _Zygote:
    global _zygote
    with _zygote_lock:
        if _zygote is None or _zygote.owner != os.getpid() or _zygote.gone:  # none yet, not ours, or it died
            _zygote = _Zygote()
        return _zygote


class ForkedCommand:
    """`meadow *args` (or `python script *args`) forked from the zygote, with the part of `subprocess.Popen`'s
    interface that `local_swarm.Process` and tests use: pid, stdout (text), poll, wait, send_signal, returncode."""

    def __init__(self, args: list[str], env: dict[str, str], script: str | None = None):
        self.args, self.returncode, self._zygote = args, None, _the_zygote()
        reader, writer = os.pipe()
        self.stdout = open(reader, encoding="utf-8", errors="replace")
        try:
            self.pid = self._zygote.start(args, env, writer, script)
        except BaseException:
            self.stdout.close()
            raise
        finally:
            os.close(writer)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid, timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(["meadow", *self.args], timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


def _serve_forks(control: socket.socket) -> dict:
    """The zygote's loop: fork a child per request and report each child's exit. Returns only in a child, with its
    request; ends the zygote when its parent has gone (the control socket closes)."""
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)  # a child's exit wakes the select below
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is for the commands, not for us
    while True:
        ready, _, _ = select.select([control, wakeup_read], [], [])
        if wakeup_read in ready:
            os.read(wakeup_read, 4096)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                control.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
        if control in ready:
            message, fds, _, _ = socket.recv_fds(control, MESSAGE_BYTES, 1)
            if not message:
                sys.exit(0)  # the parent has gone; our children die with us
            pid = os.fork()
            if pid == 0:
                for fd in (wakeup_read, wakeup_write):
                    os.close(fd)
                control.close()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own: KeyboardInterrupt
                for fd in (1, 2):
                    os.dup2(fds[0], fd)
                os.close(fds[0])
                return json.loads(message)
            os.close(fds[0])
            control.send(json.dumps({"started": pid}).encode())


def _own_locks() -> None:
    """In a forked child: new multiprocessing locks in place of those hivemind made at import (MPFuture's, say),
    which the zygote's children would otherwise all share (see the module's docstring). Found by type, not by name,
    so that a lock a later hivemind adds is not missed."""
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] != "hivemind":
            continue
        classes = [thing for thing in vars(module).values() if isinstance(thing, type) and thing.__module__ == name]
        for holder in [module, *classes]:
            for attribute, value in list(vars(holder).items()):
                if isinstance(value, multiprocessing.synchronize.Lock):
                    setattr(holder, attribute, multiprocessing.Lock())


def _run_command(request: dict) -> None:
    """In a forked child: become what a new `meadow` (or `python script`) process would be, then run it."""
    from meadow.cli import command_line
    from meadow.local_swarm import die_with_parent

    os.setsid()
    die_with_parent()  # the zygote, which ends when the process that asked for this command does
    _own_locks()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["script"] is None:
        sys.argv = ["meadow", *request["args"]]
        command_line()
    else:
        sys.argv = [request["script"], *request["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))  # as `python script` has it
        runpy.run_path(request["script"], run_name="__main__")


if __name__ == "__main__":
    for module in PRELOAD:
        __import__(module)
    # a child runs its command here, at the top level, so it exits as any Python program does
    _run_command(_serve_forks(socket.socket(fileno=int(sys.argv[1]))))
