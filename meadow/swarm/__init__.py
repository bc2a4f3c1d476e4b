"""The swarm's shared state: what servers announce in the DHT and how it is read back."""

from meadow.swarm.dht import announce, fetch_models, fetch_servers, serve_dht_node, start_dht
from meadow.swarm.records import ModelInfo, ServerInfo, ServerState, block_key, dht_prefix_for, model_name
