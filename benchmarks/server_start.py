"""How long `meadow serve` takes from spawn to its ready line, the CPU seconds it spends getting there, and how long
it takes to stop (SIGTERM to exit, as LocalSwarm and every test of a swarm stop it).

    PYTHONPATH=. python benchmarks/server_start.py [--rounds 5] [--models bench default]

Starts a DHT on 127.0.0.1, then, one at a time and the way LocalSwarm does, `meadow serve` of the bench model
(~100M random Llama, blocks 0:4) and of the default model (SmolLM2-135M-Instruct's GGUF, blocks 0:10), each
--rounds + 1 times. The first start of each fills caches (throughput, GGUF conversion, the page cache) and is
reported apart as "cold"; the others give the warm median and min-max. CPU seconds are user + system of the server's
own process and of its whole process group (its DHT child and p2pd daemons) when its ready line arrives. For
context, the time of a bare `python -c "import torch"` on the same machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from meadow.bench import default_bench_model
from meadow.local_swarm import LocalSwarm
from meadow.models.default import default_model_path

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system seconds of one process (its own threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of proc(5))


def group_cpu_seconds(sid: int) -> float:
    """user + system seconds of every live process of session `sid` (a server, its DHT process, p2pd)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    total += cpu_seconds(int(entry.name))
            except (OSError, ValueError):
                pass  # it exited meanwhile
    return total


def one_start(swarm: LocalSwarm, model: str, blocks: str) -> tuple[float, float, float, float]:
    """(seconds from spawn to the ready line, CPU seconds of the server process, of its process group, seconds from
    SIGTERM to its exit)."""
    began = time.perf_counter()
    server = swarm.start_server(model, "--blocks", blocks, wait=False)
    pid = server.popen.pid
    while not any("Server ready" in line for line in server.lines):
        if server.popen.poll() is not None:
            raise RuntimeError("the server exited:\n" + "\n".join(server.lines[-30:]))
        time.sleep(0.01)  # 10 ms resolution; a tighter poll would take CPU from the server it times
    elapsed = time.perf_counter() - began
    own, group = cpu_seconds(pid), group_cpu_seconds(pid)
    began = time.perf_counter()
    server.stop()
    stopped = time.perf_counter() - began
    swarm.servers.remove(server)
    return elapsed, own, group, stopped


def import_torch_seconds(rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - began)
    return times


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):5.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="warm starts per model (after one cold start)")
    parser.add_argument("--models", nargs="+", default=["bench", "default"], choices=["bench", "default"])
    args = parser.parse_args()
    models = {"bench": (str(default_bench_model()), "0:4"), "default": (str(default_model_path()), "0:10")}

    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    print(f"{'model':8} {'blocks':6} | {'cold s':>6} | {'warm s: median (min-max)':>26} | "
          f"{'CPU s, server':>20} | {'CPU s, process group':>20} | {'stop s':>17}")  # fmt: skip
    with LocalSwarm() as swarm:
        swarm.start_dht()
        for name in args.models:
            model, blocks = models[name]
            cold, *warm = [one_start(swarm, model, blocks) for _ in range(args.rounds + 1)]
            elapsed, own, group, stopped = (list(column) for column in zip(*warm))
            print(f"{name:8} {blocks:6} | {cold[0]:6.2f} | {summary(elapsed):>26} | {summary(own):>20} | "
                  f"{summary(group):>20} | {summary(stopped):>17}", flush=True)  # fmt: skip
    print(f"python -c 'import torch': {summary(import_torch_seconds(args.rounds))} s")


if __name__ == "__main__":
    main()
