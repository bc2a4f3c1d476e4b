"""Tiny random checkpoints with a real tokenizer, for tests and the demo (no hub can be reached here), and the same
as GGUF files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BloomConfig,
    FalconConfig,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
)

from safetensors.torch import load_file, save_file

from meadow.client.harmony import MARKUP
from meadow.models.gguf import (
    LLAMA_TENSOR_NAMES,
    QKV_REGROUPED,
    ROTARY_PERMUTED,
    TENSOR_NAMES,
    group_qkv_heads,
    permute_rotary_rows,
)
from meadow.models.gpt_oss import pack_mxfp4

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "bloom", "falcon", "gemma", "gemma2", "gemma3_text",
            "gemma3", "phi3", "qwen3_moe", "gpt_oss")  # fmt: skip
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, Llama's order for the first three
# gpt_oss checkpoints speak harmony as gpt-oss does (client/harmony.py): its markup tokens, and a chat template of that
# form (ours, far shorter than OpenAI's); the template variable `channel` opens the reply's message of that channel, as
# a prompt that writes the reply's header does; `reasoning_effort` goes where gpt-oss's template puts it; the tools, and
# calls and their results in earlier turns, as harmony writes them
HARMONY_TEMPLATE = (
    "<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}<|end|>"
    "{% if tools %}<|start|>developer<|message|># Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|end|>"
    "{% endif %}{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}{% for c in m.tool_calls %}"
    "<|start|>assistant<|channel|>commentary to=functions.{{ c.function.name }} <|constrain|>json<|message|>"
    "{{ c.function.arguments | tojson }}<|call|>{% endfor %}"
    "{% elif m.role == 'tool' %}<|start|>functions to=assistant<|channel|>commentary<|message|>{{ m.content }}<|end|>"
    "{% else %}<|start|>{{ 'developer' if m.role == 'system' else m.role }}"
    "{% if m.role == 'assistant' %}<|channel|>final{% endif %}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant"
    "{% if channel is defined %}<|channel|>{{ channel }}<|message|>{% endif %}{% endif %}"
)


def make_tiny_checkpoint(
    path: str | Path,
    family: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    max_shard_size: str | None = None,
    rope_scaling: dict | None = None,
    sliding_window: int | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    head_dim: int | None = None,
    tie_word_embeddings: bool | None = None,
    attention_bias: bool = False,
    num_experts: int = 4,
    experts_per_token: int = 2,
    fused_experts: bool = False,
    mxfp4_experts: bool = False,
    **options,
) -> Path:
    """Save a randomly initialised HF model of `family` and its tokenizer in `path`; return the path.

    qwen2, bloom and falcon have tied embeddings (`tie_word_embeddings` defaults to that, untied for the others).
    `head_dim` (default hidden_size / num_heads) and `attention_bias` apply to qwen3 and the gemmas. `rope_scaling` is
    an HF rope dict such as {"rope_type": "llama3", "factor": 8.0, ...}. `sliding_window` applies to mistral, mixtral,
    phi3, gpt_oss, gemma2 and gemma3_text (whose `rope_scaling` scales its global layers' rope only).
    mixtral, qwen3_moe and gpt_oss have `num_experts` experts, `experts_per_token` per token (qwen3_moe's options: its
    norm_topk_prob, mlp_only_layers, decoder_sparse_step). Mixtral's are saved in the classic layout that transformers
    writes, or with `fused_experts` (one file only) in transformers 5's fused one (see models/mixtral.py); gpt_oss's
    with `mxfp4_experts` (one file only) in MXFP4, as OpenAI released gpt-oss (see models/gpt_oss.py).
    `vocab_size` defaults to the tokenizer's size; a larger one (a real model's shape, for benchmarks)
    has ids the tokenizer decodes to nothing. `options` are further fields of the family's HF config, such as
    Falcon's new_decoder_architecture, alibi, bias or parallel_attn, or Gemma's layer_types, query_pre_attn_scalar,
    attn_logit_softcapping or final_logit_softcapping (bloom ignores intermediate_size and num_kv_heads:
    its MLP is 4 x hidden and its heads are all kv heads).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if options and family not in ("bloom", "falcon", "gemma2", "gemma3_text", "gemma3", "qwen3_moe", "gpt_oss"):
        families = "bloom, falcon, gemma2, gemma3_text, gemma3, qwen3_moe and gpt_oss"
        raise ValueError(f"options {sorted(options)} are for {families} checkpoints only")
    path = Path(path)
    tokenizer = make_tokenizer(harmony=family == "gpt_oss")
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    common = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **(rope_scaling or {})},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tied = family in ("qwen2", "bloom", "falcon", "gemma", "gemma2", "gemma3_text", "gemma3")
    common["tie_word_embeddings"] = tied if tie_word_embeddings is None else tie_word_embeddings
    if family == "llama":
        config = LlamaConfig(**common)
    elif family == "mistral":
        config = MistralConfig(**common, sliding_window=sliding_window)
    elif family == "qwen2":
        config = Qwen2Config(**common)
    elif family == "qwen3":
        config = Qwen3Config(**common, head_dim=head_dim or hidden_size // num_heads, attention_bias=attention_bias)
    elif family == "mixtral":
        config = MixtralConfig(**common, sliding_window=sliding_window, num_local_experts=num_experts,
                               num_experts_per_tok=experts_per_token)  # fmt: skip
    elif family == "qwen3_moe":  # intermediate_size is the experts'; the dense layers' (if any) MLP is twice that
        config = Qwen3MoeConfig(**{**common, "intermediate_size": 2 * intermediate_size}, attention_bias=attention_bias,
                                head_dim=head_dim or hidden_size // num_heads,
                                num_experts=num_experts, num_experts_per_tok=experts_per_token,
                                moe_intermediate_size=intermediate_size, **options)  # fmt: skip
    elif family == "gpt_oss":  # its own yarn rope (transformers' defaults); every other layer sliding
        rest = {k: v for k, v in common.items() if k != "rope_parameters"}
        config = GptOssConfig(**rest, head_dim=head_dim or hidden_size // num_heads, num_local_experts=num_experts,
                              num_experts_per_tok=experts_per_token,
                              **({"sliding_window": sliding_window} if sliding_window else {}), **options)  # fmt: skip
    elif family == "phi3":
        config = Phi3Config(**common, sliding_window=sliding_window)
    elif family in ("gemma", "gemma2", "gemma3_text", "gemma3"):
        window = {"sliding_window": sliding_window} if family != "gemma" and sliding_window else {}
        gemma = dict(head_dim=head_dim or hidden_size // num_heads, attention_bias=attention_bias, **window)
        if family == "gemma":
            config = GemmaConfig(**common, **gemma)
        elif family == "gemma2":
            config = Gemma2Config(**common, **gemma, **options)
        else:  # rope parameters by layer type: the global layers' may be scaled (rope_scaling), the sliding ones' plain
            rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6, **(rope_scaling or {})},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}  # fmt: skip
            config = Gemma3TextConfig(**{**common, "rope_parameters": rope}, **gemma, **options)
        if family == "gemma3":  # the image model: that text model and a tiny vision tower nobody asks for here
            vision = SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
            config = Gemma3Config(text_config=config, vision_config=vision, mm_tokens_per_image=4,
                                  tie_word_embeddings=config.tie_word_embeddings)  # fmt: skip
    elif family == "bloom":
        names = ("vocab_size", "hidden_size", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
        config = BloomConfig(**{k: common[k] for k in names}, n_layer=num_layers, n_head=num_heads, **options)
    else:
        names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                 "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")  # fmt: skip
        # only the new decoder architecture groups kv heads (transformers' other layouts break on num_kv_heads)
        kv_heads = num_kv_heads if options.get("new_decoder_architecture") else num_heads
        options = {"num_kv_heads": kv_heads, "ffn_hidden_size": intermediate_size, **options}
        config = FalconConfig(**{k: common[k] for k in names}, **options)
    if fused_experts and (family != "mixtral" or max_shard_size):
        raise ValueError("fused_experts applies to an unsharded mixtral checkpoint only")
    if mxfp4_experts and (family != "gpt_oss" or max_shard_size):
        raise ValueError("mxfp4_experts applies to an unsharded gpt_oss checkpoint only")

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # HF's init leaves biases at 0 and norm scales at 1, which would let a test miss a bias or a norm;
        # std 0.1 also makes attention far from uniform, so a wrong mask or rotary shows up in the numbers
        centre = 0.0 if family.startswith("gemma") else 1.0  # Gemma's norms scale by (1 + weight)
        for name, p in model.named_parameters():
            if ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                p.normal_(centre, 0.1)
            else:
                p.normal_(0.0, 0.1)
    if family == "gpt_oss":  # a reply ends at harmony's <|return|> (the answer) or <|call|> (a tool call), as gpt-oss's
        ends = tokenizer.convert_tokens_to_ids(["<|return|>", "<|call|>"])
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *ends]
    model.to(dtype).save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if fused_experts:
        fuse_experts(path / "model.safetensors", num_layers, num_experts)
    if mxfp4_experts:
        pack_experts(path)
    tokenizer.save_pretrained(path)
    return path


def fuse_experts(file: Path, num_layers: int, num_experts: int) -> None:
    """Rewrite a Mixtral safetensors file from the classic expert layout to transformers 5's fused one."""
    tensors = load_file(file)
    for layer in range(num_layers):
        old, new = f"model.layers.{layer}.block_sparse_moe.", f"model.layers.{layer}.mlp."
        w1, w2, w3 = ([tensors.pop(f"{old}experts.{e}.{w}.weight") for e in range(num_experts)] for w in ("w1", "w2", "w3"))
        tensors[f"{new}experts.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(w1, w3)])
        tensors[f"{new}experts.down_proj"] = torch.stack(w2)
        tensors[f"{new}gate.weight"] = tensors.pop(f"{old}gate.weight")
    save_file(tensors, file, metadata={"format": "pt"})


# the 16 values of a 4-bit E2M1 float (OCP's MX formats), by code: sign bit, 2 exponent bits, 1 mantissa bit
GGUF_ARCHITECTURE = {"qwen3_moe": "qwen3moe"}  # llama.cpp's name where it is not transformers' model_type
def pack_experts(path: Path) -> None:
    """Rewrite a GPT-OSS checkpoint's expert weights in MXFP4, as OpenAI's release stores them: for each (E, in, out)
    tensor X, `X_blocks` (E, out, in / 32, 16) holding two 4-bit codes a byte (the even column in the low nibble) and
    `X_scales` (E, out, in / 32), each group of 32 values' power of two plus 127; config.json says so."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    for name in [name for name in tensors if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = pack_mxfp4(tensors.pop(name))
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                     "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))


def make_tokenizer(harmony: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer over printable ASCII (plus newline and tab), with <unk> for other bytes; with `harmony`,
    also harmony's markup as special tokens and HARMONY_TEMPLATE.

    Restricting the vocabulary to printable characters means that whatever a random model generates
    decodes to readable text.
    """
    # ByteLevel's alphabet (GPT-2's byte -> char map) is the identity on "!".."~" and chr(256 + b) for bytes 0..32
    chars = [chr(256 + b) for b in (ord("\t"), ord("\n"), ord(" "))] + [chr(b) for b in range(ord("!"), ord("~") + 1)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(chars))}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if harmony:
        tokenizer.add_tokens(list(MARKUP), special_tokens=True)
        tokenizer.chat_template = HARMONY_TEMPLATE
    return tokenizer


# gguf-py cannot quantize K-quants, so make_tiny_gguf fills their matrices with random blocks; these f16 scales (byte
# offset in a block -> value) keep the weights small and roughly centred, like a trained model's
RANDOM_BLOCK_SCALES = {
    "Q4_K": {0: 2e-4, 2: 1.5e-3},  # d, dmin: w = d * scale * q - dmin * min, q in 0..15, scale and min in 0..63
    "Q5_K": {0: 1e-4, 2: 1.5e-3},  # the same with q in 0..31
    "Q6_K": {208: 4e-5},  # d: w = d * scale * (q - 32), scale in -128..127, q in 0..63
}


def make_tiny_gguf(
    checkpoint: str | Path, path: str | Path, quant: str = "F32", *, architecture: str | None = None, seed: int = 0
) -> Path:
    """Write a Llama checkpoint folder (such as make_tiny_checkpoint's) as a GGUF file, as llama.cpp's
    convert_hf_to_gguf does: its tensor names, q/k rows permuted for GGML's rotary, norms in F32, every matrix in
    `quant`, and the tokenizer (byte-level BPE) and chat template in the metadata. Returns the path.

    Types gguf-py can dequantize but not quantize (the K-quants) get random blocks: such a file is a random model
    of the checkpoint's shapes (rows must be multiples of 256). Types it cannot dequantize either get random bytes,
    and `architecture` other than the checkpoint's mislabels the file: both only make files that loaders must refuse.
    Qwen2 and Qwen3 checkpoints are written as llama.cpp writes them too: their q/k rows unpermuted, with biases and
    q/k norms (transformers reads no head_dim from such files: Qwen3's must be its default, 128). BLOOM's fused
    query_key_value rows are regrouped as [all q | all k | all v], as llama.cpp does; Falcon must be Falcon-7B's layout.
    """
    checkpoint, path = Path(checkpoint), Path(path)
    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    qtype, rng = GGMLQuantizationType[quant], np.random.default_rng(seed)
    writer = GGUFWriter(path, architecture or GGUF_ARCHITECTURE.get(config.model_type, config.model_type))
    writer.add_name("tiny")
    if config.model_type in ("bloom", "falcon"):
        add_alibi_family_metadata(writer, config)
    else:
        add_llama_metadata(writer, config)
    add_tokenizer(writer, AutoTokenizer.from_pretrained(checkpoint, local_files_only=True))

    state = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).state_dict()
    for name in [name for name in state if name.endswith("mlp.experts.gate_up_proj")]:  # Qwen3-MoE's, as llama.cpp
        gate, up = state.pop(name).chunk(2, dim=1)  # (E, I, H) each
        base = name.removesuffix("gate_up_proj")
        state.update({f"{base}gate_proj.weight": gate, f"{base}up_proj.weight": up,
                      f"{base}down_proj.weight": state.pop(f"{base}down_proj")})  # fmt: skip
    block_names, layer_prefix, model_names = TENSOR_NAMES.get(config.model_type, LLAMA_TENSOR_NAMES)
    to_gguf = {hf: name for name, hf in {**model_names, **block_names}.items()}
    layers = layer_prefix.removesuffix("{}.")
    for hf_name, weight in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied model's file has no output.weight (llama.cpp writes BLOOM's, a copy: readers ignore it)
        module, _, suffix = hf_name.rpartition(".")
        if module.startswith(layers):
            index, inner = module.removeprefix(layers).split(".", 1)
            gguf_name = f"blk.{index}.{to_gguf[inner]}.{suffix}"
        else:
            gguf_name = f"{to_gguf[module]}.{suffix}"
        if config.model_type in ROTARY_PERMUTED and ".attn_q." in gguf_name:
            weight = permute_rotary_rows(weight, config.num_attention_heads)
        elif config.model_type in ROTARY_PERMUTED and ".attn_k." in gguf_name:
            weight = permute_rotary_rows(weight, config.num_key_value_heads)
        elif config.model_type in QKV_REGROUPED and ".attn_qkv." in gguf_name:
            weight = group_qkv_heads(weight, config.num_attention_heads)
        if weight.ndim == 1:
            writer.add_tensor(gguf_name, weight.numpy())
        else:
            writer.add_tensor(gguf_name, quantized(weight.numpy(), qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_llama_metadata(writer: GGUFWriter, config: PreTrainedConfig) -> None:
    """Llama's, Qwen2's, Qwen3's, Qwen3-MoE's and Phi-3's metadata, as llama.cpp writes it."""
    rope_type = config.rope_parameters.get("rope_type", "default")
    if config.model_type not in ROTARY_PERMUTED | {"qwen2", "qwen3", "qwen3_moe", "phi3"} or rope_type != "default":
        raise ValueError("make_tiny_gguf writes Llama, Qwen2, Qwen3, Qwen3-MoE, Phi-3, BLOOM and Falcon-7B checkpoints "
                         "without rope scaling only")  # fmt: skip
    if config.model_type == "qwen3_moe":  # transformers reads no moe_intermediate_size from such files: its default
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def add_alibi_family_metadata(writer: GGUFWriter, config: PreTrainedConfig) -> None:
    """BLOOM's and Falcon's metadata, as llama.cpp writes it. transformers reads Falcon files as Falcon-7B's layout
    (multi-query, parallel attention + MLP, rotary, no biases, tied head, 4 x hidden MLP): only that is written."""
    if config.model_type == "falcon":
        falcon_7b = config.multi_query and config.parallel_attn and not (
            config.new_decoder_architecture or config.alibi or config.bias
        )
        if not falcon_7b or not config.tie_word_embeddings or config.ffn_hidden_size != 4 * config.hidden_size:
            raise ValueError("make_tiny_gguf writes Falcon-7B's layout only (transformers reads no other Falcon GGUF)")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_head_count_kv(1)
    else:
        writer.add_context_length(2048)
        writer.add_head_count_kv(config.num_attention_heads)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(4 * config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_vocab_size(config.vocab_size)


def add_tokenizer(writer: GGUFWriter, tokenizer: PreTrainedTokenizerFast) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" tokenizer metadata."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if i in special else TokenType.NORMAL for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])  # none: skipped ...
    writer.add_token_scores([0.0] * len(tokens))  # ... and then transformers derives merges from the vocabulary
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(tokenizer("a").input_ids[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def quantized(weight: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """`weight` (rows, columns) in GGUF's encoding of `qtype`, or random blocks where gguf-py cannot quantize it."""
    try:
        return quantize(weight, qtype)
    except NotImplementedError:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        rows, columns = weight.shape
        if columns % block_size:
            raise ValueError(f"{qtype.name} needs rows of a multiple of {block_size} values, not {columns}") from None
        blocks = rng.integers(0, 256, (rows, columns // block_size, type_size), dtype=np.uint8)
        for offset, scale in RANDOM_BLOCK_SCALES.get(qtype.name, {}).items():
            blocks[..., offset : offset + 2] = np.full(blocks.shape[:2], scale, np.float16)[..., None].view(np.uint8)
        return blocks.reshape(rows, -1)
