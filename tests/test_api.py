"""Python API: report contents, atomic checkpoint save that reloads with its zeros, bad inputs before any work."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import sparsefast.api as api
from sparsefast.checkpoint import check_output_dir, load_report, save_checkpoint, write_json
from sparsefast.config import MagnitudeConfig, SparseGPTConfig, WandaConfig
from tests.conftest import tiny_model


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


def test_saved_checkpoint_reloads_with_zeros(tmp_path, story_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(story_llama_dir)
    tok = transformers.AutoTokenizer.from_pretrained(story_llama_dir)
    rep = api.prune(model, WandaConfig(pattern="4:8", nsamples=2, seqlen=32), ids(2, 32, hi=2048), progress=False)
    out = save_checkpoint(model, tok, tmp_path / "pruned", rep)
    assert (out / "model.safetensors").is_file() and load_report(out)["pattern"] == "4:8"
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    saved = dict(again.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(saved[name], p), name
    q = again.model.layers[0].self_attn.q_proj.weight
    assert ((q == 0).view(q.shape[0], -1, 8).sum(-1) >= 4).all()
    assert transformers.AutoTokenizer.from_pretrained(out)("once upon")["input_ids"] == tok("once upon")["input_ids"]
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no temp dirs left


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    real = model.save_pretrained

    def save_then_fail(path, **kw):
        real(path, **kw)  # a complete model file is already on disk when the failure hits
        raise KeyboardInterrupt("simulated Ctrl-C during the save")

    monkeypatch.setattr(model, "save_pretrained", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, None, tmp_path / "out", {"method": "x"})
    assert list(tmp_path.iterdir()) == []
    # an existing checkpoint is kept intact when the overwrite fails
    monkeypatch.setattr(model, "save_pretrained", real)
    save_checkpoint(model, None, tmp_path / "out", {"method": "first"})
    monkeypatch.setattr(model, "save_pretrained", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, None, tmp_path / "out", {"method": "second"}, overwrite=True)
    assert load_report(tmp_path / "out")["method"] == "first" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces(tmp_path):
    model = tiny_model("llama")
    save_checkpoint(model, None, tmp_path / "out", {"method": "old"})
    (tmp_path / "out" / "stale.txt").write_text("x")  # inside our own output: replaced with it
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        save_checkpoint(model, None, tmp_path / "out", {})
    save_checkpoint(model, None, tmp_path / "out", {"method": "m"}, overwrite=True)
    assert not (tmp_path / "out" / "stale.txt").exists() and load_report(tmp_path / "out")["method"] == "m"


def test_output_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_output_dir(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == (tmp_path / "empty").resolve()
    assert check_output_dir(tmp_path / "new" / "deeper").name == "deeper"


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
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    model = tiny_model("llama")
    before = params(model)
    cfg, calib = WandaConfig(nsamples=2, seqlen=16), ids(2, 16)
    if case == "sparsity":
        cfg.sparsity = 1.0
    elif case == "nm_order":
        cfg.pattern = "4:2"
    elif case == "nm_divides":
        cfg.pattern = "3:96"
    elif case == "pattern":
        cfg.pattern = "rows"
    elif case == "arch":
        model = Unsupported()
    elif case == "seqlen":
        cfg.seqlen = 257
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
        cfg.device = "cuda"
    with pytest.raises(ValueError, match=msg):
        if case == "seqlen":  # config.seqlen is what prune_pretrained samples; prune() checks the ids it is given
            api.check_prunable(model, cfg)
        else:
            api.prune(model, cfg, calib, progress=False)
    if case != "arch":
        after = params(model)
        assert all(torch.equal(before[n], after[n]) for n in before)


def test_top_level_load_reads_every_checkpoint_kind(tmp_path, story_llama_dir):
    """sparsefast.load(path) → (model, tokenizer) that generate()s: dense dir, mask-pruned and structural outputs."""
    import inspect

    import sparsefast
    from sparsefast.prune.structural import StructuralConfig, prune_structured, save_structural

    params = inspect.signature(sparsefast.load).parameters
    assert [p.kind for p in params.values()] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] + [
        inspect.Parameter.KEYWORD_ONLY] * 3 and list(params)[1:] == ["device", "dtype", "sparse"]
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
