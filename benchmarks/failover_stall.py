"""How long generation stalls when a server of the chain dies, with a short and a long history to replay.

    python benchmarks/failover_stall.py [MODEL] [--history 16 512] [--mid-step] [--step-tokens K]

Servers: 0:half, half:end and a spare half:end, on 127.0.0.1. A session prefills `history` tokens, decodes a few
steps, then the server in use for half:end is SIGKILLed and the next step is timed: stall = that step - a normal
step. The replacement rebuilds its KV cache by replaying the history; compare with a prefill of the same length.
With --mid-step the server dies holding the step: it is stopped (SIGSTOP) just before the step goes out and
SIGKILLed 0.5 s later, and the stall counts from the kill. With --step-tokens K the steps timed carry K tokens (a
chat's next message, prefilled) instead of one.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import threading
import time

import torch

from meadow.bench import default_bench_model
from meadow.client.sequence import connect_sequence
from meadow.local_swarm import LocalSwarm
from meadow.models import load_config


MID_STEP_KILL_AFTER = 0.5


def one_run(model: str, history: int, mid_step: bool = False, step_tokens: int = 1) -> dict[str, float]:
    config = load_config(model)
    half, total = config.num_hidden_layers // 2, config.num_hidden_layers
    with LocalSwarm() as swarm:
        swarm.start_dht()
        servers = [swarm.start_server(model, "--blocks", span, wait=False) for span in (f"0:{half}", f"{half}:{total}", f"{half}:{total}")]
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=600)
        sequence = connect_sequence(model, config, swarm.initial_peers)
        generator = torch.Generator().manual_seed(0)
        length = history + 9 * step_tokens
        hidden = torch.randn(1, length, config.hidden_size, generator=generator)
        positions = torch.arange(length)[None]
        with sequence.inference_session(length, 1) as session:
            began = time.perf_counter()
            session.step(hidden[:, :history], positions[:, :history], None)
            prefill = time.perf_counter() - began
            steps = []
            for i in range(history, history + 8 * step_tokens, step_tokens):
                began = time.perf_counter()
                session.step(hidden[:, i : i + step_tokens], positions[:, i : i + step_tokens], None)
                steps.append(time.perf_counter() - began)
            victim = next(s.hop.peer for s in session.segments if s.hop.blocks.start == half)
            server = next(s for s in servers if victim.to_base58() in "\n".join(s.lines))
            if mid_step:
                server.signal(signal.SIGSTOP)
                threading.Timer(MID_STEP_KILL_AFTER, server.signal, (signal.SIGKILL,)).start()
            else:
                server.signal(signal.SIGKILL)
            i = history + 8 * step_tokens
            began = time.perf_counter()
            session.step(hidden[:, i : i + step_tokens], positions[:, i : i + step_tokens], None)
            after_kill = time.perf_counter() - began - (MID_STEP_KILL_AFTER if mid_step else 0.0)
        sequence.close()
    step = statistics.median(steps)
    return {"history": history, "prefill_s": prefill, "step_ms": step * 1000, "stall_s": after_kill - step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--history", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--mid-step", action="store_true", help="the server dies holding a step")
    parser.add_argument("--step-tokens", type=int, default=1, help="tokens per timed step (1: decoding)")
    args = parser.parse_args()
    model = str(args.model or default_bench_model())
    print(f"model {model}")
    print(f"| history (tokens) | prefill of history, s | {args.step_tokens}-token step, ms | stall after SIGKILL, s "
          "| stall / prefill |")  # fmt: skip
    print("|---|---|---|---|---|")
    for history in args.history:
        r = one_run(model, history, args.mid_step, args.step_tokens)
        print(f"| {history} | {r['prefill_s']:.3f} | {r['step_ms']:.1f} | {r['stall_s']:.3f} | {r['stall_s'] / r['prefill_s']:.2f} |")


if __name__ == "__main__":
    main()
