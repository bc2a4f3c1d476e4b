"""Qwen3, Mixtral, Qwen3-MoE, GPT-OSS, Mistral, Phi-3, Gemma 2 and Gemma 3 (text, and the image model's text part;
sliding windows shorter than the sequences) against transformers run locally on the same tiny checkpoints: blocks,
KV-cache sessions and packed batches in-process, then a real swarm on 127.0.0.1 (logits, greedy generation, gradients,
deep prompts, client LoRA: per family one server, or two in a chain); Gemma 1 in-process; Qwen GGUF files."""

from __future__ import annotations

import json
import signal
from functools import partial

import ollama
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from meadow import AutoDistributedModelForCausalLM
from meadow.api.schemas import ChatMessage
from meadow.client.chat_prompt import chat_prompt_ids
from meadow.client.harmony import markup_ids
from meadow.local_swarm import LocalSwarm, Process
from meadow.models import load_blocks, load_client_parts, load_config, load_reference_model, load_tokenizer
from meadow.models.config import UnsupportedModelError
from meadow.models.registry import family_of
from meadow.models.tiny import make_tiny_checkpoint, make_tiny_gguf
from meadow.server.span import Session, Span

ATOL = 1e-4
WINDOW = 8  # mistral's and mixtral's sliding window; every sequence below is longer
LENGTH = 36
# family -> make_tiny_checkpoint kwargs: odd shapes, GQA, biases, tied and untied heads, a sharded checkpoint
FAMILIES = {
    "qwen3": dict(hidden_size=40, num_heads=5, num_kv_heads=1, head_dim=12, intermediate_size=72,
                  tie_word_embeddings=True, attention_bias=True),
    "mixtral": dict(hidden_size=48, num_heads=6, num_kv_heads=2, intermediate_size=40, num_experts=4,
                    experts_per_token=2, sliding_window=WINDOW, max_shard_size="40KB"),
    # weights of the top k not renormalised, a dense layer among the sparse ones
    "qwen3_moe": dict(hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=40, num_experts=4,
                      experts_per_token=2, mlp_only_layers=[1]),
    # sinks, biases, yarn rope, every other layer sliding; its experts' SwiGLU clamped (low enough to bite)
    "gpt_oss": dict(hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=40, num_experts=4,
                    experts_per_token=2, sliding_window=WINDOW, swiglu_limit=0.3),
    "mistral": dict(sliding_window=WINDOW),
    "phi3": dict(hidden_size=48, num_heads=4, num_kv_heads=2, intermediate_size=80, sliding_window=WINDOW),  # fused
    # capped scores and logits (caps low enough to bite), a query scale of its own, every other layer sliding
    "gemma2": dict(hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=80,
                   sliding_window=WINDOW, query_pre_attn_scalar=20, attn_logit_softcapping=3.0,
                   final_logit_softcapping=5.0),
    # q/k norms; sliding layers on their own rope base, the global one's scaled
    "gemma3": dict(hidden_size=48, num_heads=4, num_kv_heads=1, head_dim=24, intermediate_size=80,  # the image model's
                   sliding_window=WINDOW, query_pre_attn_scalar=20),  # text part, its tensors under language_model.
    "gemma3_text": dict(hidden_size=48, num_heads=4, num_kv_heads=1, head_dim=24, intermediate_size=80,
                        sliding_window=WINDOW, query_pre_attn_scalar=20,
                        rope_scaling={"rope_type": "linear", "factor": 4.0},
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]),
}  # fmt: skip
SPANS = {family: ("0:2", "2:4") for family in ("qwen3", "mixtral", "mistral")}  # the others on one server each
GEMMA_1 = dict(hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=80)  # in-process only
LORA_TARGETS = {"mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],  # its experts take no LoRA (see mixtral.py)
                "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "gpt_oss": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}  # its fused layers, as peft names them
DEFAULT_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", params=list(FAMILIES))
def path(request, checkpoints):
    return checkpoints(request.param, **FAMILIES[request.param])


@pytest.fixture(scope="module")
def local(path):
    return reference(path)


@pytest.fixture(scope="module")
def span(path):
    return whole_span(path)


def reference(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def whole_span(path) -> tuple[Span, object]:
    """Every block of the checkpoint as a server's span, and the client's parts."""
    config = load_config(path)
    blocks = load_blocks(path, config, 0, config.num_hidden_layers, torch.float32, progress=False)
    return Span(blocks, 0, config, torch.float32, torch.device("cpu")), load_client_parts(path, config, torch.float32)


def token_ids(vocab_size: int, rows: int = 2, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_blocks_and_logits_match_transformers(path, local, span):
    check_blocks_and_logits(local, *span)


def test_gemma_1_blocks_and_logits_match_transformers(checkpoints):
    """Gemma 1: no sandwich norms, no caps, the scores scaled by 1 / sqrt(head_dim); not in the swarm (the blocks are
    Gemma 2's and 3's, less those)."""
    path = checkpoints("gemma", **GEMMA_1)
    check_blocks_and_logits(reference(path), *whole_span(path))


def test_gpt_oss_experts_stored_in_mxfp4_load_as_transformers_unpacks_them(checkpoints):
    """OpenAI's release stores the experts in MXFP4 (4-bit codes, a power of two per 32 values): a server unpacks them
    into the values transformers does (which are not the float checkpoint's: the packing rounds)."""
    kwargs = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=32, num_experts=4,
                  experts_per_token=2, sliding_window=WINDOW)  # fmt: skip
    packed, plain = checkpoints("gpt_oss", mxfp4_experts=True, **kwargs), checkpoints("gpt_oss", **kwargs)
    local = check_blocks_and_logits(reference(packed), *whole_span(packed))
    ids = token_ids(local.config.get_text_config().vocab_size)
    with torch.no_grad():
        assert (reference(plain)(ids).logits - local(ids).logits).abs().max() > 100 * ATOL


def check_blocks_and_logits(local, span, parts):
    ids = token_ids(span.config.vocab_size)
    captured = {}
    hook = local.get_decoder().norm.register_forward_hook(lambda module, args, out: captured.update(hidden=args[0]))
    with torch.no_grad():
        expected = local(ids).logits
    hook.remove()
    hidden = span.run(parts.embed(ids), torch.arange(LENGTH).expand(2, -1), torch.ones_like(ids, dtype=torch.bool),
                      span.range)  # fmt: skip
    assert (hidden - captured["hidden"]).abs().max() <= ATOL
    assert (parts.logits(hidden) - expected).abs().max() <= ATOL
    return local


def run_packed(span: Span, steps: list) -> list[torch.Tensor]:
    """Run sessions' step generators side by side, each round's pieces in one packed pass, as a server batches them."""
    pieces, results = [next(step) for step in steps], [None] * len(steps)
    active = list(range(len(steps)))
    while active:
        outputs = span.run_pieces([pieces[i] for i in active])
        still = []
        for i, output in zip(active, outputs):
            try:
                pieces[i] = steps[i].send(output)
                still.append(i)
            except StopIteration as stop:
                results[i] = stop.value
        active = still
    return results


def test_cache_sessions_in_packed_batches_equal_the_full_forward(span):
    """Two sessions decode side by side in packed passes: one prefills more than the window then goes token by token
    past it, the other goes in steps of 5 (chunks of 3 in the pass); their outputs are the full forward's."""
    span, parts = span
    length = 2 * WINDOW + 4
    x = parts.embed(token_ids(span.config.vocab_size, length=length))
    positions = torch.arange(length).expand(2, -1)
    full = span.run(x, positions, torch.ones(2, length, dtype=torch.bool), span.range)
    sessions = [Session.open(span, span.range, 1, length) for _ in range(2)]
    splits = [[0, WINDOW + 2, *range(WINDOW + 3, length + 1)], list(range(0, length, 5)) + [length]]
    outputs: list[list[torch.Tensor]] = [[], []]
    for step in range(max(len(s) for s in splits) - 1):
        runs = [(row, splits[row][step], splits[row][step + 1]) for row in range(2) if step + 1 < len(splits[row])]
        steps = [
            sessions[row].step_pieces(x[row : row + 1, a:b], positions[row : row + 1, a:b], torch.ones(1, b - a, dtype=torch.bool), 3)
            for row, a, b in runs
        ]  # fmt: skip
        for (row, _, _), output in zip(runs, run_packed(span, steps)):
            outputs[row].append(output)
    for row in range(2):
        assert (torch.cat(outputs[row], dim=1)[0] - full[row]).abs().max() <= ATOL


def test_mixtral_reads_both_expert_layouts(tmp_path):
    kwargs = dict(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=24, num_experts=3)
    classic = make_tiny_checkpoint(tmp_path / "classic", "mixtral", **kwargs)
    fused = make_tiny_checkpoint(tmp_path / "fused", "mixtral", fused_experts=True, **kwargs)
    config = load_config(classic)
    assert family_of(config).name == "mixtral" and load_config(fused) == config
    for a, b in zip(*(load_blocks(p, config, 0, 2, torch.float32, progress=False) for p in (classic, fused))):
        state, expected = a.state_dict(), b.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


@pytest.fixture(scope="module")
def swarm(checkpoints):
    """One DHT and, per family, two servers (blocks 0:2 and 2:4 of its 4) or one (all 4: what passes between servers is
    no family's own, and each server costs seconds to start), all started at once."""
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        servers = [swarm.start_server(checkpoints(family, **kwargs), "--blocks", span, wait=False)
                   for family, kwargs in FAMILIES.items() for span in SPANS.get(family, ("0:4",))]  # fmt: skip
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
    except BaseException:
        swarm.stop()
        raise
    yield swarm
    for server in swarm.servers:  # all shut down at once; stop() then waits for each in turn
        server.popen.send_signal(signal.SIGTERM)
    swarm.stop()


@pytest.fixture(scope="module")
def distributed(path, swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers)
    yield model, swarm
    model.sequence.close()


def test_swarm_logits_and_greedy_generation_equal_transformers(distributed, local):
    model, _ = distributed
    ids = token_ids(local.config.get_text_config().vocab_size, seed=1)
    with torch.no_grad():
        assert (model(ids).logits - local(ids).logits).abs().max() <= ATOL
    prompt = ids[:1, :10]  # then 26 new tokens: the session's cache grows far past the window
    expected = local.generate(prompt, max_new_tokens=LENGTH - 10, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=LENGTH - 10, do_sample=False), expected)


def test_gpt_oss_thinking_and_answer_come_apart_through_the_api(checkpoints, swarm):
    """`meadow api` over the tiny gpt_oss, which speaks harmony as gpt-oss does (its markup, a template of that form):
    a reply in the analysis channel is the reasoning, one in the final channel the answer, each the text of
    transformers' greedy tokens (special tokens held off by logit_bias, so that a random model writes text), streamed
    or not; the reasoning effort reaches the template; a required call is written in harmony's form and read back as
    a call, and the next turn shows it and its result as the template does."""
    path = checkpoints("gpt_oss", **FAMILIES["gpt_oss"])
    api = Process(["api", str(path), "--initial-peers", *swarm.initial_peers, "--port", "0"], "api")
    swarm.extra.append(api)
    url = api.wait_for(lambda line: line.startswith("API ready"), timeout=180).split()[2] + "/v1"
    local, tokenizer = load_reference_model(path), load_tokenizer(path)
    held = sorted(set(markup_ids(tokenizer)) | set(tokenizer.all_special_ids))
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    model_id = client.models.list().data[0].id
    hi = [{"role": "user", "content": "Why is the sky blue?"}]
    asked = dict(model=model_id, messages=hi, max_tokens=8, temperature=0, logit_bias={str(i): -100 for i in held})
    for channel, said in (("analysis", "reasoning_content"), ("final", "content")):
        prompt = chat_prompt_ids(tokenizer, hi, channel=channel, reasoning_effort="low")
        out = local.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                             suppress_tokens=held)  # fmt: skip
        text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
        variables = {"chat_template_kwargs": {"channel": channel}}
        reply = client.chat.completions.create(**asked, reasoning_effort="low", extra_body=variables)
        assert reply.usage.prompt_tokens == prompt.shape[1]
        assert reply.usage.prompt_tokens != chat_prompt_ids(tokenizer, hi, channel=channel).shape[1]  # medium's
        message, expected = reply.choices[0].message, text.strip() if said == "reasoning_content" else text
        assert text.strip() and getattr(message, said) == expected  # the reasoning's whitespace is dropped
        assert message.content == (text if said == "content" else "")
        chunks = client.chat.completions.create(**asked, reasoning_effort="low", extra_body=variables, stream=True)
        deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
        assert "".join(getattr(delta, said, None) or "" for delta in deltas) == getattr(message, said)
    city = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": city}}
    spaces = {str(i): -100 for i in tokenizer.convert_tokens_to_ids(["ĉ", "Ċ", "Ġ"])}  # else a random model pads JSON
    called = client.chat.completions.create(model=model_id, messages=hi, tools=[weather], tool_choice="required",
                                            max_tokens=100, temperature=0, logit_bias=spaces)  # fmt: skip
    assert called.usage.prompt_tokens == chat_prompt_ids(tokenizer, hi, [weather]).shape[1]  # shown by the template
    (call,) = called.choices[0].message.tool_calls
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert list(json.loads(call.function.arguments)) == ["city"]
    then = [*hi, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]  # fmt: skip
    after = client.chat.completions.create(model=model_id, messages=then, tools=[weather], max_tokens=1)
    shown = chat_prompt_ids(tokenizer, [ChatMessage.model_validate(m).as_dict() for m in then], [weather])
    assert after.usage.prompt_tokens == shown.shape[1]
    arguments = json.dumps(json.loads(call.function.arguments))  # as the template's tojson writes them
    assert f"to=functions.get_weather <|constrain|>json<|message|>{arguments}<|call|>" in tokenizer.decode(shown[0])
    # Ollama's raw prompts in harmony's form: the reply read apart too; asked not to think, gpt-oss's thinking is left
    # out (it cannot be asked not to think)
    ollamas = ollama.Client(host=url.removesuffix("/v1"), timeout=120)
    for channel in ("analysis", "final"):
        raw = tokenizer.decode(chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}], channel=channel)[0])
        prompt = tokenizer(raw, return_tensors="pt")["input_ids"]  # with its markup and <s>, as Ollama's raw prompts
        out = local.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
        assert not set(out[0, prompt.shape[1] :].tolist()) & set(markup_ids(tokenizer))  # all text, no header
        text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
        asked = dict(model=model_id, prompt=raw, raw=True, options={"temperature": 0, "num_predict": 12})
        said = ollamas.generate(**asked)
        assert text.strip() and (said.thinking, said.response) == ((text.strip(), "") if channel == "analysis"
                                                                    else (None, text))  # fmt: skip
        quiet = ollamas.generate(**asked, think=False)
        assert (quiet.thinking, quiet.response) == (None, "" if channel == "analysis" else text)


def test_swarm_gradients_equal_local(distributed, local):
    model, _ = distributed
    ids = token_ids(local.config.get_text_config().vocab_size, seed=2)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    model(inputs_embeds=embeds, labels=ids).loss.backward()
    local_embeds = local.get_input_embeddings()(ids).detach().requires_grad_()
    local(inputs_embeds=local_embeds, labels=ids).loss.backward()
    assert embeds.grad.abs().sum() > 0 and relative_error(embeds.grad, local_embeds.grad) <= ATOL


def test_deep_prompts_equal_local_reference(path, distributed, local):
    _, swarm = distributed
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, tuning_mode="deep_ptune",
                                                            pre_seq_len=3)  # fmt: skip
    with torch.no_grad():
        model.prompts.prefix.normal_(0, 0.5)
        model.prompts.deep.normal_(0, 0.5)
    ids = token_ids(local.config.get_text_config().vocab_size, rows=1, length=20, seed=3)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()

    # transformers with the prompt in front and each layer's deep prompt added to the prefix positions before it
    prefix, deep = (t.detach().clone().requires_grad_() for t in (model.prompts.prefix, model.prompts.deep))

    def add_prompt(module, args, kwargs, index):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return (torch.cat([hidden[:, :3] + deep[index], hidden[:, 3:]], dim=1), *args[1:]), kwargs

    hooks = [layer.register_forward_pre_hook(partial(add_prompt, index=i), with_kwargs=True)
             for i, layer in enumerate(local.get_decoder().layers)]  # fmt: skip
    try:
        embeds = torch.cat([prefix[None], local.get_input_embeddings()(ids)], dim=1)
        logits = local(inputs_embeds=embeds).logits[:, 3:]
    finally:
        for hook in hooks:
            hook.remove()
    local.loss_function(logits=logits, labels=ids, vocab_size=local.config.get_text_config().vocab_size).backward()
    assert (out.logits - logits).abs().max() <= ATOL
    assert relative_error(model.prompts.deep.grad, deep.grad) <= ATOL
    assert relative_error(model.prompts.prefix.grad, prefix.grad) <= ATOL
    model.sequence.close()


def peft_layer(peft_model, family, block: int, module: str):
    return peft_model.get_submodule(f"base_model.model.{family.layer_module_prefix(block)}{family.lora_paths[module]}")


def test_client_lora_equals_local_peft(path, distributed, local):
    _, swarm = distributed
    model_type, family = load_config(path).model_type, family_of(load_config(path))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS.get(model_type, DEFAULT_TARGETS))
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, lora=config)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), config)
    generator = torch.Generator().manual_seed(4)
    for (block, module), (A, B) in zip(model.lora.keys, model.lora.pairs()):
        A.data.normal_(0, 0.2, generator=generator), B.data.normal_(0, 0.2, generator=generator)
        layer = peft_layer(peft_model, family, block, module)
        layer.lora_A["default"].weight.data.copy_(A.data)
        layer.lora_B["default"].weight.data.copy_(B.data)
    ids = token_ids(local.config.get_text_config().vocab_size, seed=5)
    out, expected = model(input_ids=ids, labels=ids), peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    expected.loss.backward()
    assert (out.logits - expected.logits).abs().max() <= ATOL
    block, module = model.lora.keys[-1]
    layer = peft_layer(peft_model, family, block, module)
    assert relative_error(model.lora.pairs()[-1][0].grad, layer.lora_A["default"].weight.grad) <= ATOL
    model.sequence.close()
    if model_type == "mixtral":
        with pytest.raises(ValueError, match=r"\['w1'\] are not in a block; choose from q_proj, k_proj, v_proj, o_proj"):
            AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, lora=LoraConfig(r=2, target_modules=["w1"]))


# Qwen3-MoE's: the experts' MLP at transformers' default size (it reads none from such files), the weights of the top k
# renormalised (llama.cpp always does), every layer sparse (llama.cpp's files cannot say otherwise)
QWEN3_MOE_GGUF = dict(hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=128, intermediate_size=768, num_experts=4,
                      experts_per_token=2, num_layers=2, norm_topk_prob=True)  # fmt: skip


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe", "phi3"])
def test_qwen_gguf_files_load_as_their_checkpoints(family, checkpoints, tmp_path):
    """llama.cpp's qwen2/qwen3/qwen3moe/phi3 files (q/k rows not permuted, biases, q/k norms, the experts' layers as
    one tensor each, Phi-3's fused layers); transformers reads no head_dim from qwen3's, so it is its default of 128,
    as in the real models."""
    kwargs = {"qwen3": {"num_heads": 2, "num_kv_heads": 1, "head_dim": 128}, "qwen3_moe": QWEN3_MOE_GGUF}
    path = checkpoints(family, **kwargs.get(family, {}))
    gguf_file = make_tiny_gguf(path, tmp_path / f"{family}.gguf", "F16")
    config = load_config(gguf_file)
    expected = (family, load_config(path).head_dim, family in ("qwen3", "qwen3_moe"))
    assert (config.model_type, config.head_dim, config.qk_norm) == expected
    blocks = load_blocks(gguf_file, config, 0, config.num_hidden_layers, torch.float32, progress=False)
    parts = load_client_parts(gguf_file, config, torch.float32)
    ids = token_ids(config.vocab_size, length=12)
    x = parts.embed(ids)
    with torch.no_grad():
        for block in blocks:
            x = block(x, torch.arange(12).expand(2, -1))
        expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
    assert (parts.logits(x) - expected).abs().max() <= 0.05 * expected.abs().max()  # F16 weights: close, not equal
    assert (parts.logits(x) - load_reference_model(gguf_file)(ids).logits).abs().max() <= ATOL
    if family == "qwen3_moe":  # experts of another size: transformers' config of the file cannot hold them, said so
        other = make_tiny_gguf(checkpoints(family, **{**QWEN3_MOE_GGUF, "intermediate_size": 256}), tmp_path / "o.gguf")
        with pytest.raises(UnsupportedModelError, match="block 0's tensors do not fit the model's config: size mism"):
            load_blocks(other, load_config(other), 0, 1, torch.float32, progress=False)
