"""Read and write safetensors checkpoints one tensor at a time, without holding (or mapping) a whole checkpoint.

Pruning from disk (sparsefast.models.streamed) reads one decoder layer, prunes it and writes it out before the next is
read. Two pieces make its peak memory about one layer:

- `CheckpointReader` reads a directory's safetensors files (one `model.safetensors` or the shards an
  `model.safetensors.index.json` names) tensor by tensor with plain positioned reads (`os.preadv`) into fresh tensors.
  Nothing is memory-mapped, so pages of the file that were read once do not stay in the process's resident set
  (a mapped file's touched pages count in RSS until it is unmapped).
- `SafetensorsWriter` lays out a file from the names, dtypes and shapes known before any data (the header first),
  then writes each tensor at its offset as it arrives (`os.pwrite`), in any order; `close` checks that every tensor
  was written once. The layout is the one `safetensors.torch.save_file` produces for the same tensors (tensors sorted
  by dtype, largest first, then by name; the JSON header padded with spaces to 8 bytes), so a streamed checkpoint is
  the file a fully-loaded save would write (tests/models/test_safetensors_stream.py compares the bytes).
  `plan_shards` splits a checkpoint into files as transformers' save_pretrained names them (one
  `model.safetensors` up to 50 GB, else `model-0000i-of-0000n.safetensors` and the index).

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of JSON
{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [begin, end]}} with offsets relative to the data
that follows the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors' dtype names; the order is safetensors' own dtype order (its Rust enum), which sorts the tensors of a
# file (descending) after their element size
_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                "I64", "U64")
_TORCH_OF = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
             "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
             "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
             "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64}
_NAME_OF = {v: k for k, v in _TORCH_OF.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 50 * 10**9  # transformers' save_pretrained default max_shard_size ("50GB")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, dtype and shape: what a file's layout needs before its data exists."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor lies in a file: absolute byte offsets [begin, end)."""
    spec: TensorSpec
    file: Path
    begin: int
    end: int


def _dtype_of(name: str, path: Path) -> torch.dtype:
    if name not in _TORCH_OF:
        raise ValueError(f"{path}: tensor dtype {name!r} is not supported by sparsefast's streamed reader; "
                         "prune this checkpoint without --from-disk")
    return _TORCH_OF[name]


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, StoredTensor]]:
    """(metadata, {name: StoredTensor}) of one safetensors file; reads only its header. ValueError for a file that is
    not a complete safetensors file (a header that does not parse, offsets past the end of the file)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (bad header length); download or save it again")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({exc}); download or save it again")
    metadata = header.pop("__metadata__", {}) or {}
    entries = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        spec = TensorSpec(name, _dtype_of(info["dtype"], path), tuple(info["shape"]))
        if end - begin != spec.nbytes or 8 + n + end > size:
            raise ValueError(f"{path}: tensor {name} does not fit the file (truncated?); download or save it again")
        entries[name] = StoredTensor(spec, path, 8 + n + begin, 8 + n + end)
    return metadata, entries


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, or its one model.safetensors."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in dict.fromkeys(weight_map.values())]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class CheckpointReader:
    """The tensors of a safetensors checkpoint directory, read one at a time into fresh CPU tensors (no mmap)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.tensors: dict[str, StoredTensor] = {}
        for file in checkpoint_files(self.directory):
            self.tensors.update(read_header(file)[1])

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def nbytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tensors.values())

    def read(self, name: str) -> torch.Tensor:
        stored = self.tensors[name]
        out = torch.empty(stored.spec.shape, dtype=stored.spec.dtype)
        if out.numel():
            view = _byte_view(out)
            fd = os.open(stored.file, os.O_RDONLY)
            try:
                done = 0
                while done < len(view):
                    n = os.preadv(fd, [view[done:]], stored.begin + done)
                    if n <= 0:
                        raise ValueError(f"{stored.file}: ended inside tensor {name}; download or save it again")
                    done += n
            finally:
                os.close(fd)
        return out


def file_layout(specs: Iterable[TensorSpec]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(header bytes incl. the 8-byte length, {name: (begin, end) relative to the data}) in safetensors' order."""
    ordered = sorted(specs, key=lambda s: (-_DTYPE_ORDER.index(_NAME_OF[s.dtype]), s.name))
    offsets, pos = {}, 0
    header: dict = {"__metadata__": {"format": "pt"}}
    for s in ordered:
        offsets[s.name] = (pos, pos + s.nbytes)
        header[s.name] = {"dtype": _NAME_OF[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class SafetensorsWriter:
    """One safetensors file written tensor by tensor at offsets fixed up front. The file is created exclusively
    (never replaces anything); `close()` raises if a tensor was not written."""

    def __init__(self, path: str | os.PathLike, specs: Sequence[TensorSpec]):
        self.path = Path(path)
        self.specs = {s.name: s for s in specs}
        header, offsets = file_layout(specs)
        self._offsets = {name: (len(header) + b, len(header) + e) for name, (b, e) in offsets.items()}
        self._pending = set(self.specs)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.pwrite(self._fd, header, 0)
        os.ftruncate(self._fd, len(header) + sum(s.nbytes for s in specs))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None or name not in self._pending:
            raise KeyError(f"{self.path.name}: {name} is not a tensor of this file, or was written already")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} does not match the planned "
                             f"{spec.dtype} {spec.shape}")
        view = _byte_view(tensor.detach().to("cpu").contiguous())
        begin = self._offsets[name][0]
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], begin + done)
        self._pending.discard(name)

    def close(self) -> None:
        try:
            if self._pending:
                raise RuntimeError(f"{self.path.name}: {len(self._pending)} tensors were never written, e.g. "
                                   f"{sorted(self._pending)[0]}")
            os.fsync(self._fd)
        finally:
            os.close(self._fd)


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int = MAX_SHARD_BYTES
                ) -> tuple[dict[str, list[TensorSpec]], dict | None]:
    """({file name: its tensors}, the index JSON or None): tensors in the given order fill a file until the next
    would pass max_shard_bytes (a tensor larger than that gets a file of its own), named as save_pretrained names
    them: one model.safetensors, or model-0000i-of-0000n.safetensors and model.safetensors.index.json."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}, None
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
             "weight_map": {s.name: f for f, g in zip(names, groups) for s in g}}
    return dict(zip(names, groups)), index


class CheckpointWriter:
    """The safetensors files (and index) of a checkpoint in `directory`, planned from `specs`, written tensor by
    tensor in any order; `close()` checks every file is complete and writes the index last."""

    def __init__(self, directory: str | os.PathLike, specs: Sequence[TensorSpec],
                 max_shard_bytes: int = MAX_SHARD_BYTES):
        self.directory = Path(directory)
        shards, self._index = plan_shards(specs, max_shard_bytes)
        self._writers: dict[str, SafetensorsWriter] = {}
        self._file_of: dict[str, str] = {}
        for file, group in shards.items():
            self._writers[file] = SafetensorsWriter(self.directory / file, group)
            self._file_of.update({s.name: file for s in group})

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writers[self._file_of[name]].write(name, tensor)

    def write_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.write(name, tensor)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        if self._index is not None:
            (self.directory / INDEX_FILE).write_text(json.dumps(self._index, indent=2, sort_keys=True) + "\n")
