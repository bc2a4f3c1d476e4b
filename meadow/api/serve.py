"""`meadow api`: load the model's client parts once, join the swarm, serve the app with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import uvicorn

from meadow.api.kept_sessions import KEEP_SECONDS, KeptSessions
from meadow.client.config import RESERVE_TOKENS, ClientConfig
from meadow.listening import listening_socket

# a request for blocks nobody serves should get its 503 within seconds, not after the library's 30 s default
WAIT_FOR_SERVERS = 5.0


def run_api(
    models: Sequence[str | Path],
    initial_peers: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    dht_prefix: str | None = None,
    adapter: str | None = None,
    client_config: ClientConfig | None = None,
    api_key: str | None = None,
    origins: Sequence[str] = (),
    keep_seconds: float = KEEP_SECONDS,
    reserve_tokens: int = RESERVE_TOKENS,
) -> None:
    """Serve `models` (one API over them all) until SIGINT/SIGTERM. Prints `API ready: http://HOST:PORT (model ID)`
    (`(models ID, ID)` for several; then where each API and the chat page are) once it accepts requests."""
    from meadow.api.app import create_app
    from meadow.api.model_router import ModelRouter
    from meadow.api.response_store import ResponseStore
    from meadow.client.model import AutoDistributedModelForCausalLM
    from meadow.models import load_tokenizer

    # our own socket, taken before the swarm is joined: a port in use is said at once; with --port 0, the address
    # printed is the one bound
    sock = listening_socket(host, port)
    config = replace(client_config or ClientConfig(), wait_for_servers=WAIT_FOR_SERVERS)
    joined: dict[str, tuple] = {}  # model id -> (the distributed model, its tokenizer)
    kept: dict[str, KeptSessions] = {}  # model id -> the sessions kept between its requests
    try:
        for model in models:
            tokenizer = load_tokenizer(model)
            distributed = AutoDistributedModelForCausalLM.from_pretrained(
                model, initial_peers, dht_prefix=dht_prefix, active_adapter=adapter, client_config=config
            )
            model_id = distributed.sequence.dht_prefix + (f":{adapter}" if adapter else "")
            if model_id in joined:
                distributed.close()
                sys.exit(f"meadow api: two of the models given are {model_id}")
            joined[model_id] = distributed, tokenizer
        ids, stored = list(joined), ResponseStore()
        for model_id in joined:
            kept[model_id] = KeptSessions(keep_seconds)
        apps = {model_id: create_app(distributed, tokenizer, model_id, api_key, origins, ids, stored, kept[model_id],
                                     reserve_tokens)
                for model_id, (distributed, tokenizer) in joined.items()}  # fmt: skip
        _serve(apps[ids[0]] if len(apps) == 1 else ModelRouter(apps), ids, sock, host, api_key)
    finally:
        sock.close()
        for sessions in kept.values():  # while the swarm is still joined: the servers free their caches at once
            sessions.close()
        for distributed, _ in joined.values():
            distributed.close()
        logging.getLogger(__name__).info("API stopped")


def _serve(app, ids: list[str], sock: socket.socket, host: str, api_key: str | None) -> None:
    """Serve `app` (the API of the models `ids`) on `sock` (bound to `host`) until SIGINT/SIGTERM."""
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if sock.family == socket.AF_INET6 else host
    address = f"http://{shown_host}:{bound_port}"
    print(f"API ready: {address} ({'model' if len(ids) == 1 else 'models'} {', '.join(ids)}): OpenAI's API at "
          f"{address}/v1, Ollama's at {address} (its host), the chat page at {address}/", flush=True)  # fmt: skip
    if api_key is None and not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
        logging.getLogger(__name__).warning(f"anyone who can reach {host} can use this API: --api-key asks for a key")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    # after its graceful shutdown uvicorn raises the signal again for the handler it found: make that an exit through
    # `finally`, so that the client's DHT process stops too (SIGTERM's default would leave it running)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    uvicorn.Server(config).run(sockets=[sock])
