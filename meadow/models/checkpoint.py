"""Loading a model: the config, only the tensors of the wanted blocks, the client's parts, the tokenizer.

A model is an HF checkpoint folder (config.json + safetensors), a GGUF file or a folder holding one (see gguf.py),
or a hub id already in the local HF cache. Nothing here touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import constants, snapshot_download
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase

from meadow.models import gguf
from meadow.models.llama import HF_TO_MEADOW, STATIC_ROPE_TYPES, BlockConfig, LlamaBlock, RMSNorm

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one Meadow has block math for."""


def resolve_model_path(model: str | Path) -> Path:
    """A checkpoint folder with config.json, a .gguf file, or the one of a folder without config.json; a model id
    already in the local HF cache is resolved to its snapshot the same way. Never downloads."""
    path = Path(model).expanduser()
    if path.is_file():
        if not gguf.is_gguf(path):
            raise FileNotFoundError(f"{path} is a file but not a .gguf: pass a checkpoint folder or a GGUF file")
        return path.resolve()
    if path.is_dir():
        return model_in_folder(path)
    try:
        snapshot = Path(snapshot_download(str(model), local_files_only=True))
    except Exception as e:  # not a valid repo id, or not cached
        raise FileNotFoundError(
            f"model {str(model)!r} is neither a local folder or .gguf file ({path.resolve()} does not exist) nor in "
            f"the local Hugging Face cache ({constants.HF_HUB_CACHE}); Meadow never downloads, so put the checkpoint "
            f"there first ({type(e).__name__})"
        ) from None
    return model_in_folder(snapshot)


def model_in_folder(path: Path) -> Path:
    """The folder itself when it has config.json, else the one .gguf file in it."""
    if (path / "config.json").is_file():
        return path
    files = sorted(path.glob("*.gguf"))
    if len(files) == 1:
        return files[0].resolve()
    if files:
        raise FileNotFoundError(f"{path} holds several .gguf files ({', '.join(f.name for f in files)}): pass one")
    raise FileNotFoundError(f"{path} has no config.json (an HF checkpoint) and no .gguf file")


def load_config(model: str | Path) -> BlockConfig:
    """The block config of a checkpoint; UnsupportedModelError for architectures without block math here."""
    path = resolve_model_path(model)
    if gguf.is_gguf(path):
        arch = gguf.architecture(path)
        if arch not in gguf.SUPPORTED_GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} of {path} is not supported; supported: "
                f"{', '.join(gguf.SUPPORTED_GGUF_ARCHITECTURES)}"
            )
    else:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} of {path} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
    config = BlockConfig.from_hf(load_hf_config(path))
    if config.hidden_act != "silu":
        raise UnsupportedModelError(f"{path}: hidden_act {config.hidden_act!r} is not supported (only 'silu')")
    if config.rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{path}: rope type {config.rope_type!r} is not supported; supported: {', '.join(STATIC_ROPE_TYPES)}"
        )
    return config


def load_hf_config(model: str | Path, **overrides) -> PreTrainedConfig:
    """The model's transformers config (what `AutoConfig.from_pretrained` gives for a checkpoint folder, or
    transformers' conversion of a GGUF file's metadata)."""
    return AutoConfig.from_pretrained(hf_files(resolve_model_path(model)), local_files_only=True, **overrides)


def load_tokenizer(model: str | Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with its chat template when it has one."""
    return AutoTokenizer.from_pretrained(hf_files(resolve_model_path(model)), local_files_only=True)


def hf_files(path: Path) -> Path:
    """The folder with config.json and tokenizer files: the checkpoint itself, or a GGUF file's converted ones."""
    return gguf.converted_folder(path) if gguf.is_gguf(path) else path


def load_block(
    model: str | Path,
    config: BlockConfig,
    index: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> LlamaBlock:
    """Block `index`, reading only the tensors model.layers.{index}.* from the shard files (or GGUF) that hold them."""
    if not 0 <= index < config.num_hidden_layers:
        raise ValueError(f"block index {index} is out of range: the model has {config.num_hidden_layers} blocks")
    prefix = f"model.layers.{index}."
    tensors = read_tensors(resolve_model_path(model), lambda name: name.startswith(prefix), dtype, device)
    state = {hf_to_meadow(name[len(prefix) :]): t for name, t in tensors.items()}

    with torch.device("meta"):  # no memory until the real tensors are assigned
        block = LlamaBlock(config, layer_idx=index)
    block.load_state_dict(state, strict=True, assign=True)  # strict: a missing or unknown tensor is an error
    return block.requires_grad_(False)  # servers never train their weights


def load_blocks(
    model: str | Path,
    config: BlockConfig,
    start: int,
    end: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[LlamaBlock]:
    """Blocks [start, end), one at a time, so memory follows the span size."""
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"blocks [{start}, {end}) are out of range: the model has {config.num_hidden_layers} blocks")
    indices = tqdm(range(start, end), desc="loading blocks", unit="block", disable=not progress)
    return [load_block(model, config, index, dtype, device) for index in indices]


class ClientParts(nn.Module):
    """What a client holds: token embeddings, the final norm and the LM head; no block weights."""

    def __init__(self, embed_tokens: nn.Embedding, norm: RMSNorm, lm_head: nn.Linear) -> None:
        super().__init__()
        self.embed_tokens, self.norm, self.lm_head = embed_tokens, norm, lm_head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output."""
        return self.lm_head(self.norm(hidden))


def load_client_parts(
    model: str | Path, config: BlockConfig, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> ClientParts:
    """Embeddings, final norm and LM head; the head shares the embedding matrix when the model ties them."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    path = resolve_model_path(model)
    tensors = read_tensors(path, names.__contains__, dtype, device)
    if names - tensors.keys():
        raise ValueError(f"{path} lacks {sorted(names - tensors.keys())}")
    embed = nn.Embedding.from_pretrained(tensors["model.embed_tokens.weight"], freeze=True)
    norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    norm.weight = nn.Parameter(tensors["model.norm.weight"], requires_grad=False)
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
    # tied (Qwen2-style): the head is the embedding matrix, and checkpoints usually omit lm_head.weight
    if config.tie_word_embeddings:
        lm_head.weight = embed.weight
    else:
        lm_head.weight = nn.Parameter(tensors["lm_head.weight"], requires_grad=False)
    return ClientParts(embed, norm, lm_head)


def hf_to_meadow(name: str) -> str:
    """'self_attn.q_proj.weight' -> 'attention.q_proj.weight' (a name inside one layer)."""
    head, _, rest = name.partition(".")
    return f"{HF_TO_MEADOW.get(head, head)}.{rest}"


def read_tensors(
    path: Path, wanted: Callable[[str], bool], dtype: torch.dtype, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """Tensors whose (HF) names satisfy `wanted`, opening only the safetensors files that hold them."""
    if gguf.is_gguf(path):
        return gguf.read_tensors(path, wanted, dtype, device)
    index_file, single_file = path / "model.safetensors.index.json", path / "model.safetensors"
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
    elif single_file.is_file():
        with safe_open(single_file, framework="pt") as f:
            weight_map = {name: single_file.name for name in f.keys()}
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")

    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if wanted(name):
            by_file.setdefault(file, []).append(name)
    tensors = {}
    for file, names in sorted(by_file.items()):
        with safe_open(path / file, framework="pt") as f:
            for name in names:
                # one tensor at a time: peak memory is the wanted tensors plus one in checkpoint dtype
                tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return tensors
