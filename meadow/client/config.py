"""How patient a client is. Every wait is bounded; retries, bans and timeouts live here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

from meadow.wire import check_wire_format

# What a reply's session reserves of the reply on the servers up front (the API's requests, `meadow chat`'s turns); it
# grows as the reply is written. benchmarks/api_reservation.py: 8 and 12 API users on a short cache were done in 0.78
# and 0.55 the time of reserving the whole max_tokens.
RESERVE_TOKENS = 128


def reserved_reply(max_new_tokens: int, reserve_tokens: int) -> int:
    """The tokens of a reply of up to `max_new_tokens` that its session reserves up front (`reserve_tokens`; 0: all)."""
    return min(max_new_tokens, reserve_tokens) if reserve_tokens else max_new_tokens


@dataclass(frozen=True)
class ClientConfig:
    """Timeouts (seconds), retry limits and routing settings of a client, with defaults fit for a LAN or the internet."""

    dht_prefix: str | None = None  # swarm name of the model; default: derived from the model's name
    identity: str | None = None  # `meadow keygen` file: the same peer id across restarts (default: a new one each time)
    allow_peers: str | None = None  # a private swarm: file of its peer ids; we read and use only their servers
    # Contribution points (meadow/points/): the identity file of the server whose points this client spends; it signs
    # the client's receipts and its membership. Default: `identity`'s own; with neither, the client is anonymous
    # (served at the lowest priority, signs no receipts).
    points_identity: str | None = None
    receipt_every_tokens: int = 64  # tokens of one server's work per receipt (and one at each session's end)
    # One forward, prefill or replay on one server: a server silent longer than this, plus `step_slowdown` times what
    # its announced speed says the request's tokens take (sequence.work_timeout), but at most `max_request_timeout`,
    # is failed over.
    request_timeout: float = 30.0
    max_request_timeout: float = 600.0
    step_timeout: float = 5.0  # one decoding step (a few tokens): a server that dies silently must not stall us long
    min_step_timeout: float = 1.5  # ...and once a server's pace is known, `step_slowdown` times its usual step,
    step_slowdown: float = 10.0  # but at least this long (a loaded machine has hiccups)
    connect_timeout: float = 10.0  # opening a session or pinging a server
    max_retries: int = 5  # failovers for one request before its last error is raised
    # A full server (ServerBusy: no KV cache or sessions left for us now) is no failure: a request that meets one
    # tries others and, while all are full, waits this long for room before ServerBusy is raised (retries.py).
    busy_wait: float = 300.0
    busy_retry: float = 1.0  # ...trying it again this often (a refused session costs the server next to nothing)
    ban_seconds: float = 15.0  # first ban of a failed server; doubles with each further failure...
    max_ban_seconds: float = 300.0  # ...up to this
    moved_seconds: float = 5.0  # how long to skip a server that left or moved its blocks (about one DHT update)
    wait_for_servers: float = 30.0  # how long to wait for some server to hold missing blocks before giving up
    routes_max_age: float = 10.0  # re-read the DHT when the last look is older than this
    default_rtt: float = 0.05  # assumed round trip to a server not yet pinged
    rtt_max_age: float = 300.0  # a measured round trip is measured again after this long...
    ping_retry: float = 30.0  # ...and a failed ping after this long (meanwhile the server is a last resort)
    max_concurrent_pings: int = 16  # pings in flight at once during a route refresh
    replay_chunk_tokens: int = 4096  # batch x tokens per message when replaying history to a replacement server
    push_steps: bool = True  # servers hand each decoding step's output straight to the next server of the chain
    micro_batch_tokens: int = 4096  # batch x tokens per forward/backward request; bigger batches go in several
    min_quant: str | None = None  # use only servers whose weights are this quant or better (none > int8 > nf4)
    # How hidden states and gradients travel: float32 (exact), float16, bfloat16, or blockwise8 (8-bit for large
    # payloads, bfloat16 for small ones). None: each server's own dtype, which loses nothing (float32 for float32
    # servers, 16-bit for 16-bit ones).
    wire: str | None = None
    # Spot-checks (verify.py): this fraction of inference steps and of forward/backward requests is recomputed by
    # another server holding the same blocks (a third decides a mismatch). 0.02 costs ~2% more server work for
    # training and catches a server that keeps cheating within ~50 steps (a session's check covers its whole history,
    # so even one wrong step is caught at the next check); 1.0 checks everything, 0 nothing.
    verify: float = 0.02
    verify_ban_seconds: float = 24 * 3600.0  # how long to avoid a server that two others outvoted

    def __post_init__(self) -> None:
        if not 0.0 <= self.verify <= 1.0:
            raise ValueError(f"verify is the fraction of requests spot-checked, in [0, 1]; got {self.verify}")
        check_wire_format(self.wire)
