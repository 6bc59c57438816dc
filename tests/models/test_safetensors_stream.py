"""The streamed safetensors reader and writer against the safetensors library: the same bytes, the same tensors,
shards named as transformers names them, no memory map, and every misuse refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparsefast.models.safetensors_stream import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointReader,
    CheckpointWriter,
    SafetensorsWriter,
    TensorSpec,
    plan_shards,
    read_header,
)


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.down_proj.weight": torch.randn(6, 10, generator=g),
        "b.weight": torch.randn(3, 4, generator=g).bfloat16(),
        "a.weight": torch.randn(5, generator=g).half(),
        "positions": torch.arange(7),
        "scale": torch.tensor(2.5),
        "codes": torch.randint(-100, 100, (9,), dtype=torch.int8, generator=g),
        "mask": torch.rand(4, generator=g) > 0.5,
        "empty": torch.zeros(0, 3),
        "z.double": torch.randn(2, generator=g).double(),
    }


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def test_writer_bytes_equal_save_file_in_any_write_order(tmp_path):
    tensors = mixed_tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    writer = SafetensorsWriter(tmp_path / "ours.safetensors", specs_of(tensors))
    for name in reversed(list(tensors)):  # layers arrive in any order
        writer.write(name, tensors[name])
    writer.close()
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_reader_returns_the_saved_tensors_without_mapping_the_file(tmp_path):
    tensors = mixed_tensors()
    save_file(tensors, str(tmp_path / SINGLE_FILE), metadata={"format": "pt"})
    reader = CheckpointReader(tmp_path)
    assert set(reader.tensors) == set(tensors)
    for name, ref in tensors.items():
        got = reader.read(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape and torch.equal(got, ref)
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(tmp_path / SINGLE_FILE) not in maps.read_text()


def test_sharded_checkpoint_equals_save_pretrained(tmp_path):
    """The same files, index included, as transformers' save_pretrained writes for the same state dict."""
    from tests.conftest import tiny_model

    model = tiny_model("llama", tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "ref", max_shard_size="40KB")
    state = model.state_dict()
    specs = specs_of(state)
    (tmp_path / "ours").mkdir()
    with CheckpointWriter(tmp_path / "ours", specs, total_parameters=model.num_parameters(),
                          max_shard_bytes=40_000) as writer:
        for spec in reversed(specs):  # in any order
            writer.write(spec.name, state[spec.name])
    ref_files = sorted(p.name for p in (tmp_path / "ref").glob("model*"))
    assert ref_files == sorted(p.name for p in (tmp_path / "ours").iterdir()) and INDEX_FILE in ref_files
    assert len(ref_files) > 3  # several shards
    for name in ref_files:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    reader = CheckpointReader(tmp_path / "ours")
    assert all(torch.equal(reader.read(n), t) for n, t in state.items())


def test_plan_keeps_one_file_under_the_limit_and_isolates_a_large_tensor():
    small = [TensorSpec(f"t{i}", torch.float32, (10,)) for i in range(3)]  # 40 bytes each
    assert plan_shards(small, max_shard_bytes=1000) == ({SINGLE_FILE: small}, None)
    big = TensorSpec("big", torch.float32, (100,))
    shards, index = plan_shards([small[0], big, small[1]], max_shard_bytes=100)
    # huggingface_hub's rule: an oversized tensor gets a file of its own at once, the open one keeps filling
    assert [[s.name for s in g] for g in shards.values()] == [["big"], ["t0", "t1"]]
    assert index["total_size"] == 480 and set(index["weight_map"]) == {"t0", "big", "t1"}


def test_a_failed_checkpoint_write_closes_every_file(tmp_path):
    specs = [TensorSpec(f"t{i}", torch.float32, (10,)) for i in range(4)]
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path, specs, total_parameters=40, max_shard_bytes=80) as writer:
            writer.write("t0", torch.ones(10))
            raise RuntimeError("boom")
    assert set(os.listdir("/proc/self/fd")) == fds
    assert not (tmp_path / INDEX_FILE).exists()


def test_writer_refuses_misuse_and_never_replaces_a_file(tmp_path):
    spec = TensorSpec("w", torch.float32, (2, 3))
    writer = SafetensorsWriter(tmp_path / "a.safetensors", [spec])
    with pytest.raises(ValueError, match="does not match the planned"):
        writer.write("w", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="does not match the planned"):
        writer.write("w", torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(KeyError, match="not a tensor of this file"):
        writer.write("other", torch.zeros(2, 3))
    writer.write("w", torch.ones(2, 3))
    with pytest.raises(KeyError, match="written already"):
        writer.write("w", torch.ones(2, 3))
    writer.close()
    with pytest.raises(FileExistsError):
        SafetensorsWriter(tmp_path / "a.safetensors", [spec])
    incomplete = SafetensorsWriter(tmp_path / "b.safetensors", [spec, TensorSpec("v", torch.float32, (1,))])
    incomplete.write("w", torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="1 tensors were never written, e.g. v"):
        incomplete.close()


def test_truncated_or_foreign_files_are_refused(tmp_path):
    save_file({"w": torch.ones(100)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="does not fit the file"):
        read_header(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="bad header length"):
        read_header(tmp_path / "junk.safetensors")
