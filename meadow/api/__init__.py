"""The HTTP face of a swarm: an OpenAI-compatible API over one distributed model, a web chat and a swarm monitor."""
