"""Loading from a GGUF file (llama.cpp's format): tensors dequantized one at a time under HF names, and the config
and tokenizer that transformers converts from the file's metadata, cached under MEADOW_HOME.

gguf-py's GGUFReader memory-maps the file, so reading a span's tensors touches only their bytes. Its parse of the
metadata makes a numpy view per string (the whole vocabulary: ~2 s for a 49k-token model); loading blocks needs none of
the vocabulary, so Meadow's reader skips the contents of string arrays, and a process opens each file once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import shutil
import struct
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, LlamaFileType
from gguf.quants import dequantize

from meadow.home import meadow_home
from meadow.models.registry import SUPPORTED_GGUF_ARCHITECTURES  # noqa: F401  (re-exported: the llama.cpp names Meadow reads)

# llama.cpp tensor names -> HF ones: inside one block (blk.N. -> model.layers.N.), and outside the blocks
BLOCK_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",  # Qwen3-MoE: the router, and every expert's layers as one (experts, out, in) tensor
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
# architectures whose q/k rows llama.cpp's converter permutes for GGML's rotary (not Qwen2/Qwen3's)
ROTARY_PERMUTED = {"llama"}
MODEL_TENSOR_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# BLOOM and Falcon keep transformers' module names under transformer.h.N. (gguf-py's tensor_mapping.py)
ALIBI_BLOCK_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attention.query_key_value",
    "attn_output": "self_attention.dense",
    "ffn_norm": "post_attention_layernorm",  # BLOOM's; Falcon-7B's layout (the one transformers reads) has none
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}
ALIBI_MODEL_TENSOR_NAMES = {
    "token_embd": "transformer.word_embeddings",
    "token_embd_norm": "transformer.word_embeddings_layernorm",  # BLOOM
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
# architecture -> (names inside block N, its HF prefix, names outside the blocks); llama-style ones are the default
TENSOR_NAMES = {
    arch: (ALIBI_BLOCK_TENSOR_NAMES, "transformer.h.{}.", ALIBI_MODEL_TENSOR_NAMES) for arch in ("bloom", "falcon")
}
LLAMA_TENSOR_NAMES = (BLOCK_TENSOR_NAMES, "model.layers.{}.", MODEL_TENSOR_NAMES)
# Phi-3's fused layers, as llama.cpp keeps them: q, k and v rows in one tensor, and the MLP's gate and up rows in ffn_up
TENSOR_NAMES["phi3"] = (
    {**BLOCK_TENSOR_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}, *LLAMA_TENSOR_NAMES[1:]
)
# architectures whose fused query_key_value rows llama.cpp's converter turns from HF's per-head [q, k, v] into
# [all q | all k | all v] (Falcon-7B's multi-query layout is that already: llama.cpp's Falcon reorder changes
# nothing there, and transformers undoes none)
QKV_REGROUPED = {"bloom"}


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf"


class BlocksReader(GGUFReader):
    """gguf-py's reader without the items of string arrays (the vocabulary, the merges): they are skipped, not parsed,
    and named in `skipped`; a numeric array is one view (gguf-py makes one per item). Scalars, tensor infos and tensor
    data are gguf-py's own."""

    def __init__(self, path: Path):
        super().__init__(path)
        # a string array with items but no data indices is one this reader skipped
        self.skipped = {
            name for name, field in self.fields.items()
            if field.types == [GGUFValueType.ARRAY, GGUFValueType.STRING] and not field.data
        }  # fmt: skip

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":  # (a file of the other byte order: as gguf-py)
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, count = struct.unpack_from("<IQ", self.data, orig_offs)
        head = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
        types = [GGUFValueType.ARRAY, GGUFValueType(item_type)]
        if item_type in self.gguf_scalar_to_np and count > 0:  # one view of all items, where gguf-py makes one each
            items = self._get(orig_offs + 12, self.gguf_scalar_to_np[item_type], count)
            return 12 + int(items.nbytes), [*head, items], [2], types
        if item_type != GGUFValueType.STRING or count == 0:
            return super()._get_field_parts(orig_offs, raw_type)
        offset = orig_offs + 12
        for _ in range(count):  # each string is its uint64 length, then its bytes
            offset += 8 + struct.unpack_from("<Q", self.data, offset)[0]
        return offset - orig_offs, head, [], types


@lru_cache(maxsize=8)
def open_gguf(path: Path) -> BlocksReader:
    """The file's reader (memory-mapped), opened once per process."""
    return BlocksReader(path)


def metadata(path: Path, key: str, default=None):
    """One metadata value of the file ('general.architecture', 'llama.block_count', ...); not a string array."""
    reader = open_gguf(path)
    if key in reader.skipped:
        raise KeyError(f"{key} is a string array, which Meadow's GGUF reader skips (read it with gguf.GGUFReader)")
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def architecture(path: Path) -> str:
    return metadata(path, "general.architecture")


def storage(path: Path) -> tuple[int, str]:
    """The file's parameter count and how most of them are stored, as llama.cpp names it ("Q4_K_M", "F16"...)."""
    reader = open_gguf(path)
    by_type: dict[str, int] = {}
    for tensor in reader.tensors:
        by_type[tensor.tensor_type.name] = by_type.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
    file_type = metadata(path, "general.file_type")
    try:  # the converter's word for the whole file (a Q4_K_M file holds Q4_K and Q6_K tensors)
        kind = LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:  # none, or one this gguf-py does not know: the type most parameters have
        kind = max(by_type, key=by_type.get, default="")
    return sum(by_type.values()), kind


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (BLOOM and Falcon: 'transformer.h.3. ...');
    None for tensors Meadow does not use."""
    block_names, layer_prefix, model_names = TENSOR_NAMES.get(arch, LLAMA_TENSOR_NAMES)
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, index, part = base.split(".", 2)
        name = block_names.get(part)
        return f"{layer_prefix.format(index)}{name}.{suffix}" if name else None
    name = model_names.get(base)
    return f"{name}.{suffix}" if name else None


def read_tensors(
    path: Path, wanted: Callable[[str], bool], dtype: torch.dtype, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """Tensors whose HF names satisfy `wanted`, dequantized one at a time (peak memory: the wanted tensors plus one
    in float32), q/k rows back in HF's rotary layout."""
    reader, arch = open_gguf(path), architecture(path)
    permuted = arch in ROTARY_PERMUTED
    num_heads = metadata(path, f"{arch}.attention.head_count")
    num_kv_heads = metadata(path, f"{arch}.attention.head_count_kv", num_heads)
    tensors = {}
    for tensor in reader.tensors:
        if arch == "falcon" and ".attn_norm_2." in tensor.name:
            raise ValueError(
                f"{path}: a Falcon GGUF file of the new decoder architecture (Falcon-40B/180B: ln_attn and ln_mlp), "
                "which transformers cannot read either; Meadow reads Falcon-7B's layout"
            )
        name = hf_tensor_name(tensor.name, arch)
        if name is None or not wanted(name):
            continue
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ValueError(
                f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which gguf-py cannot "
                "dequantize; convert the file to a supported type such as Q4_K, Q6_K, Q8_0 or F16"
            ) from None
        weight = torch.from_numpy(np.array(weights))  # a copy: the memory map is read-only
        if permuted and ".self_attn.q_proj." in name:
            weight = unpermute_rotary_rows(weight, num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            weight = unpermute_rotary_rows(weight, num_kv_heads)
        elif arch in QKV_REGROUPED and ".query_key_value." in name:
            weight = interleave_qkv_heads(weight, num_heads)
        tensors[name] = weight.to(device=device, dtype=dtype)
    return tensors


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf permutation of q/k rows: it interleaves the two rotary halves of each
    head (GGML's rotary pairs neighbours; HF's rotate_half pairs i with i + head_dim / 2)."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def permute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's permutation of q/k rows (HF -> GGUF), for writing test files."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def interleave_qkv_heads(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's regrouping of BLOOM's query_key_value rows (weight or bias): [all q | all k | all v] back to
    HF's per-head [q, k, v] (what transformers' BloomTensorProcessor does)."""
    return weight.reshape(3, num_heads, -1, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)


def group_qkv_heads(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's regrouping of BLOOM's query_key_value rows (HF -> GGUF), for writing test files."""
    return weight.reshape(num_heads, 3, -1, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)


def converted_folder(path: Path) -> Path:
    """A folder with the config.json and tokenizer files that transformers converts from the file's metadata.

    transformers' conversion parses the whole file with gguf-py (~2 s for the config, as much again for the
    tokenizer), so it is done once per file and kept under $MEADOW_HOME/gguf, keyed by the file's size and mtime
    and the transformers version; clients and servers then load plain HF files in milliseconds.
    """
    stat = path.stat()
    version = importlib.metadata.version("transformers")  # not transformers.__version__: importing it takes ~0.5 s
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{version}".encode()).hexdigest()[:16]
    cache = meadow_home() / "gguf"
    folder = cache / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # servers starting together convert once; the others wait for it
        if not (folder / "config.json").is_file():
            from transformers import AutoConfig, AutoTokenizer

            tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{folder.name}-"))
            try:
                for auto in (AutoConfig, AutoTokenizer):
                    auto.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True).save_pretrained(tmp)
                tmp.rename(folder)  # atomic: a folder under its final name is complete
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return folder
