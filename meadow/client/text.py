"""Text in, text out: what `meadow generate` does."""

from __future__ import annotations

from transformers import TextStreamer

from meadow.client.config import ClientConfig
from meadow.models import load_tokenizer


def stream_generate(
    model: str,
    initial_peers: list[str],
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    dht_prefix: str | None = None,
    adapter: str | None = None,
    client_config: ClientConfig | None = None,
) -> str:
    """Generate through the swarm (with the served LoRA `adapter`, if given), printing text to stdout as it arrives;
    returns the new text."""
    from meadow.client.model import AutoDistributedModelForCausalLM

    tokenizer = load_tokenizer(model)
    inputs = tokenizer(prompt, return_tensors="pt")
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    with AutoDistributedModelForCausalLM.from_pretrained(
        model, initial_peers, dht_prefix=dht_prefix, active_adapter=adapter, client_config=client_config
    ) as distributed:
        try:
            outputs = distributed.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
        except BaseException:
            print(flush=True)  # the error (or ^C) on a line of its own, not after the text streamed so far
            raise
    return tokenizer.decode(outputs[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
