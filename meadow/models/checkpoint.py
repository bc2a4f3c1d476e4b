"""Loading a model: the config, only the tensors of the wanted blocks, the client's parts, the tokenizer.

A model is an HF checkpoint folder (config.json + safetensors), a GGUF file or a folder holding one (see gguf.py),
or a hub id already in the local HF cache. Nothing here touches the network.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from meadow.models import gguf
from meadow.models.client_parts import ClientParts
from meadow.models.config import BlockConfig, UnsupportedModelError, plain_hf_config
from meadow.models.registry import check_gguf_architecture, family_for, family_of

# transformers is imported where it is used: a server that reads a plain config never needs it (~1 s of CPU at start)
if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedTokenizerBase


class ModelNotFound(FileNotFoundError):
    """The checkpoint asked for is not where it was said to be, or is not a whole checkpoint."""


def resolve_model_path(model: str | Path) -> Path:
    """A checkpoint folder with config.json, a .gguf file, or the one of a folder without config.json; a model id
    already in the local HF cache is resolved to its snapshot the same way. Never downloads."""
    path = Path(model).expanduser()
    if path.is_file():
        if not gguf.is_gguf(path):
            raise ModelNotFound(f"{path} is a file but not a .gguf: pass a checkpoint folder or a GGUF file")
        return path.resolve()
    if path.is_dir():
        return model_in_folder(path)
    from huggingface_hub import constants, snapshot_download

    try:
        snapshot = Path(snapshot_download(str(model), local_files_only=True))
    except Exception as e:  # not a valid repo id, or not cached
        raise ModelNotFound(
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
        raise ModelNotFound(f"{path} holds several .gguf files ({', '.join(f.name for f in files)}): pass one")
    raise ModelNotFound(f"{path} has no config.json (an HF checkpoint) and no .gguf file")


def load_config(model: str | Path) -> BlockConfig:
    """The block config of a checkpoint, built by its family; UnsupportedModelError (listing what is supported) for
    architectures or options without block math here."""
    path = resolve_model_path(model)
    try:
        if gguf.is_gguf(path):
            check_gguf_architecture(gguf.architecture(path))
        values = json.loads((hf_files(path) / "config.json").read_text())
        family = family_for(values.get("model_type"))  # before transformers parses it: it may not know the type either
        plain = plain_hf_config(values)
        if plain is not None:
            try:
                return family.config_from_hf(plain)
            except AttributeError:  # a field config.json leaves to transformers' defaults: it reads them below
                pass
        hf = load_hf_config(path)
        return family_for(hf.model_type).config_from_hf(hf)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None


def load_hf_config(model: str | Path, **overrides) -> PreTrainedConfig:
    """The model's transformers config (what `AutoConfig.from_pretrained` gives for a checkpoint folder, or
    transformers' conversion of a GGUF file's metadata)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(hf_files(resolve_model_path(model)), local_files_only=True, **overrides)


def load_tokenizer(model: str | Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with its chat template when it has one."""
    from transformers import AutoTokenizer

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
) -> nn.Module:
    """Block `index`, reading only the tensors of that layer (model.layers.{index}.* for Llama) from the shard files
    (or GGUF) that hold them."""
    if not 0 <= index < config.num_hidden_layers:
        raise ValueError(f"block index {index} is out of range: the model has {config.num_hidden_layers} blocks")
    family = family_of(config)
    prefix = family.layer_tensor_prefix(index)
    tensors = read_tensors(resolve_model_path(model), lambda name: name.startswith(prefix), dtype, device)
    state = family.layer_state({name[len(prefix) :]: t for name, t in tensors.items()}, config)

    with torch.device("meta"):  # no memory until the real tensors are assigned
        block = family.block(config, index)
    try:
        block.load_state_dict(state, strict=True, assign=True)  # strict: a missing or unknown tensor is an error
    except RuntimeError as e:  # the file's tensors and its config disagree (a GGUF file's converted config, say)
        problems = "; ".join(line.strip() for line in str(e).splitlines()[1:3])
        message = f"{model}: block {index}'s tensors do not fit the model's config: {problems}"
        raise UnsupportedModelError(message) from None
    return block.requires_grad_(False)  # servers never train their weights


def load_blocks(
    model: str | Path,
    config: BlockConfig,
    start: int,
    end: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    progress: bool = True,
    prepare: Callable[[nn.Module], nn.Module] = lambda block: block,
) -> list[nn.Module]:
    """Blocks [start, end), one at a time, each `prepare`d (quantized, say) before the next is read, so memory follows
    the span size."""
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"blocks [{start}, {end}) are out of range: the model has {config.num_hidden_layers} blocks")
    indices = tqdm(range(start, end), desc="loading blocks", unit="block", disable=not progress)
    return [prepare(load_block(model, config, index, dtype, device)) for index in indices]


def load_client_parts(
    model: str | Path, config: BlockConfig, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> ClientParts:
    """What the client runs: embeddings, the family's norms and LM head (tied to the embeddings if the model ties them)."""
    path = resolve_model_path(model)

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        tensors = read_tensors(path, set(names).__contains__, dtype, device)
        if set(names) - tensors.keys():
            raise ValueError(f"{path} lacks {sorted(set(names) - tensors.keys())}")
        return tensors

    return family_of(config).load_client_parts(read, config)


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
        raise ModelNotFound(f"{path} has neither model.safetensors nor model.safetensors.index.json")

    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if wanted(name):
            by_file.setdefault(file, []).append(name)
    tensors = {}
    for file, names in sorted(by_file.items()):
        with safe_open(path / file, framework="pt") as f:
            for name in names:
                # one tensor at a time: peak memory is the wanted tensors plus one in checkpoint dtype; packed
                # integers (GPT-OSS's MXFP4 experts) keep theirs, for the family to unpack
                tensor = f.get_tensor(name)
                tensors[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    return tensors


@dataclass(frozen=True)
class ModelFacts:
    """What a model's files tell of it (as Ollama's /api/tags and /api/show report a model)."""

    format: str  # "gguf" or "safetensors"
    parameters: int
    quantization: str  # how most parameters are stored: "Q4_1", "Q4_K_M", "BF16", "F32"...
    size: int  # bytes on disk

    @property
    def parameter_size(self) -> str:
        """The count as a person reads it: "134.52M", "7.2B"."""
        for scale, unit, digits in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
            if self.parameters >= scale:
                return f"{self.parameters / scale:.{digits}f}".rstrip("0").rstrip(".") + unit
        return str(self.parameters)


def model_facts(model: str | Path) -> ModelFacts:
    """The format, parameter count, storage type and size of `model`'s files, from their headers only."""
    path = resolve_model_path(model)
    if gguf.is_gguf(path):
        return ModelFacts("gguf", *gguf.storage(path), path.stat().st_size)
    index_file = path / "model.safetensors.index.json"
    # the index's shards (a folder may hold other files too: Mistral's consolidated.safetensors, say)
    shards = ["model.safetensors"]
    if index_file.is_file():
        shards = json.loads(index_file.read_text())["weight_map"].values()
    files = [path / name for name in sorted(set(shards))]
    by_dtype: dict[str, int] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                by_dtype[part.get_dtype()] = by_dtype.get(part.get_dtype(), 0) + math.prod(part.get_shape())
    kind = max(by_dtype, key=by_dtype.get, default="")
    return ModelFacts("safetensors", sum(by_dtype.values()), kind, sum(file.stat().st_size for file in files))
