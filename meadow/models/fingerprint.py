"""A checkpoint's fingerprint: a short hash that servers announce and clients compare, so that two different
checkpoints that happen to share a swarm name (two folders called "llama-7b") never serve each other's clients.

It hashes the config, every tensor's name, dtype and shape, and a few hundred bytes sampled at the start, middle
and end of every tensor's data: a fine-tune of the same architecture differs there, and nothing reads the whole file
(a few small reads per tensor; for GGUF the metadata and tensor infos as the file spells them).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from meadow.models import gguf

SAMPLE_BYTES = 256  # read at each of three places in every tensor
UNSTABLE_CONFIG_KEYS = ("transformers_version", "_name_or_path")  # differ between saves of the same weights


def checkpoint_fingerprint(path: Path) -> str:
    """16 hex digits naming the weights in `path` (a resolved checkpoint folder or GGUF file), not where they lie."""
    digest = hashlib.sha256()
    if gguf.is_gguf(path):
        _hash_gguf(path, digest)
    else:
        _hash_safetensors(path, digest)
    return digest.hexdigest()[:16]


def _samples(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes read from a tensor of `size` bytes: all of it when small."""
    if size <= 3 * SAMPLE_BYTES:
        return [(0, size)]
    return [(0, SAMPLE_BYTES), ((size - SAMPLE_BYTES) // 2, SAMPLE_BYTES), (size - SAMPLE_BYTES, SAMPLE_BYTES)]


def _hash_safetensors(folder: Path, digest) -> None:
    config = json.loads((folder / "config.json").read_text())
    stable = {key: value for key, value in config.items() if key not in UNSTABLE_CONFIG_KEYS}
    digest.update(json.dumps(stable, sort_keys=True).encode())
    index = folder / "model.safetensors.index.json"
    single = ["model.safetensors"]
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else single
    tensors = []  # (name, dtype, shape, file, absolute start, size), from each file's JSON header
    for name in files:
        with open(folder / name, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
        for tensor, info in header.items():
            if tensor != "__metadata__":
                begin, end = info["data_offsets"]
                tensors.append((tensor, info["dtype"], info["shape"], name, 8 + header_size + begin, end - begin))
    handles = {}
    try:
        for tensor, dtype, shape, name, start, size in sorted(tensors):  # by name: sharding does not matter
            digest.update(json.dumps([tensor, dtype, shape]).encode())
            f = handles.setdefault(name, open(folder / name, "rb"))
            for offset, length in _samples(size):
                f.seek(start + offset)
                digest.update(f.read(length))
    finally:
        for f in handles.values():
            f.close()


def _hash_gguf(path: Path, digest) -> None:
    reader = gguf.open_gguf(path)  # memory-mapped and cached: loading the model opens it anyway
    digest.update(reader.data[: reader.data_offset].tobytes())  # metadata and tensor infos, as the file spells them
    for tensor in sorted(reader.tensors, key=lambda t: t.name):
        data = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        for offset, length in _samples(data.size):
            digest.update(data[offset : offset + length].tobytes())
