"""structured_gather: the torch twin against index_select and its input checks (CPU), and the CUDA kernel against
the twin, bit-exact on fresh random inputs (GPU)."""

from __future__ import annotations

import pytest
import torch

from sparsefast.ops.structured_gather import _structured_gather_cuda, structured_gather, structured_gather_ref
from tests.gpu import gpu_test


@pytest.fixture
def ext():
    from sparsefast._ext import extension_error, load_extension

    if load_extension() is None or not hasattr(load_extension(), "structured_gather"):
        pytest.skip(f"sparsefast._C without structured_gather: {extension_error()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_torch_twin_matches_index_select(dtype):
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(37, 19, generator=gen).to(dtype), torch.randn(5, 131, generator=gen).to(dtype),
            torch.randn(23, generator=gen).to(dtype), torch.randn(1, 7, generator=gen).to(dtype)]
    dims = [0, 1, 0, 1]
    indices = [torch.tensor([0, 3, 3, 36]), torch.randperm(131, generator=gen)[:60].sort().values,
               torch.tensor([22]), torch.tensor([], dtype=torch.long)]
    out = structured_gather(mats, dims, indices, backend="torch")
    ref = structured_gather_ref(mats, dims, indices)
    for o, r, m, d, i in zip(out, ref, mats, dims, indices):
        assert torch.equal(o, r) and torch.equal(o, m.index_select(d, i)) and o.is_contiguous()
    with pytest.raises(ValueError, match="outside"):
        structured_gather(mats[:1], [0], [torch.tensor([37])])
    with pytest.raises(ValueError, match="int64"):
        structured_gather(mats[:1], [0], [torch.tensor([1], dtype=torch.int32)])


def problem(dtype, gen, n_extra=0):
    shapes = [((37, 19), 0), ((5, 131), 1), ((23,), 0), ((1, 7), 1), ((256, 128), 0), ((128, 384), 1),
              ((3, 8), 0), ((4096, 64), 0)] + [((17, 9), i % 2) for i in range(n_extra)]
    mats, dims, idx = [], [], []
    for shape, d in shapes:
        m = torch.randn(shape, generator=gen)
        m = (m * 50).to(dtype) if not dtype.is_floating_point else m.to(dtype)
        n = shape[d]
        k = int(torch.randint(0, n + 1, (1,), generator=gen))
        i = torch.randint(0, n, (k,), generator=gen).sort().values   # duplicates allowed (ties)
        mats.append(m.cuda())
        dims.append(d)
        idx.append(i.cuda())
    return mats, dims, idx


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float64])
@pytest.mark.parametrize("n_extra", [0, 60])   # 60 more matrices: more than one launch batch (48 descriptors)
def test_matches_index_select(dtype, n_extra, ext):
    gen = torch.Generator().manual_seed(1000 + n_extra)
    mats, dims, idx = problem(dtype, gen, n_extra)
    out = structured_gather(mats, dims, idx, backend="cuda")
    torch.cuda.synchronize()
    for o, m, d, i in zip(out, mats, dims, idx):
        assert o.shape == m.index_select(d, i).shape and o.is_contiguous()
        assert torch.equal(o, m.index_select(d, i))


@gpu_test
def test_offset_views_and_unaligned_rows(ext):
    base = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    view = base[3:3 + 31 * 13].view(31, 13)       # not 16-byte aligned, odd row bytes
    i = torch.tensor([0, 5, 30], device="cuda")
    assert torch.equal(structured_gather([view], [0], [i], backend="cuda")[0], view.index_select(0, i))
    j = torch.tensor([12, 0, 7], device="cuda")   # unsorted columns
    assert torch.equal(structured_gather([view], [1], [j], backend="cuda")[0], view.index_select(1, j))


@gpu_test
def test_poisoned_outputs_are_fully_written(ext):
    # the op allocates its outputs; fill the allocator's cache with NaN first so stale memory would show
    torch.full((1 << 20,), float("nan"), device="cuda")
    gen = torch.Generator().manual_seed(7)
    mats, dims, idx = problem(torch.float32, gen)
    for o, r in zip(structured_gather(mats, dims, idx, backend="cuda"), structured_gather_ref(mats, dims, idx)):
        assert not torch.isnan(o).any() and torch.equal(o, r)


@gpu_test
def test_opcheck(ext):
    gen = torch.Generator().manual_seed(3)
    mats, dims, idx = problem(torch.bfloat16, gen)
    torch.library.opcheck(_structured_gather_cuda, (mats, dims, idx))


@gpu_test
def test_structural_pruning_on_cuda_equals_cpu(ext):
    from sparsefast.prune.structural import StructuralConfig, prune_structured
    from tests.conftest import tiny_model

    cfg = StructuralConfig(ratio=0.5, importance="l2", layers="0-1")
    cpu = tiny_model("llama").float()
    gpu = tiny_model("llama").float().cuda()
    prune_structured(cpu, None, cfg, None)
    prune_structured(gpu, None, cfg, None)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        a = cpu(ids).logits
        b = gpu(ids.cuda()).logits.cpu()
    assert torch.allclose(a, b, atol=1e-4)
    for (n, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert torch.equal(p, q.cpu()), n
