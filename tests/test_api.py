"""sparsefast.api: prune()'s report, exact patterns of every method on every family, every model-dependent check
(pattern, context, calibration ids, finite weights) before any work, and load() of every checkpoint kind."""

from __future__ import annotations

import json

import pytest
import torch

import sparsefast
import sparsefast.api as api
from sparsefast.checkpoint import save_checkpoint, write_json
from sparsefast.config import MagnitudeConfig, SparseGPTConfig, WandaConfig, make_config
from sparsefast.prune.base import max_nonzeros_per_group
from tests.conftest import TINY_FAMILIES, tiny_model


def ids(n=4, seqlen=16, hi=256):
    return torch.randint(0, hi, (n, seqlen), generator=torch.Generator().manual_seed(1))


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_report_is_json_and_complete(tmp_path):
    model = tiny_model("mistral")
    rep = api.prune(model, SparseGPTConfig(pattern="2:4", nsamples=4, seqlen=16, blocksize=32), ids(),
                    progress=False)
    for key in ("method", "pattern", "requested_sparsity", "achieved_sparsity", "calibration", "timings", "linears",
                "device", "versions", "damping", "config"):
        assert key in rep, key
    assert rep["requested_sparsity"] == 0.5 and rep["achieved_sparsity"] == pytest.approx(0.5)
    assert rep["damping"]["raised"] == {} and rep["config"]["blocksize"] == 32
    lin = rep["linears"]["layers.1.mlp.down_proj"]
    assert lin["shape"] == [64, 128] and lin["achieved_sparsity"] == 0.5
    json.loads(json.dumps(rep))
    out = write_json(tmp_path / "r.json", rep)
    assert json.loads(out.read_text())["method"] == "sparsegpt"


def test_magnitude_needs_no_calibration():
    model = tiny_model("opt")
    rep = api.prune(model, MagnitudeConfig(sparsity=0.3), progress=False)
    assert rep["calibration"] is None and rep["timings"]["calib_forward_s"] == 0
    assert all(s["zeros"] == int(s["numel"] * 0.3) for s in rep["linears"].values())


class Unsupported(torch.nn.Module):
    class config:  # noqa: N801 - mimics a HF config object
        model_type = "bert"


def test_given_calib_shape_wins_over_config_seqlen():
    """The API idiom prune(model, WandaConfig(), calib): the default config.seqlen (2048) must not be checked
    against the model's context when the caller's ids are shorter."""
    model = tiny_model("llama")
    report = api.prune(model, WandaConfig(pattern="2:4"), ids(2, 16), progress=False)
    assert report["calibration"]["seqlen"] == 16


@pytest.mark.parametrize("case,msg", [
    ("sparsity", r"sparsity must be a number in \[0, 1\)"),
    ("nm_order", "0 < N < M"),
    ("nm_divides", "must divide the input size"),
    ("pattern", "unknown pattern"),
    ("arch", "unsupported architecture"),
    ("seqlen", "exceeds the model's context"),
    ("calib_seqlen", "exceeds the model's context"),
    ("calib_dtype", "LongTensor"),
    ("calib_empty", "at least one sample"),
    ("calib_vocab", "token ids outside"),
    ("no_calib", "needs calibration"),
    ("cuda", "CUDA is not available"),
])
def test_bad_inputs_before_any_work(case, msg):
    """Model-independent settings are refused when the config is made, the rest by prune() before any work."""
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    model = tiny_model("llama")
    before = params(model)
    settings, calib = dict(nsamples=2, seqlen=16), ids(2, 16)
    if case == "sparsity":
        settings["sparsity"] = 1.0
    elif case == "nm_order":
        settings["pattern"] = "4:2"
    elif case == "nm_divides":
        settings["pattern"] = "3:96"
    elif case == "pattern":
        settings["pattern"] = "rows"
    elif case == "arch":
        model = Unsupported()
    elif case == "seqlen":
        settings["seqlen"] = 257
    elif case == "calib_seqlen":
        calib = ids(2, 300)
    elif case == "calib_dtype":
        calib = calib.float()
    elif case == "calib_empty":
        calib = calib[:0]
    elif case == "calib_vocab":
        calib = calib + 300
    elif case == "no_calib":
        calib = None
    elif case == "cuda":
        settings["device"] = "cuda"
    with pytest.raises(ValueError, match=msg):
        cfg = WandaConfig(**settings)
        if case == "seqlen":  # config.seqlen is what prune_pretrained samples; prune() checks the ids it is given
            api.check_prunable(model, cfg)
        else:
            api.prune(model, cfg, calib, progress=False)
    if case != "arch":
        after = params(model)
        assert all(torch.equal(before[n], after[n]) for n in before)


def test_m_must_divide_every_linear():
    model = tiny_model("llama")  # hidden 64, intermediate 128
    with pytest.raises(ValueError, match="M=48 must divide.*in_features=64"):
        api.prune(model, MagnitudeConfig(pattern="2:48"))
    before = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing touched


def poisoned(value: float = float("nan")):
    """A tiny llama with one non-finite weight in a prunable linear (layers.1.mlp.down_proj)."""
    model = tiny_model("llama").float()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = value
    return model


def unchanged(model, before) -> bool:
    """Every parameter equals its snapshot, NaN positions included."""
    return all(torch.equal(p.isnan(), before[n].isnan()) and torch.equal(p.nan_to_num(), before[n].nan_to_num())
               for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_every_method_refuses_non_finite_weights_before_work(method, value):
    model = poisoned(value)
    before = params(model)
    config = make_config(method, sparsity=0.5, nsamples=2, seqlen=16)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj holds NaN or inf"):
        sparsefast.prune(model, config, ids(2, 16), progress=False)
    assert unchanged(model, before)


def test_prune_pretrained_checks_the_model_once(story_llama_dir, monkeypatch):
    """`sparsefast prune` (prune_pretrained) runs the model-dependent checks, NaN/inf scan included, once."""
    import sparsefast.models as models

    scans = []
    real = models.check_finite_weights
    monkeypatch.setattr(models, "check_finite_weights", lambda model: scans.append(1) or real(model))
    report = api.prune_pretrained(str(story_llama_dir), MagnitudeConfig(sparsity=0.25), progress=False,
                                  log=lambda *a: None)
    assert scans == [1] and report["achieved_sparsity"] == pytest.approx(0.25)


def check_pattern(model, report, pattern, sparsity):
    from sparsefast.models import get_adapter

    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for name, lin in adapter.prunable_linears(layer).items():
            w = lin.weight
            if pattern == "unstructured":
                assert ((w == 0).sum(1) == int(w.shape[1] * sparsity)).all(), name
            else:
                n, m = map(int, pattern.split(":"))
                assert max_nonzeros_per_group(w, m) <= n, name
            assert report["linears"][f"layers.{i}.{name}"]["zeros"] == int((w == 0).sum())
    emb = model.get_input_embeddings().weight
    assert (emb != 0).float().mean() > 0.99  # embeddings are never pruned


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_every_method_family_pattern(family, method, pattern):
    model = tiny_model(family)
    sparsity = 0.5 if pattern == "unstructured" else None
    extra = {"scope": "row"} if method == "magnitude" else {"blocksize": 32} if method == "sparsegpt" else {}
    cfg = make_config(method, pattern=pattern, sparsity=sparsity, nsamples=4, seqlen=16, batch_size=2, **extra)
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    report = api.prune(model, cfg, calib, progress=False)
    assert report["method"] == method and report["pattern"] == pattern
    if method == "sparsegpt" and pattern == "unstructured":
        for name, s in report["linears"].items():  # exact per 32-column block, not per row
            out, cols = s["shape"]
            assert s["zeros"] >= sum(int(out * min(32, cols - b) * 0.5) for b in range(0, cols, 32)), name
    else:
        check_pattern(model, report, pattern, 0.5)
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)


def test_top_level_load_reads_every_checkpoint_kind(tmp_path, story_llama_dir):
    """sparsefast.load(path) → (model, tokenizer) that generate()s: dense dir, mask-pruned and structural outputs."""
    import inspect

    from sparsefast.models import save_structural
    from sparsefast.prune.structural import StructuralConfig, prune_structured

    params = inspect.signature(sparsefast.load).parameters
    assert [p.kind for p in params.values()] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] + [
        inspect.Parameter.KEYWORD_ONLY] * 4 and list(params)[1:] == ["device", "dtype", "sparse", "int8_activations"]
    dense, tok = sparsefast.load(story_llama_dir)
    assert not dense.training and next(dense.parameters()).device.type == "cpu"
    prompt = tok("Once upon a time", return_tensors="pt")["input_ids"]
    assert dense.generate(prompt, max_new_tokens=4, do_sample=False).shape[1] == prompt.shape[1] + 4

    rep = api.prune(dense, MagnitudeConfig(sparsity=0.5), progress=False)
    save_checkpoint(dense, tok, tmp_path / "masked", rep)
    masked, tok2 = sparsefast.load(tmp_path / "masked", dtype="bfloat16")
    q = masked.model.layers[1].self_attn.q_proj.weight
    assert q.dtype == torch.bfloat16 and (q == 0).float().mean() == 0.5
    assert tok2("Once upon a time")["input_ids"] == prompt[0].tolist()
    assert masked.generate(prompt, max_new_tokens=4, do_sample=False).shape[1] == prompt.shape[1] + 4

    sliced, _ = sparsefast.load(story_llama_dir)
    prune_structured(sliced, tok, StructuralConfig(ratio=0.5, importance="l2", layers="0-1"), None)
    save_structural(sliced, tmp_path / "structural", tokenizer=tok)
    small, tok3 = sparsefast.load(str(tmp_path / "structural"), device="cpu", dtype=torch.float32)
    assert small.model.layers[0].mlp.up_proj.out_features == sliced.model.layers[0].mlp.up_proj.out_features < 384
    with torch.no_grad():
        assert torch.equal(small(prompt).logits, sliced(prompt).logits)
    out = small.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, sliced.generate(prompt, max_new_tokens=4, do_sample=False)) and tok3 is not None
