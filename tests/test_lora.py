"""LoRA through a real swarm, against peft run locally on the same checkpoint.

Served adapters: servers load a peft adapter folder (`--adapters`), announce it, and a client that picks it with
`active_adapter=` is routed only to servers that have it. Client-owned LoRA: the client trains its own weights,
sends them with each request, and gets their gradients back from rpc_backward.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import start_swarm
from meadow import AutoDistributedModelForCausalLM
from meadow.client.config import ClientConfig
from meadow.client.routing import MissingBlocksError
from meadow.local_swarm import ProcessFailed
from meadow.models.tiny import make_tiny_checkpoint

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def randomize_lora(model: torch.nn.Module, seed: int) -> None:
    """peft starts B at zero, which would make every test pass trivially."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints("llama", num_layers=4)


@pytest.fixture(scope="module")
def adapter(path, tmp_path_factory):
    """A peft adapter folder named "tiny-adapter" (rank 4, q/v/down projections) with random weights."""
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(peft_model, seed=0)
    folder = tmp_path_factory.mktemp("adapters") / "tiny-adapter"
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def swarm(path, adapter):
    swarm = start_swarm(path, ["0:4"])  # no adapter: clients of the base model use it
    try:
        for span in ("0:2", "2:4"):
            swarm.start_server(path, "--blocks", span, "--adapters", str(adapter))
    except BaseException:
        swarm.stop()
        raise
    yield swarm
    swarm.stop()


def local_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_served_adapter_equals_local_peft_and_routes_to_its_servers(path, adapter, swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, active_adapter="tiny-adapter")
    local = PeftModel.from_pretrained(local_model(path), adapter).eval()
    input_ids = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = local(input_ids).logits, model(input_ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert all("tiny-adapter" in model.sequence.servers[hop.peer].adapters for hop in model.sequence.last_hops)
    assert torch.equal(model.generate(input_ids[:1, :5], max_new_tokens=6), local.generate(input_ids=input_ids[:1, :5], max_new_tokens=6, do_sample=False))

    base = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers)
    with torch.no_grad():
        assert (base(input_ids).logits - local_model(path)(input_ids).logits).abs().max().item() <= 1e-4
        assert (base(input_ids).logits - expected).abs().max().item() > 1e-2  # the adapter does change the output
    for distributed in (model, base):
        distributed.sequence.close()


def test_an_adapter_no_server_has_is_named_in_the_error(path, swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(path), swarm.initial_peers, active_adapter="nobody-has-it", client_config=ClientConfig(wait_for_servers=1.0)
    )
    said = "adapter 'nobody-has-it'; start a server for them (theirs serve 'tiny-adapter')"  # what the user meant?
    with pytest.raises(MissingBlocksError, match=re.escape(f"blocks 0:4 of this model with {said}")):
        model(torch.tensor([[5, 6, 7]]))
    model.sequence.close()


def test_client_lora_gradients_equal_local_peft(path, swarm, tmp_path):
    config = LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, lora=config)
    randomize_lora(model, seed=2)
    local = get_peft_model(local_model(path), config)
    for (block, module), (A, B) in zip(model.lora.keys, model.lora.pairs()):
        parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        layer = local.get_submodule(f"base_model.model.model.layers.{block}.{parent}.{module}")
        layer.lora_A["default"].weight.data.copy_(A.data)
        layer.lora_B["default"].weight.data.copy_(B.data)

    input_ids = torch.randint(4, 90, (3, 12), generator=torch.Generator().manual_seed(3))
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    expected = local(input_ids=input_ids, labels=input_ids)
    expected.loss.backward()

    assert (out.logits - expected.logits).abs().max().item() <= 1e-4
    for (block, module), (A, B) in zip(model.lora.keys, model.lora.pairs()):
        parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        layer = local.get_submodule(f"base_model.model.model.layers.{block}.{parent}.{module}")
        assert relative_error(A.grad, layer.lora_A["default"].weight.grad) <= 1e-4, (block, module)
        assert relative_error(B.grad, layer.lora_B["default"].weight.grad) <= 1e-4, (block, module)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora"}  # the client trains its LoRA; embeddings, norm and head stay frozen

    # generation applies the client's weights on the servers too; the saved adapter is a peft adapter
    prompt = input_ids[:1, :5]
    local.eval()
    expected_tokens = local.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=6), expected_tokens)
    model.lora.save_pretrained(tmp_path / "trained")
    reloaded = PeftModel.from_pretrained(local_model(path), tmp_path / "trained").eval()
    with torch.no_grad():
        assert (reloaded(input_ids).logits - expected.logits).abs().max().item() <= 1e-4
    model.sequence.close()


def test_an_adapter_that_does_not_fit_the_model_stops_the_server_with_a_clear_error(path, swarm, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "wider", "llama", num_layers=4, hidden_size=96)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "wider-adapter")
    with pytest.raises(ProcessFailed, match=r"this model needs \(2, 64\)"):
        swarm.start_server(path, "--blocks", "0:1", "--adapters", str(tmp_path / "wider-adapter"), timeout=60)
