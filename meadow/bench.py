"""`meadow bench`: the same model run locally (transformers) and through a loopback swarm, side by side. With
--quant, the servers' blocks and the local model's blocks are quantized alike; --wire sets how hidden states travel."""

from __future__ import annotations

import copy
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from meadow.home import meadow_home
from meadow.local_swarm import LocalSwarm, Process, split_evenly
from meadow.models import load_config, load_reference_model
from meadow.models.packed import pack_block
from meadow.models.quant import quantize_block
from meadow.models.registry import family_of
from meadow.wire import default_wire

BENCH_MODEL_DIR = meadow_home() / "bench-llama-100m"
PREFILL_BATCH, PREFILL_LENGTH = 8, 128
GENERATION_ROUNDS = 5  # swarm and local generation, timed one after the other this many times: medians are printed


def default_bench_model() -> Path:
    """A ~100M-parameter Llama-shaped random checkpoint (8 blocks of hidden 768, vocab 32000)."""
    if not (BENCH_MODEL_DIR / "config.json").exists():
        from meadow.models.tiny import make_tiny_checkpoint

        print(f"Creating a ~100M-parameter random Llama checkpoint in {BENCH_MODEL_DIR}")
        # in a child process, so that this process's peak memory (reported as the client's) stays the client's
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(make_tiny_checkpoint, BENCH_MODEL_DIR, "llama", num_layers=8, hidden_size=768,
                        intermediate_size=2048, num_heads=12, num_kv_heads=4, vocab_size=32000, seed=0).result()  # fmt: skip
    return BENCH_MODEL_DIR


def peak_rss_mib(pid: int | None = None, field: str = "VmHWM") -> float:
    """Peak resident memory of a process (VmHWM; field="VmRSS": resident now), in MiB."""
    if pid is None and field == "VmHWM":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of processes and all their descendants so far, in seconds; Linux (/proc) only.
    Unlike wall time, it barely moves when other programs share the machine."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # it exited meanwhile
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (name) "
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    total, stack = 0, list(pids)
    while stack:
        pid = stack.pop()
        total += stats.get(pid, (0, 0))[1]
        stack += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def timed(fn, repeats: int = 1, warm_up: bool = True) -> float:
    """Mean seconds of `repeats` calls (0: only the warm-up is run, and 0.0 returned)."""
    if warm_up:
        fn()
    synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - began) / repeats if repeats else 0.0


def synchronize() -> None:
    """Wait for the GPU's queued work (a local model's forward returns before it is done), if a GPU was used."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def generation_seconds(model, new_tokens: int, vocab_size: int, repeats: int = 3, warm_up: bool = True) -> float:
    """Seconds to generate `new_tokens` greedy tokens after a 16-token prompt: mean of `repeats` (see timed)."""
    prompt = torch.randint(0, vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(model.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        return timed(lambda: model.generate(prompt, **kwargs), repeats, warm_up)


def measure(
    model, new_tokens: int, vocab_size: int, generated: Callable[[], None] = lambda: None, timed_generation: bool = True
) -> dict[str, float]:
    """Generation tokens/s, prefill and training-step seconds; `generated` is called after the generations. Without
    `timed_generation`, one generation is run (for `generated`) and not timed: the caller times generation itself."""
    prefill = torch.randint(0, vocab_size, (PREFILL_BATCH, PREFILL_LENGTH), generator=torch.Generator().manual_seed(1))
    prefill = prefill.to(model.device)  # a local model on a GPU takes its inputs there
    generate_time = generation_seconds(model, new_tokens, vocab_size, repeats=3 if timed_generation else 0)
    generated()
    with torch.no_grad():
        prefill_time = timed(lambda: model(prefill), repeats=3)
    model.requires_grad_(False)  # frozen weights, as on the servers; the gradient flows to the input embeddings

    def train_step() -> None:
        embeds = model.get_input_embeddings()(prefill).detach().requires_grad_()
        model(inputs_embeds=embeds, labels=prefill).loss.backward()

    tokens_per_s = {"tokens_per_s": new_tokens / generate_time} if timed_generation else {}
    return {**tokens_per_s, "prefill_s": prefill_time, "train_s": timed(train_step, repeats=3)}


def wire_label(wire: str | None, dtype: str) -> str:
    return wire or f"{default_wire(dtype)} (the servers' dtype)"


def start_spans(swarm: LocalSwarm, model: str, spans: list[str], *args: str) -> list[Process]:
    """One server per span ("START:END"), started at once; returns them when all are ready."""
    servers = [swarm.start_server(model, "--blocks", span, *args, wait=False) for span in spans]
    for server in servers:
        server.wait_for(lambda line: "ready" in line, timeout=600)
    return servers


def bench(
    model: str | None, num_servers: int, new_tokens: int, dtype: str, device: str, quant: str = "none",
    wire: str | None = None, local: bool = True,
) -> dict:
    """The swarm's figures (and, if `local`, the same quantized model's run in-process): tokens/s, prefill and
    training seconds, and peak memory of the client and of each server (after the generations, and at the end)."""
    from meadow.client.config import ClientConfig
    from meadow.client.model import AutoDistributedModelForCausalLM

    model = str(model or default_bench_model())
    config = load_config(model)
    blocks = config.num_hidden_layers
    spans = split_evenly(blocks, num_servers)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        servers = start_spans(swarm, model, spans, "--dtype", dtype, "--device", device, "--quant", quant)
        distributed = AutoDistributedModelForCausalLM.from_pretrained(
            model, swarm.initial_peers, client_config=ClientConfig(wire=wire)
        )
        generation_peaks, generation_rss = [], []

        def generated() -> None:
            generation_peaks.extend(peak_rss_mib(server.popen.pid) for server in servers)
            generation_rss.extend(peak_rss_mib(server.popen.pid, "VmRSS") for server in servers)

        # with `local`, generation is timed in rounds below, against the local model's, and only run once here
        remote = measure(distributed, new_tokens, config.vocab_size, generated, timed_generation=not local)
        client_peak = peak_rss_mib()
        server_peaks = [peak_rss_mib(server.popen.pid) for server in servers]
        figures = dict(
            model=model, blocks=blocks, spans=spans, remote=remote, client_peak=client_peak, server_peaks=server_peaks,
            generation_peaks=generation_peaks, generation_rss=generation_rss,
        )  # fmt: skip
        if local:
            local_model = load_reference_model(model, dtype=getattr(torch, dtype))
            params = sum(p.numel() for p in local_model.parameters()) / 1e6
            layers = local_model.get_submodule(family_of(config).layer_module_prefix(0).removesuffix(".0."))
            for layer in layers:  # the same quantized (or packed) blocks as the servers'; embeddings and head as is
                pack_block(quantize_block(layer, quant, device))
            local_model.to(device)
            local_figures = measure(local_model, new_tokens, config.vocab_size, timed_generation=False)
            figures.update(local=local_figures, params=params)
            # generation, in rounds that time the swarm and the local model one after the other: a slow spell of the
            # machine (the local run alone has varied 37-51 tokens/s between runs here) then slows both alike
            both = (distributed, local_model)  # each warmed up by measure()
            rounds = [
                [generation_seconds(m, new_tokens, config.vocab_size, repeats=1, warm_up=False) for m in both]
                for _ in range(GENERATION_ROUNDS)
            ]  # fmt: skip
            remote["tokens_per_s"] = new_tokens / statistics.median(swarm for swarm, _ in rounds)
            figures["local"]["tokens_per_s"] = new_tokens / statistics.median(alone for _, alone in rounds)
            figures["generation_ratios"] = sorted(alone / swarm for swarm, alone in rounds)
        distributed.sequence.close()
    return figures


def run_bench(
    model: str | None, num_servers: int, new_tokens: int, dtype: str, device: str, quant: str = "none",
    wire: str | None = None,
) -> None:
    figures = bench(model, num_servers, new_tokens, dtype, device, quant, wire)
    model, blocks, spans, params = figures["model"], figures["blocks"], figures["spans"], figures["params"]
    local, remote = figures["local"], figures["remote"]
    client_peak, server_peaks = figures["client_peak"], figures["server_peaks"]
    local_step, remote_step = 1 / local["tokens_per_s"], 1 / remote["tokens_per_s"]
    print(f"\nmodel {model} ({params:.0f}M parameters, {blocks} blocks), {dtype} on {device}, quant {quant}, "
          f"wire {wire_label(wire, dtype)}, "
          f"{num_servers} servers (spans {', '.join(spans)})")  # fmt: skip
    print("| measure | local | swarm | swarm/local |")
    print("|---|---|---|---|")
    ratios = figures["generation_ratios"]
    print(f"| generation, tokens/s (batch 1, {new_tokens} new; medians of {len(ratios)} rounds, ratio's range) "
          f"| {local['tokens_per_s']:.1f} | {remote['tokens_per_s']:.1f} "
          f"| {statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}) |")  # fmt: skip
    print(f"| prefill {PREFILL_BATCH}x{PREFILL_LENGTH}, s | {local['prefill_s']:.3f} | {remote['prefill_s']:.3f} "
          f"| {remote['prefill_s'] / local['prefill_s']:.2f}x |")  # fmt: skip
    print(f"| training step {PREFILL_BATCH}x{PREFILL_LENGTH} (forward + backward), s | {local['train_s']:.3f} "
          f"| {remote['train_s']:.3f} | {remote['train_s'] / local['train_s']:.2f}x |")  # fmt: skip
    print(f"per-hop overhead per generated token: {(remote_step - local_step) / num_servers * 1000:.2f} ms "
          f"({num_servers} hops; (swarm - local) time per token / hops)")  # fmt: skip
    print(f"peak memory: client {client_peak:.0f} MiB (holds embeddings and head, no blocks); servers "
          + ", ".join(f"{peak:.0f} MiB" for peak in server_peaks))


CLIENT_PROMPT_LENGTH = 16


def client_worker(
    model: str, initial_peers: list[str], index: int, new_tokens: int, commands, results, wire: str | None = None
) -> None:
    """One client process of `run_clients_bench`: joins the swarm, then for every start time it is sent, generates
    `new_tokens` greedy tokens from its own prompt at that time and reports (start, end)."""
    from meadow.client.config import ClientConfig
    from meadow.client.model import AutoDistributedModelForCausalLM

    try:
        config = ClientConfig(wire=wire)
        distributed = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers, client_config=config)
    except BaseException as e:
        results.put(("failed", repr(e)))
        raise
    vocab_size = distributed.config.vocab_size
    prompt = torch.randint(0, vocab_size, (1, CLIENT_PROMPT_LENGTH), generator=torch.Generator().manual_seed(100 + index))
    # no end-of-sequence token, so every client generates exactly new_tokens tokens without transformers' min-length
    # processors (a full pass over the vocabulary each step: client CPU that real chats do not spend)
    # (every setting in the config: transformers warns when a config and separate arguments come together). Not in
    # the model's own config either: generate fills a passed config's unset values from it (a random model with a
    # small vocabulary drew its end-of-sequence token within 32 tokens, and its client stopped early)
    distributed.generation_config.eos_token_id = None

    def greedy(tokens: int):
        config = copy.deepcopy(distributed.generation_config)
        config.eos_token_id, config.max_new_tokens, config.do_sample = None, tokens, False
        return config

    measured = greedy(new_tokens)  # made once, outside the timed generations
    with torch.no_grad():
        distributed.generate(prompt, generation_config=greedy(4))  # warm-up: routes, pings
        results.put(("ready", index))
        while (start_at := commands.get()) is not None:
            time.sleep(max(0.0, start_at - time.time()))
            began = time.time()
            tokens = distributed.generate(prompt, generation_config=measured).shape[1] - CLIENT_PROMPT_LENGTH
            if tokens != new_tokens:
                results.put(("failed", f"generated {tokens} tokens, not {new_tokens}"))
                break
            results.put((began, time.time()))
    distributed.sequence.close()


def wait_until_idle(pids: list[int], timeout: float = 60.0, window: float = 0.5, busy: float = 0.2) -> None:
    """Wait until processes and their descendants use less than `busy` of a core over `window` seconds (at most
    `timeout`). Clients that have just said they are ready still work a moment (16 of them kept both cores busy for
    ~2 s, their DHT processes settling in the swarm), and the first runs would time that too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        began = cpu_seconds(pids)
        time.sleep(window)
        if cpu_seconds(pids) - began < busy * window:
            return


def run_clients_bench(
    model: str | None, num_servers: int, clients: list[int], new_tokens: int, dtype: str, device: str, repeats: int = 3,
    wire: str | None = None,
) -> None:
    """N client processes generate at the same time through one swarm, for each N in `clients`: the aggregate and
    per-client tokens/s, and the efficiency aggregate / (N x one client alone)."""
    model = str(model or default_bench_model())
    config = load_config(model)
    blocks = config.num_hidden_layers
    spans = split_evenly(blocks, num_servers)
    clients = sorted(set(clients) | {1})
    # client processes are forked from one that has imported the client once: spawned, each imported torch and
    # hivemind itself (16 clients were ready after 71 s here, forked after 13 s)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["meadow.bench", "meadow.client.model"])
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as for servers: clients that share cores must not spin
    multiprocessing.forkserver.ensure_running()  # now: its imports overlap the swarm's start (the DHT's uses one core)
    rows = []
    with LocalSwarm() as swarm:
        swarm.start_dht()
        servers = start_spans(swarm, model, spans, "--dtype", dtype, "--device", device)
        results = context.Queue()
        workers = []
        for index in range(max(clients)):
            commands = context.Queue()
            process = context.Process(
                target=client_worker, args=(model, swarm.initial_peers, index, new_tokens, commands, results, wire)
            )  # not a daemon: a client starts its own DHT process
            process.start()
            workers.append((process, commands))
        progress = tqdm(total=len(workers), desc="client processes ready", unit="client")
        try:
            for _ in workers:
                state, detail = results.get(timeout=600)
                if state != "ready":
                    raise RuntimeError(f"a client process failed: {detail}")
                progress.update()
            progress.close()
            wait_until_idle([process.pid for process, _ in workers])
            progress = tqdm(total=len(clients) * repeats, desc="runs", unit="run")
            for n in clients:
                runs = []
                for _ in range(repeats):
                    progress.set_postfix_str(f"{n} clients")
                    cpu = [cpu_seconds([server.popen.pid for server in servers]), cpu_seconds([p.pid for p, _ in workers])]
                    start_at = time.time() + 0.5
                    for _, commands in workers[:n]:
                        commands.put(start_at)
                    timings = [results.get(timeout=600) for _ in range(n)]  # (start, end) of each client
                    if failed := [detail for state, detail in timings if state == "failed"]:
                        raise RuntimeError(f"a client process failed: {failed[0]}")
                    wall = max(end for _, end in timings) - start_at
                    cpu[0] = cpu_seconds([server.popen.pid for server in servers]) - cpu[0]
                    cpu[1] = cpu_seconds([p.pid for p, _ in workers]) - cpu[1]
                    per_token = [seconds * 1000 / (n * new_tokens) for seconds in cpu]
                    per_client = [new_tokens / (end - start_at) for _, end in timings]
                    runs.append((n * new_tokens / wall, per_client, per_token))
                    progress.update()
                aggregate, per_client, per_token = sorted(runs)[len(runs) // 2]  # the median run
                rows.append((n, aggregate, per_client, per_token))
        finally:
            progress.close()
            for process, commands in workers:
                commands.put(None)
            for process, _ in workers:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()

    alone = rows[0][1]
    load = os.getloadavg()[0]
    print(f"\nmodel {model} ({blocks} blocks), {dtype} on {device}, quant none, wire {wire_label(wire, dtype)}, "
          f"{num_servers} servers "
          f"(spans {', '.join(spans)}); each client generates {new_tokens} "
          f"greedy tokens after a {CLIENT_PROMPT_LENGTH}-token prompt, all at once; median of {repeats} runs; "
          f"{os.cpu_count()} cores, load average {load:.1f} at the end")  # fmt: skip
    print("| clients | aggregate tokens/s | per client tokens/s (mean, min-max) | efficiency | CPU ms/token: servers "
          "| clients |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for n, aggregate, per_client, (servers_cpu, clients_cpu) in rows:
        print(f"| {n} | {aggregate:.1f} | {sum(per_client) / n:.1f} ({min(per_client):.1f}-{max(per_client):.1f}) "
              f"| {aggregate / (n * alone):.2f} | {servers_cpu:.1f} | {clients_cpu:.1f} |")  # fmt: skip
    print("efficiency: aggregate / (clients x one client alone). CPU ms/token: CPU time of the server processes "
          "(and of the client processes) per generated token, which other programs on the machine barely change")


PARAGRAPH = (
    "The meadow behind the old mill was quiet in the early morning. Mist lay over the grass, and a narrow stream ran "
    "along the fence toward the village. Every spring the farmers gathered there to mend the stone walls, share bread "
    "and cheese, and talk about the weather, the prices at the market and the children who had moved to the city."
)
SPECULATIVE_TASKS = {
    "repetitive": f"Repeat this paragraph word for word, but write 'river' instead of 'stream':\n\n{PARAGRAPH}",
    "free text": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def speculative_run(model, prompt: torch.Tensor, new_tokens: int, lookup: int | None, repeats: int = 2) -> dict:
    """Greedy generation of up to `new_tokens` after `prompt`, with prompt lookup drafting `lookup` tokens (None: plain
    decoding); best of `repeats` timed runs after a warm-up. Tokens/s, and for a Meadow model the share of drafted
    tokens that the swarm accepted."""
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, prompt_lookup_num_tokens=lookup)
    best, stats = float("inf"), None
    for attempt in range(repeats + 1):
        with torch.no_grad():
            if hasattr(model, "inference_session"):
                with model.inference_session(prompt.shape[1] + new_tokens + (lookup or 0)) as session:
                    began = time.perf_counter()
                    output = model.generate(prompt, **kwargs)
                    took = time.perf_counter() - began
                stats = session
            else:
                began = time.perf_counter()
                output = model.generate(prompt, **kwargs)
                took = time.perf_counter() - began
        if attempt:  # the first run warms up
            best = min(best, took)
    generated = output.shape[1] - prompt.shape[1]
    result = {"tokens": generated, "tokens_per_s": generated / best, "output": output}
    if stats is not None and lookup:
        accepted = generated - stats.steps  # every step gives one token of its own, and the drafts it accepted
        result["acceptance"] = accepted / max(1, accepted + stats.dropped)
    return result


def run_speculative_bench(model: str | None, num_servers: int, lookup: int, new_tokens: int, dtype: str, device: str) -> None:
    """Greedy generation with and without speculative decoding (prompt lookup drafting `lookup` tokens) through a
    loopback swarm and locally, on a task that repeats its prompt and on free text."""
    from meadow.client.model import AutoDistributedModelForCausalLM
    from meadow.models import default_model_path, load_tokenizer

    model = str(model or default_model_path())
    config = load_config(model)
    blocks = config.num_hidden_layers
    spans = split_evenly(blocks, num_servers)
    tokenizer = load_tokenizer(model)
    prompts = {}
    for task, text in SPECULATIVE_TASKS.items():
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        prompts[task] = torch.tensor([ids])
    results = {}
    with LocalSwarm() as swarm:
        swarm.start_dht()
        start_spans(swarm, model, spans, "--dtype", dtype, "--device", device)
        with AutoDistributedModelForCausalLM.from_pretrained(model, swarm.initial_peers, dtype=getattr(torch, dtype)) as distributed:
            for task, prompt in prompts.items():
                for mode in (None, lookup):
                    results["swarm", task, mode] = speculative_run(distributed, prompt, new_tokens, mode)
    local_model = load_reference_model(model, dtype=getattr(torch, dtype)).to(device)
    for task, prompt in prompts.items():
        for mode in (None, lookup):
            results["local", task, mode] = speculative_run(local_model, prompt, new_tokens, mode)

    print(f"\nmodel {model} ({blocks} blocks), {dtype} on {device}, {num_servers} servers "
          f"(spans {', '.join(spans)}); greedy, up to {new_tokens} new tokens; "
          f"prompt lookup drafts {lookup} tokens; best of 2 runs; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| task | where | tokens | plain tokens/s | speculative tokens/s | speed-up | acceptance | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for task in prompts:
        for where in ("swarm", "local"):
            plain, fast = results[where, task, None], results[where, task, lookup]
            same = torch.equal(plain["output"], fast["output"]) and torch.equal(plain["output"], results["local", task, None]["output"])
            acceptance = f"{fast['acceptance']:.0%}" if "acceptance" in fast else "-"
            print(f"| {task} | {where} | {plain['tokens']} | {plain['tokens_per_s']:.1f} | {fast['tokens_per_s']:.1f} "
                  f"| {fast['tokens_per_s'] / plain['tokens_per_s']:.2f}x | {acceptance} | {'yes' if same else 'NO'} |")  # fmt: skip
    print("acceptance: drafted tokens the swarm accepted; same tokens: speculative output equals plain greedy and local")
