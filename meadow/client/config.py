"""How patient a client is. Every wait is bounded; retries and timeouts live here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientConfig:
    """Timeouts (seconds) and routing settings of a client, with defaults fit for a loopback or LAN swarm."""

    dht_prefix: str | None = None  # swarm name of the model; default: derived from the model's name
    request_timeout: float = 60.0  # one forward or one inference step on one server
    connect_timeout: float = 20.0  # opening a session or pinging a server
    routes_max_age: float = 10.0  # re-read the DHT when the last look is older than this
    default_rtt: float = 0.05  # assumed round trip to a server not yet pinged
