"""LlamaBatchRunner's two decode paths on a tiny random llama: the eager step (`decode`) and the tensor-only step the
compiled runner captures (`decode_static`, batch padded onto the cache's spare row) compute the same logits and write
the same keys, with the CPU decode-attention kernel and with SDPA over masked cache rows; padding never touches a
request's slot; make_runner's compile modes reject what cannot run."""

from __future__ import annotations

import pytest
import torch

from sparsefast.serve.kv_cache import StaticKVCache
from sparsefast.serve.runner import HFRequestRunner, LlamaBatchRunner, make_runner
from tests.conftest import tiny_model
from tests.ops.sparse_cpu_helpers import require_cpu_kernels

CPU = torch.device("cpu")
PROMPTS = [[5, 17, 33, 4, 9, 100], [7, 8], [200, 3, 3, 41]]
SLOTS = [0, 2, 1]  # not in order, not contiguous with the spare row


def _prefilled(model, spare_row: bool, kernel: bool = True) -> LlamaBatchRunner:
    """A runner with PROMPTS prefilled; kernel: decode attends with the CPU kernel (else SDPA)."""
    runner = LlamaBatchRunner(model, max_batch=3, max_len=16, device=CPU, spare_row=spare_row)
    if kernel:
        require_cpu_kernels()
        assert runner.decode_kernel
    runner.decode_kernel = kernel
    runner.prefill(SLOTS, PROMPTS)
    return runner


def _static_inputs(runner, slots, ids, positions, bucket):
    """decode_static's inputs for `slots`, padded to `bucket` rows on the spare row (token 0 at position 0); the
    mask only where the runner attends with SDPA."""
    pad = bucket - len(slots)
    pos = torch.tensor(positions + [0] * pad)[:, None]
    length = max(positions) + 1
    mask = None if runner.decode_kernel else (torch.arange(length)[None, :] <= pos).view(bucket, 1, 1, length)
    return (torch.tensor(ids + [0] * pad)[:, None], pos, torch.tensor(slots + [runner.cache.spare_row_index] * pad),
            mask)


@torch.inference_mode()
def test_decode_kernel_equals_sdpa_over_the_masked_cache():
    """Eager decode steps of rows at different positions: the CPU attention kernel gives SDPA's logits and keys."""
    model = tiny_model("llama")
    kernel, sdpa = _prefilled(model, spare_row=False), _prefilled(model, spare_row=False, kernel=False)
    positions = [len(p) for p in PROMPTS]
    for step in range(4):
        ids = [11 + step, 40 + step, 90 + step]
        torch.testing.assert_close(kernel.decode(SLOTS, ids, positions), sdpa.decode(SLOTS, ids, positions),
                                   rtol=1e-5, atol=1e-5)
        positions = [p + 1 for p in positions]
    for layer in range(len(kernel.layers)):
        torch.testing.assert_close(kernel.cache.keys[layer], sdpa.cache.keys[layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "sdpa"])
@torch.inference_mode()
def test_static_step_with_padding_rows_matches_the_eager_step(kernel):
    model = tiny_model("llama")
    eager, static = _prefilled(model, spare_row=False, kernel=kernel), _prefilled(model, spare_row=True, kernel=kernel)
    positions = [len(p) for p in PROMPTS]
    ids = [11, 12, 13]
    before = static.cache.keys[0].clone()
    want = eager.decode(SLOTS, ids, positions)
    got = static.decode_static(*_static_inputs(static, SLOTS, ids, positions, bucket=4))
    assert got.shape == (4, model.config.vocab_size)
    torch.testing.assert_close(got[:3], want, rtol=1e-5, atol=1e-5)
    for layer in range(len(eager.layers)):
        # every slot's keys as the eager step left them, the new position included
        torch.testing.assert_close(static.cache.keys[layer][:3], eager.cache.keys[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(static.cache.values[layer][:3], eager.cache.values[layer], rtol=1e-5, atol=1e-5)
    # the padding row wrote its position 0 of the spare row and nothing else
    changed = (static.cache.keys[0] != before).any(-1).nonzero().tolist()
    assert {(r, p) for r, _, p in changed} == {(s, p) for s, p in zip(SLOTS, positions)} | {(3, 0)}


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "sdpa"])
@torch.inference_mode()
def test_static_step_reads_only_keys_up_to_each_rows_position(kernel):
    """Rows of different lengths in one step: a key past a row's position (stale keys of an earlier owner) must not
    change that row's logits."""
    model = tiny_model("llama")
    runner = _prefilled(model, spare_row=True, kernel=kernel)
    positions = [len(p) for p in PROMPTS]
    inputs = _static_inputs(runner, SLOTS, [11, 12, 13], positions, bucket=3)
    want = runner.decode_static(*inputs)
    for layer in range(len(runner.layers)):  # garbage beyond slot 2's position (4), inside the keys read (7)
        runner.cache.keys[layer][2, :, 5:7] = 1e3
    torch.testing.assert_close(runner.decode_static(*inputs), want)


def test_spare_row_is_one_more_cache_row():
    cache = StaticKVCache([2, 1], 8, max_batch=3, max_len=5, dtype=torch.float32, device=CPU, spare_row=True)
    assert [tuple(k.shape) for k in cache.keys] == [(4, 2, 5, 8), (4, 1, 5, 8)] and cache.spare_row_index == 3
    plain = StaticKVCache([2], 8, max_batch=3, max_len=5, dtype=torch.float32, device=CPU)
    assert plain.keys[0].shape[0] == 3 and plain.spare_row_index is None


def test_make_runner_compile_modes():
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        make_runner(tiny_model("llama"), 2, 16, CPU, compile="yes")
    with pytest.raises(ValueError, match="compile='on' needs the batched runner"):
        make_runner(tiny_model("opt"), 2, 16, CPU, compile="on")
    assert type(make_runner(tiny_model("opt"), 2, 16, CPU, compile="auto")) is HFRequestRunner
    assert type(make_runner(tiny_model("llama"), 2, 16, CPU)) is LlamaBatchRunner  # default: eager
