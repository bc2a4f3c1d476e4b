"""The swarm's shared state: what servers announce in the DHT, how it is signed, read back and checked."""

from meadow.swarm.dht import (
    announce, announce_ledger, fetch_announcements, fetch_ledgers, fetch_models, fetch_servers, serve_dht_node,
    start_dht,
)  # fmt: skip
from meadow.swarm.identity import Identity, generate_identity, load_identity
from meadow.swarm.records import LedgerHead, ModelInfo, ServerInfo, ServerState, block_key, dht_prefix_for, model_name
