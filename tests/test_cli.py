"""The command line as a person uses it: `meadow dht`, `meadow serve --num-blocks` (or no span), `meadow generate`."""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import hivemind
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_on_loopback_with_upnp_off, p2p_daemons
from meadow.cli import build_parser, main
from meadow.client.sequence import connect_sequence
from meadow.local_swarm import LocalSwarm
from meadow.server.sizing import block_bytes
from meadow.models import load_config
from meadow.swarm import dht as dht_module
from meadow.swarm import dht_prefix_for, fetch_servers, start_dht
from meadow.swarm.dht import JoinFailed


@pytest.fixture(scope="module")
def swarm_by_num_blocks(checkpoints):
    path = checkpoints("llama", num_layers=6)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        # one after the other, so that each sees the previous announcement
        for _ in range(3):
            swarm.start_server(path, "--num-blocks", "2")
        yield swarm, path


def test_dht_prints_a_full_loopback_multiaddr(swarm_by_num_blocks):
    swarm, _ = swarm_by_num_blocks
    (maddr,) = swarm.initial_peers
    assert maddr.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/Qm" in maddr  # an RSA peer id (see swarm/identity.py)


@pytest.mark.timeout(60)
def test_a_dht_process_that_never_gets_ready_is_killed_and_the_join_fails(swarm_by_num_blocks, monkeypatch):
    """hivemind waits for its DHT process to be ready without a timeout. One that never is (stopped here with SIGSTOP
    as soon as it exists) is killed after READY_TIMEOUT, and JoinFailed says so."""
    monkeypatch.setattr(dht_module, "READY_TIMEOUT", 2.0)
    before, stopped, done = {p.pid for p in multiprocessing.active_children()}, [], threading.Event()

    def stop_the_new_one() -> None:
        while not done.is_set() and not stopped:
            for process in multiprocessing.active_children():
                if isinstance(process, hivemind.DHT) and process.pid not in before:
                    os.kill(process.pid, signal.SIGSTOP)
                    stopped.append(process)
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_the_new_one, daemon=True)
    watcher.start()
    try:
        with pytest.raises(JoinFailed, match="not ready within 2 s"):
            start_dht(swarm_by_num_blocks[0].initial_peers, client_mode=True)
    finally:
        done.set()
        watcher.join()
    (process,) = stopped
    process.join(timeout=10)
    assert process.exitcode == -signal.SIGKILL


class Garbage:
    """An object in a reference cycle whose finalizer notes the process that ran it."""

    def __init__(self, notes: Path):
        self.notes, self.cycle = notes, self

    def __del__(self):
        with open(self.notes, "a") as notes:
            notes.write(f"{os.getpid()}\n")


async def collect_garbage(dht, node) -> int:
    return gc.collect()


def test_a_dht_process_never_finalizes_the_garbage_it_inherited(swarm_by_num_blocks, tmp_path):
    """A DHT process is forked with all of our objects, garbage included. Collected there, an abandoned inference
    session's close waited forever for servers out of that process's reach, and the DHT was never ready. The DHT
    process collects nothing it inherited: the garbage is finalized once, here."""
    notes = tmp_path / "finalized"
    gc.disable()  # so that the cycle is garbage, not yet collected, when the DHT process is forked
    try:
        Garbage(notes)
        dht = start_dht(swarm_by_num_blocks[0].initial_peers, client_mode=True)
        try:
            dht.run_coroutine(collect_garbage)  # a full collection in the DHT process
        finally:
            dht.shutdown()
    finally:
        gc.enable()
    gc.collect()
    assert notes.read_text().split() == [str(os.getpid())]


def test_servers_started_with_num_blocks_cover_the_model(swarm_by_num_blocks):
    swarm, path = swarm_by_num_blocks
    dht = start_dht(swarm.initial_peers, client_mode=True)
    try:
        per_block = fetch_servers(dht, dht_prefix_for(str(path)), load_config(path).num_hidden_layers)
    finally:
        dht.shutdown()
    assert [len(servers) for servers in per_block] == [1] * 6


def test_generate_command_streams_the_local_models_text(swarm_by_num_blocks):
    swarm, path = swarm_by_num_blocks
    prompt = "The swarm says"
    # the swarm given as `meadow demo --keep` says, in $MEADOW_INITIAL_PEERS; the prompt piped in
    result = subprocess.run(
        [sys.executable, "-m", "meadow", "generate", str(path), "--max-new-tokens", "10"],
        input=prompt, capture_output=True, text=True, timeout=180,
        env={**os.environ, "MEADOW_INITIAL_PEERS": " ".join(swarm.initial_peers)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    expected = tokenizer.decode(local.generate(**inputs, max_new_tokens=10, do_sample=False)[0], skip_special_tokens=True)
    assert expected in result.stdout


@pytest.mark.parametrize("command", ["serve", "generate", "chat", "api", "status", "points"])
def test_a_command_without_initial_peers_says_how_to_give_them(command, monkeypatch):
    monkeypatch.delenv("MEADOW_INITIAL_PEERS", raising=False)
    with pytest.raises(SystemExit) as exit:
        main(command.split())
    assert f"meadow {command.split()[0]}: error: give --initial-peers, or set MEADOW_INITIAL_PEERS" in str(exit.value)
    good = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDDafu3S7oDo7ALzd8SK8rosWJ1agT1jckbFPwxPUWBU7"
    for peers, complaint in [(f"{good} model-name", "'model-name' is not a multiaddr"), ("/ip4/1.2.3/tcp/1", "IPv4")]:
        monkeypatch.setenv("MEADOW_INITIAL_PEERS", peers)
        with pytest.raises(SystemExit) as exit:
            main(command.split())
        assert "MEADOW_INITIAL_PEERS: " in str(exit.value) and complaint in str(exit.value)


@pytest.mark.parametrize("option", ["--dht-prefix", "--adapter"])
def test_an_api_over_several_models_refuses_an_option_that_names_one_models_swarm(option):
    good = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDDafu3S7oDo7ALzd8SK8rosWJ1agT1jckbFPwxPUWBU7"
    with pytest.raises(SystemExit) as exit:
        main(["api", "a-model", "b-model", "--initial-peers", good, option, "x"])
    assert str(exit.value) == f"meadow api: {option} names one model's swarm: give one MODEL with it"


@pytest.mark.parametrize("argv, said", [
    (["chat", "--reserve-tokens", "-1"], "--reserve-tokens: expected a whole number, 0 or more, got '-1'"),
    (["api", "--reserve-tokens", "ten"], "--reserve-tokens: expected a whole number, 0 or more, got 'ten'"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens: expected a positive whole number, got '0'"),
    (["chat", "--temperature", "-1"], "--temperature: expected a number, 0 or more, got '-1'"),
    (["chat", "--top-p", "2"], "--top-p: expected a number in (0, 1], got '2'"),
    (["api", "--port", "70000"], "--port: expected a port number, 0 to 65535, got '70000'"),
    (["serve", "--idle-timeout", "nan"], "--idle-timeout: expected a positive number, got 'nan'"),
])  # fmt: skip
def test_a_number_an_option_cannot_mean_is_a_usage_error(argv, said, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert said in capsys.readouterr().err
    option = argv[1]  # its default is a value it accepts
    default = getattr(build_parser().parse_args(argv[:1]), option[2:].replace("-", "_"))
    assert getattr(build_parser().parse_args([argv[0], option, str(default)]), option[2:].replace("-", "_")) == default


def test_client_commands_let_openmp_threads_wait_without_spinning():
    """What OpenMP itself read as torch loaded it (OMP_DISPLAY_ENV): a spin count of 0 is a passive wait. Run as the
    user runs it: the installed `meadow` script, with the environment of a shell that set nothing (or the user's
    own OMP_WAIT_POLICY, which wins). The runs go at once: each imports torch for seconds."""
    cases = [  # argv, the user's own policy, whether OpenMP then spins
        (["chat", "--help"], None, False),
        (["-v", "api", "--help"], None, False),
        (["chat", "--help"], "ACTIVE", True),
        (["serve", "--help"], None, True),
    ]
    shell = {key: value for key, value in os.environ.items() if not key.startswith(("OMP_", "GOMP_"))}
    runs = []
    for argv, policy, _ in cases:
        env = {**shell, "OMP_DISPLAY_ENV": "VERBOSE", **({"OMP_WAIT_POLICY": policy} if policy else {})}
        argv = [Path(sys.executable).with_name("meadow"), *argv]
        runs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for (argv, policy, spins), run in zip(cases, runs):
        err = run.communicate(timeout=120)[1]
        assert run.returncode == 0, err
        (spin_count,) = [line.split("=")[1].strip(" '") for line in err.splitlines() if "GOMP_SPINCOUNT" in line]
        assert (int(spin_count) > 0) == spins, (argv, policy, spin_count)


def test_every_p2p_daemon_listens_on_loopback_with_upnp_off(swarm_by_num_blocks):
    swarm, _ = swarm_by_num_blocks
    roots = {process.popen.pid for process in [swarm.dht, *swarm.servers]}
    daemons = p2p_daemons(roots)
    assert len(daemons) >= len(roots)
    for daemon in daemons:
        assert_on_loopback_with_upnp_off(daemon)


def test_servers_size_their_span_to_their_memory_or_warn_that_it_may_not_fit(swarm_by_num_blocks):
    swarm, path = swarm_by_num_blocks  # after the tests that count the swarm's servers
    claims = Path(os.environ["MEADOW_HOME"]) / "memory-claims"  # what each server here will still take
    others = sum(json.loads((claims / f"{server.popen.pid}.json").read_text())["bytes"] for server in swarm.servers)
    config = load_config(path)
    cache = block_bytes(config, torch.float32, cache_tokens=16384) - block_bytes(config, torch.float32)
    assert others == 3 * 2 * cache  # three servers of two blocks, loaded: their KV caches
    server = swarm.start_server(path)
    fit = next(line for line in server.lines if "blocks fit in the" in line)
    assert "6 of 6 blocks fit in the" in fit  # a tiny model: all of them
    assert f"(less {others / 2**20:.0f} MiB other servers here have claimed)" in fit
    assert " blocks 0:6 as " in next(line for line in server.lines if "Server ready" in line)
    assert json.loads((claims / f"{server.popen.pid}.json").read_text())["bytes"] == 6 * cache
    server.stop()
    assert not (claims / f"{server.popen.pid}.json").exists()  # a server that leaves lets go of its claim
    # blocks asked for are served, with a warning where they may not fit (here, once their KV caches fill up)
    server = swarm.start_server(path, "--blocks", "0:6", "--cache-tokens", str(2**29))
    assert any("6 blocks may not fit in the" in line for line in server.lines)
    server.stop()  # its claim is all the free memory


def test_a_servers_claim_is_the_kv_cache_its_sessions_have_not_taken(swarm_by_num_blocks):
    """An open session's cache is memory in use (other servers count it as taken): the claim leaves it out."""
    swarm, path = swarm_by_num_blocks
    server = swarm.start_server(path, "--blocks", "0:6", "--dht-prefix", "claims", "--update-period", "0.5")
    config, claim = load_config(path), Path(os.environ["MEADOW_HOME"]) / "memory-claims" / f"{server.popen.pid}.json"
    cache = block_bytes(config, torch.float32, cache_tokens=16384) - block_bytes(config, torch.float32)
    claimed = lambda: json.loads(claim.read_text())["bytes"]

    def becomes(nbytes: int) -> bool:
        deadline = time.monotonic() + 10  # announcements (which update the claim) come every half second
        while claimed() != nbytes and time.monotonic() < deadline:
            time.sleep(0.1)
        return claimed() == nbytes

    assert claimed() == 6 * cache
    sequence = connect_sequence(str(path), config, swarm.initial_peers, dht_prefix="claims")
    try:
        with sequence.inference_session(max_length=4096, batch_size=2) as session:  # half of the 16384 slots
            hidden, positions = torch.randn(2, 3, config.hidden_size), torch.arange(3).expand(2, 3)
            session.step(hidden, positions, torch.ones(2, 3, dtype=torch.bool))
            assert becomes(6 * cache // 2)
        assert becomes(6 * cache)  # the session ended: its cache is free again, and claimed
    finally:
        sequence.close()
        server.stop()


def test_a_server_that_cannot_hold_one_block_says_so_in_one_line(checkpoints):
    path = checkpoints("llama", num_layers=6)
    result = subprocess.run(
        [sys.executable, "-m", "meadow", "serve", str(path), "--cache-tokens", str(10**12), "--initial-peers",
         "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDDafu3S7oDo7ALzd8SK8rosWJ1agT1jckbFPwxPUWBU7"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("meadow serve: error: one block needs")


def test_a_command_that_fails_for_what_it_was_given_or_the_swarms_state_says_so_in_one_line(
    swarm_by_num_blocks, tmp_path, caplog
):
    """A --port in use (here the swarm's DHT node's: p2pd's socket, which a second p2pd would share), a device this
    machine lacks, blocks past the model, a model that is not there or not whole, initial peers where no swarm answers,
    an empty prompt and more servers than blocks end the command with `meadow COMMAND: error: ...` alone; with -v, the
    traceback is logged too."""
    dead = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDDafu3S7oDo7ALzd8SK8rosWJ1agT1jckbFPwxPUWBU7"
    peers = swarm_by_num_blocks[0].initial_peers
    taken = peers[0].split("/tcp/")[1].split("/")[0]
    in_use = f"cannot listen on 127.0.0.1 port {taken}: Address already in use; choose another --port"
    for argv, said in [
        (["dht", "--port", taken], in_use),
        (["serve", str(swarm_by_num_blocks[1]), "--port", taken, "--initial-peers", dead, "--blocks", "0:1"], in_use),
        (["api", "--port", taken, "--initial-peers", dead], in_use),
        (["serve", str(swarm_by_num_blocks[1]), "--device", "nonsense", "--initial-peers", dead], "--device nonsense "
         "cannot be used here: Expected one of cpu"),
        (["serve", str(swarm_by_num_blocks[1]), "--blocks", "0:7", "--initial-peers", *peers],
         "--blocks 0:7 is out of range: the model has 6 blocks"),
        (["serve", str(tmp_path / "nope"), "--initial-peers", dead], "is neither a local folder or .gguf file"),
        (["serve", str(tmp_path), "--initial-peers", dead], "has no config.json (an HF checkpoint) and no .gguf"),
        (["chat", str(tmp_path / "nope"), "--initial-peers", dead], "is neither a local folder or .gguf file"),
        (["dht", "--initial-peers", dead], f"none of the initial peers answered ({dead}): is a DHT node"),
        (["generate", "--prompt", "", "--initial-peers", dead], "the prompt is empty"),
        (["demo", "--servers", "31"], "--servers 31: the model has 30 blocks, and each server needs one at least"),
        (["bench", str(swarm_by_num_blocks[1]), "--servers", "7"], "--servers 7: the model has 6 blocks"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert str(exit.value).startswith(f"meadow {argv[0]}: error: ") and said in str(exit.value)
    with caplog.at_level(logging.DEBUG, logger="meadow"), pytest.raises(SystemExit):
        main(["-v", "serve", str(tmp_path), "--initial-peers", dead])
    assert [record.exc_info[0].__name__ for record in caplog.records if record.exc_info] == ["ModelNotFound"]


def test_unknown_architecture_is_refused_with_the_supported_list(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "meadow", "serve", str(tmp_path), "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDDafu3S7oDo7ALzd8SK8rosWJ1agT1jckbFPwxPUWBU7", "--blocks", "0:1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "gpt2" in result.stderr and "llama" in result.stderr and "qwen2" in result.stderr


def test_bench_prints_swarm_against_local_with_generation_timed_in_rounds(checkpoints):
    """`meadow bench`: its table of local and swarm figures; generation's ratio is the median of its rounds, with
    their range."""
    path = checkpoints("llama", num_layers=4)
    result = subprocess.run(
        [sys.executable, "-m", "meadow", "bench", str(path), "--servers", "2", "--new-tokens", "3"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    rows = {row[0].strip(): row[1:] for row in table}
    local, swarm, ratio = rows["generation, tokens/s (batch 1, 3 new; medians of 5 rounds, ratio's range)"]
    median, low, high = (float(x) for x in ratio.replace("x", "").replace("(", "-").replace(")", "").split("-"))
    assert float(local) > 0 and float(swarm) > 0 and 0 < low <= median <= high
    assert {"prefill 8x128, s", "training step 8x128 (forward + backward), s"} <= set(rows)
    assert "peak memory: client" in result.stdout


def test_bench_clients_prints_one_row_per_number_of_clients(checkpoints):
    """`meadow bench --clients`: N client processes at once against its own swarm, a table row for each N."""
    path = checkpoints("llama", num_layers=6)
    result = subprocess.run(
        [sys.executable, "-m", "meadow", "bench", str(path), "--servers", "2", "--clients", "2", "--new-tokens", "3"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 servers (spans 0:3, 3:6)" in result.stdout
    lines = result.stdout.splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "clients" not in line]
    assert [int(row[0]) for row in rows] == [1, 2]  # one client alone is always measured: the efficiency's base
    assert float(rows[0][3]) == 1.0 and all(float(row[1]) > 0 and 0 < float(row[3]) <= 2 for row in rows)
