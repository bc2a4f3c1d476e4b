"""Quantized servers (`meadow serve --quant int8|nf4`) in a real swarm, against the same checkpoint run locally.

The model has 2 blocks: on tiny random models (weights of std 0.1, logits with near-ties) LLM.int8()'s error grows
with depth; measured on this checkpoint and 512 positions, int8 agrees with float32 on 96.7 % of the top-1 tokens
(seeds 0-3: 96.1-97.9 %; 4 blocks: 92-96 %), and nf4 on about 64 %.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from meadow import AutoDistributedModelForCausalLM
from meadow.client.config import ClientConfig
from meadow.client.routing import MissingBlocksError
from meadow.local_swarm import LocalSwarm
from meadow.models import load_block, load_config
from meadow.models.gpt_oss import MXFP4_BYTES
from meadow.models.quant import QuantUnavailable, check_quant, quant_at_least, quantize_block, with_quant_at_least
from meadow.server.server import Server, ServerConfig
from meadow.server.sizing import QUANT_BYTES, block_bytes
from meadow.server.throughput import cache_key, random_block
from meadow.swarm import ServerInfo, ServerState

# LLM.int8() rounds each weight row and each activation row to 8 bits (at most 1/254 of the row's largest value);
# through 2 blocks of 7 matmuls of a random model that measured 4 % of the largest logit. 10 % leaves room, and
# still fails a server that computes nf4 (42 %) or nothing at all (100 %).
INT8_LOGIT_TOLERANCE = 0.10
INT8_MIN_AGREEMENT = 0.95
NF4_MIN_AGREEMENT = 0.40  # measured 64 %; a random guess agrees on 1 %


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def agreement(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Share of positions whose top-1 token is the same (teacher-forced: both saw the same inputs)."""
    return (got.argmax(-1) == expected.argmax(-1)).float().mean().item()


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints("llama", num_layers=2)


@pytest.fixture(scope="module")
def adapter(path, tmp_path_factory):
    """A peft adapter "nf4-adapter" with random weights, served by the nf4 server only."""
    peft_model = get_peft_model(local_model(path), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # peft starts B at zero, which would hide an adapter that is not applied
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    folder = tmp_path_factory.mktemp("adapters") / "nf4-adapter"
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def swarm(path, adapter):
    """One int8 server and one nf4 server (with the adapter), each holding both blocks."""
    with LocalSwarm() as swarm:
        swarm.start_dht()
        servers = [
            swarm.start_server(path, "--blocks", "0:2", "--quant", "int8", wait=False),
            swarm.start_server(path, "--blocks", "0:2", "--quant", "nf4", "--adapters", str(adapter), wait=False),
        ]
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
        yield swarm


def local_model(path, quant: str = "none"):
    """transformers' model of the checkpoint, its decoder layers quantized like a server's blocks."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for layer in model.model.layers:
        quantize_block(layer, quant, "cpu")
    return model


def embeds_and_grad(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and the gradient of their sum w.r.t. the input embeddings (through the blocks' backward)."""
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    logits.sum().backward()
    return logits.detach(), embeds.grad


INPUT_IDS = torch.randint(4, 90, (8, 64), generator=torch.Generator().manual_seed(1))


def test_int8_server_is_close_to_the_float_model(path, swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(path), swarm.initial_peers, client_config=ClientConfig(min_quant="int8")
    )
    expected, expected_grad = embeds_and_grad(local_model(path), INPUT_IDS)
    got, grad = embeds_and_grad(model, INPUT_IDS)
    assert {model.sequence.servers[hop.peer].quant for hop in model.sequence.last_hops} == {"int8"}
    assert relative_error(got, expected) <= INT8_LOGIT_TOLERANCE
    assert agreement(got, expected) >= INT8_MIN_AGREEMENT
    assert relative_error(grad, expected_grad) <= INT8_LOGIT_TOLERANCE  # rpc_backward through int8 layers
    assert relative_error(got, expected) > 1e-4  # it is quantized: float32 would be within 1e-4
    model.sequence.close()


def test_nf4_server_with_an_adapter_equals_local_nf4_with_peft(path, adapter, swarm):
    """nf4 is weight-only: the swarm computes what transformers + peft compute locally on the same nf4 weights,
    forward and backward, with the served LoRA adapter added on top of the quantized layers."""
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, active_adapter="nf4-adapter")
    local = PeftModel.from_pretrained(local_model(path, "nf4"), adapter).eval()
    expected, expected_grad = embeds_and_grad(local, INPUT_IDS)
    got, grad = embeds_and_grad(model, INPUT_IDS)
    assert {model.sequence.servers[hop.peer].quant for hop in model.sequence.last_hops} == {"nf4"}
    assert (got - expected).abs().max().item() <= 1e-4
    assert relative_error(grad, expected_grad) <= 1e-4

    float_with_adapter = PeftModel.from_pretrained(local_model(path), adapter).eval()
    with torch.no_grad():
        unquantized = float_with_adapter(INPUT_IDS).logits
    assert relative_error(got, unquantized) > 0.05  # the server does hold nf4 weights
    assert agreement(got, unquantized) >= NF4_MIN_AGREEMENT
    model.sequence.close()


def test_a_client_sees_each_servers_quant_and_min_quant_skips_worse_ones(path, swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers)
    model.sequence.update_routes(force=True)
    assert sorted(info.quant for info in model.sequence.servers.values()) == ["int8", "nf4"]
    model.sequence.close()

    for _ in range(3):  # the int8 server is not always the fastest: min_quant, not luck, must pick it
        picky = AutoDistributedModelForCausalLM.from_pretrained(
            str(path), swarm.initial_peers, client_config=ClientConfig(min_quant="int8")
        )
        with torch.no_grad():
            picky(INPUT_IDS[:1, :8])
        assert [info.quant for info in picky.sequence.servers.values()] == ["int8"]
        assert {picky.sequence.servers[hop.peer].quant for hop in picky.sequence.last_hops} == {"int8"}
        picky.sequence.close()

    strict = AutoDistributedModelForCausalLM.from_pretrained(
        str(path), swarm.initial_peers, client_config=ClientConfig(min_quant="none", wait_for_servers=1.0)
    )
    with pytest.raises(MissingBlocksError):
        strict(INPUT_IDS[:1, :8])
    strict.sequence.close()


def test_quants_rank_none_over_int8_over_nf4():
    assert quant_at_least("none", "int8") and quant_at_least("int8", "int8") and not quant_at_least("nf4", "int8")
    assert quant_at_least("nf4", "nf4") and not quant_at_least("int8", "none")
    assert not quant_at_least("fp3", "nf4")  # a quant announced by a newer server is not ranked above anything
    servers = {name: ServerInfo(state=ServerState.ONLINE, start=0, end=1, quant=name) for name in ("none", "int8", "nf4", "fp3")}
    assert list(with_quant_at_least(servers, "int8")) == ["none", "int8"]
    assert with_quant_at_least(servers, None) == servers
    with pytest.raises(ValueError, match="unknown quant 'fp8'"):
        with_quant_at_least(servers, "fp8")


def test_a_quantized_server_measures_a_quantized_block(path):
    config = load_config(path)
    cpu = torch.device("cpu")
    keys = {cache_key(config, torch.float32, cpu, quant) for quant in ("none", "int8", "nf4")}
    assert len(keys) == 3
    block = random_block(config, torch.float32, cpu, "nf4")
    assert type(block.feed_forward.down_proj).__name__ == "Linear4bit"
    assert type(random_block(config, torch.float32, cpu, "int8").attention.q_proj).__name__ == "Linear8bitLt"


def serve(path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`meadow serve` that should stop at start: no DHT is needed to get that far."""
    command = [sys.executable, "-m", "meadow", "serve", str(path), "--initial-peers", "/ip4/127.0.0.1/tcp/1",
               "--blocks", "0:1", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_an_unknown_quant_is_refused(path):
    result = serve(path, "--quant", "fp8")
    assert result.returncode == 2 and "invalid choice: 'fp8'" in result.stderr
    with pytest.raises(ValueError, match="unknown quant 'fp8'; known: none, int8, nf4"):
        Server(ServerConfig(model=str(path), quant="fp8"))


def test_a_quant_that_cannot_run_stops_the_server_with_a_clear_error(path, tmp_path):
    broken = tmp_path / "bitsandbytes"  # a bitsandbytes whose import fails, found before the installed one
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('libbitsandbytes_cpu.so: cannot open shared object file')\n")
    result = serve(path, "--quant", "nf4", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert "meadow serve: error: --quant nf4 needs bitsandbytes, which cannot be imported here" in result.stderr
    assert "libbitsandbytes_cpu.so" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(QuantUnavailable, match="--quant nf4 cannot run on meta in float32 with bitsandbytes"):
        check_quant("nf4", torch.float32, "meta")  # bitsandbytes imports, but has no kernel for this device


def test_gpt_oss_experts_are_packed_in_mxfp4_under_a_quant_exactly_as_released(checkpoints):
    """`--quant` packs GPT-OSS's experts (nearly all of its weights) in MXFP4: the values of a checkpoint released so
    are kept exactly (the experts' outputs equal the unpacked ones'), in the memory `block_bytes` counts for them; of a
    float checkpoint, the nearest MXFP4 values."""
    shape = dict(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64)
    released = checkpoints("gpt_oss", mxfp4_experts=True, **shape)
    config = load_config(released)
    plain = load_block(released, config, 0, torch.float32)
    packed = quantize_block(load_block(released, config, 0, torch.float32), "nf4", "cpu")
    experts = packed.feed_forward.experts
    assert not any(parameter.dim() == 3 for parameter in experts.parameters())  # both weights packed
    x = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(experts(1, x[0]), plain.feed_forward.experts(1, x[0]))
        assert torch.equal(packed.feed_forward(x, None), quantize_block(plain, "none", "cpu").feed_forward(x, None))
    weights = plain.feed_forward.experts.gate_up_proj.numel() + plain.feed_forward.experts.down_proj.numel()
    held = sum(buffer.numel() * buffer.element_size() for buffer in experts.buffers())
    assert held == weights * MXFP4_BYTES  # about 0.53 bytes a weight: float32's 4, bf16's 2
    saved = block_bytes(config, torch.float32) - block_bytes(config, torch.float32, "nf4")
    linear = sum(module.weight.numel() for module in plain.modules() if isinstance(module, torch.nn.Linear))
    assert saved == pytest.approx(weights * (4 - MXFP4_BYTES) + linear * (4 - QUANT_BYTES["nf4"]), abs=1)
    float_experts = load_block(checkpoints("gpt_oss", **shape), config, 0, torch.float32).feed_forward.experts
    weight = float_experts.down_proj.clone()
    float_experts.compress()
    error = (float_experts.weight("down_proj", 2) - weight[2]).abs().max() / weight[2].abs().max()
    assert 0 < error <= 1 / 3  # MXFP4's rounding: half a step, at most its group's power of two, a third of its largest
