import pytest
import torch

from sparsefast.eval.latency import decode_latency
from tests.conftest import tiny_model


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_decode_latency_runs_the_cached_loop(family):
    model = tiny_model(family)
    calls = []
    model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape), with_kwargs=True)
    res = decode_latency(model, prompt_len=8, new_tokens=5, batch_size=2, repeats=2, warmup=1)
    # (warmup + repeats) × (one prompt forward of 8 tokens + 5 one-token forwards), all batch 2
    assert calls == ([(2, 8)] + [(2, 1)] * 5) * 3
    assert len(res["runs_decode_ms_per_token"]) == 2
    assert res["decode_ms_per_token"] > 0 and res["prefill_ms"] > 0
    assert res["tokens_per_s"] == pytest.approx(2 * 1e3 / res["decode_ms_per_token"])
    assert res["dtype"] == str(torch.float32) and res["device"] == "cpu"


@pytest.mark.parametrize("kw", [{"prompt_len": 0}, {"new_tokens": 1.5}, {"repeats": 0}, {"warmup": -1}])
def test_decode_latency_rejects_bad_sizes(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        decode_latency(tiny_model("llama"), **kw)
