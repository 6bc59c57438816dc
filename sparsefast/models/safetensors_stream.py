"""Read and write safetensors checkpoints one tensor at a time, without holding (or mapping) a whole checkpoint.

Pruning from disk (sparsefast.models.streamed) reads one decoder layer, prunes it and writes it out before the next is
read. Two pieces make its peak memory about one layer:

- `CheckpointReader` reads a directory's safetensors files (one `model.safetensors` or the shards an
  `model.safetensors.index.json` names) tensor by tensor with plain reads into fresh tensors.
  Nothing is memory-mapped, so pages of the file that were read once do not stay in the process's resident set
  (a mapped file's touched pages count in RSS until it is unmapped).
- `SafetensorsWriter` lays out a file from the names, dtypes and shapes known before any data (the header first),
  then writes each tensor at its offset as it arrives (`os.pwrite`), in any order; `close` checks that every tensor
  was written once. The layout is the one `safetensors.torch.save_file(tensors, metadata={"format": "pt"})`
  produces, as save_pretrained calls it (tensors sorted by dtype, largest first, then by name; the JSON header padded
  with spaces to 8 bytes), so a streamed checkpoint is the file a fully-loaded save would write
  (tests/models/test_safetensors_stream.py compares the bytes). `CheckpointWriter` splits a checkpoint into files with
  huggingface_hub's splitter, as save_pretrained does (one `model.safetensors` up to 50 GB, else
  `model-0000i-of-0000n.safetensors` and the index).

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of JSON
{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [begin, end]}} with offsets relative to the data
that follows the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from sparsefast.models.weights import check_weight_files

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
        return math.prod(self.shape) * self.dtype.itemsize


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
                         "prune this checkpoint with --from-disk off")
    return _TORCH_OF[name]


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name of a torch dtype; ValueError for one the streamed writer does not lay out."""
    if dtype not in _NAME_OF:
        raise ValueError(f"tensor dtype {dtype} is not supported by sparsefast's streamed writer; prune with "
                         "--from-disk off")
    return _NAME_OF[dtype]


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
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object; download or save it again")
    metadata = header.pop("__metadata__", {}) or {}
    entries = {}
    for name, info in header.items():
        try:
            begin, end = (int(o) for o in info["data_offsets"])
            spec = TensorSpec(name, _dtype_of(info["dtype"], path), tuple(int(d) for d in info["shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ValueError) and "not supported" in str(exc):
                raise
            raise ValueError(f"{path}: the header entry of {name} is malformed ({exc!r}); download or save it "
                             "again") from None
        if begin < 0 or end - begin != spec.nbytes or 8 + n + end > size:
            raise ValueError(f"{path}: tensor {name} does not fit the file (truncated?); download or save it again")
        entries[name] = StoredTensor(spec, path, 8 + n + begin, 8 + n + end)
    return metadata, entries


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, or its one model.safetensors."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [directory / f for f in dict.fromkeys(weight_map.values())]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({exc!r}); download or save it again") from None
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class CheckpointReader:
    """The tensors of a safetensors checkpoint directory, read one at a time into fresh CPU tensors (no mmap).
    Every file is checked complete first (safetensors' own validation, as load_model does)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.tensors: dict[str, StoredTensor] = {}
        files = checkpoint_files(self.directory)
        check_weight_files(files)
        for file in files:
            self.tensors.update(read_header(file)[1])

    def read(self, name: str) -> torch.Tensor:
        stored = self.tensors[name]
        out = torch.empty(stored.spec.shape, dtype=stored.spec.dtype)
        if out.numel():
            view = _byte_view(out)
            with open(stored.file, "rb", buffering=0) as f:
                f.seek(stored.begin)
                done = 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise ValueError(f"{stored.file}: ended inside tensor {name}; download or save it again")
                    done += n
        return out


def file_layout(specs: Iterable[TensorSpec]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(header bytes incl. the 8-byte length, {name: (begin, end) relative to the data}) in safetensors' order."""
    ordered = sorted(specs, key=lambda s: (-_DTYPE_ORDER.index(dtype_name(s.dtype)), s.name))
    offsets, pos = {}, 0
    header: dict = {"__metadata__": {"format": "pt"}}
    for s in ordered:
        offsets[s.name] = (pos, pos + s.nbytes)
        header[s.name] = {"dtype": dtype_name(s.dtype), "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
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
        try:
            os.pwrite(self._fd, header, 0)
            os.ftruncate(self._fd, len(header) + sum(s.nbytes for s in specs))
        except BaseException:
            self.abort()
            raise

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
        """Check every tensor was written, fsync and close; the descriptor is closed whatever happens."""
        try:
            if self._pending:
                raise RuntimeError(f"{self.path.name}: {len(self._pending)} tensors were never written, e.g. "
                                   f"{sorted(self._pending)[0]}")
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the descriptor without checks (after a failure: a removed file's blocks are freed only then)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int = MAX_SHARD_BYTES
                ) -> tuple[dict[str, list[TensorSpec]], dict | None]:
    """({file name: its tensors}, {"total_size", "weight_map"} or None for one file): huggingface_hub's split, as
    save_pretrained makes it from a state dict in the same order (a tensor larger than max_shard_bytes gets a file
    of its own; names model.safetensors or model-0000i-of-0000n.safetensors)."""
    by_name = {s.name: s for s in specs}
    split = split_state_dict_into_shards_factory(by_name, get_storage_size=lambda s: s.nbytes,
                                                 filename_pattern=SINGLE_FILE.replace(".safetensors",
                                                                                      "{suffix}.safetensors"),
                                                 max_shard_size=max_shard_bytes)
    shards = {f: [by_name[n] for n in names] for f, names in split.filename_to_tensors.items()}
    index = {**split.metadata, "weight_map": split.tensor_to_filename} if split.is_sharded else None
    return shards, index


class CheckpointWriter:
    """The safetensors files (and index) of a checkpoint in `directory`, planned from `specs` (in the model's state
    dict order), written tensor by tensor in any order. Use it as a context manager: on success `close()` checks
    every file is complete and writes the index last (with `total_parameters` as save_pretrained does); after a
    failure every descriptor is closed."""

    def __init__(self, directory: str | os.PathLike, specs: Sequence[TensorSpec], *, total_parameters: int,
                 max_shard_bytes: int = MAX_SHARD_BYTES):
        self.directory = Path(directory)
        shards, index = plan_shards(specs, max_shard_bytes)
        self._index = None if index is None else {
            "metadata": {"total_parameters": total_parameters, "total_size": index["total_size"]},
            "weight_map": index["weight_map"]}
        self._writers: dict[str, SafetensorsWriter] = {}
        self._file_of = {s.name: file for file, group in shards.items() for s in group}
        try:
            for file, group in shards.items():
                self._writers[file] = SafetensorsWriter(self.directory / file, group)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writers[self._file_of[name]].write(name, tensor)

    def close(self) -> None:
        try:
            for writer in self._writers.values():
                writer.close()
        finally:
            self.abort()
        if self._index is not None:
            (self.directory / INDEX_FILE).write_text(json.dumps(self._index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()
