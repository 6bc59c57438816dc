"""`sparsefast prune` end to end: a real tiny llama, the embedded GGUF default, and every bad input (exit code 2,
a one-line error, nothing written): --out guards, a lost publish race, Ctrl-C, broken calibration files, a missing
--data-dir and non-finite weights."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import sparsefast.cli.prune as prune_cli
from sparsefast.cli import main
from tests.cli.conftest import STORY


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_story_llama_and_reload(tmp_path, story_llama_dir, calib_file, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["prune", str(story_llama_dir), "--method", "sparsegpt", "--pattern", "2:4", "--calib",
                             str(calib_file), "--nsamples", "3", "--seqlen", "64", "--device", "cpu", "--out",
                             str(out), "--json", str(tmp_path / "report.json"), "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((out / "sparsefast.json").read_text())
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "sparsegpt" and report["pattern"] == "2:4" and report["model"] == str(story_llama_dir)
    assert report["calibration"]["nsamples"] == 3 and report["calibration"]["seqlen"] == 64
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert ((lin.weight != 0).view(lin.weight.shape[0], -1, 4).sum(-1) <= 2).all()
    assert "achieved sparsity 0.5000" in stdout
    assert transformers.utils.logging.is_progress_bar_enabled()  # --no-progress is undone for the rest of the process


def test_sparsegpt_with_int8_saves_scales_and_grid_weights(tmp_path, story_llama_dir, calib_file, capsys):
    from safetensors import safe_open

    from sparsefast.ops.int8_rows import quantize_int8_rows

    out = tmp_path / "out"
    code, _, err = run(["prune", str(story_llama_dir), "--method", "sparsegpt", "--pattern", "2:4", "--quantize",
                        "int8", "--calib", str(calib_file), "--nsamples", "3", "--seqlen", "64", "--device", "cpu",
                        "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((out / "sparsefast.json").read_text())
    assert report["config"]["quantize"] == "int8"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        scale_keys = [k for k in f.keys() if k.endswith(".weight_scale") and k != "lm_head.weight_scale"]
        assert len(scale_keys) == 7 * len({k.split(".")[2] for k in scale_keys})  # every linear of every layer
        for key in scale_keys:
            w, s = f.get_tensor(key.removesuffix("_scale")), f.get_tensor(key)
            q, _ = quantize_int8_rows(w, s)
            assert torch.equal(q.float() * s[:, None], w), key  # the saved weight is exactly scale * q
            assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()
        # the head, not pruned, on its grid too (saved as the embedding when tied)
        head = f.get_tensor("lm_head.weight" if "lm_head.weight" in f.keys() else "model.embed_tokens.weight")
        s = f.get_tensor("lm_head.weight_scale")
        assert torch.equal(quantize_int8_rows(head, s)[0].float() * s[:, None], head)
    with pytest.raises(SystemExit) as exc:  # argparse's choices: usage + one error line, exit 2
        main(["prune", str(story_llama_dir), "--quantize", "int4", "--out", str(tmp_path / "no")])
    assert exc.value.code == 2 and "int4" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_ria_with_owl_and_dsnot(tmp_path, story_llama_dir, calib_file, capsys):
    json_path = tmp_path / "report.json"
    code, stdout, err = run(["prune", str(story_llama_dir), "--method", "ria", "--sparsity", "0.6",
                             "--sparsity-allocation", "owl", "--owl-m", "3", "--owl-lambda", "0.1", "--refine",
                             "dsnot", "--calib", str(calib_file), "--nsamples", "3", "--seqlen", "64", "--device",
                             "cpu", "--json", str(json_path), "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads(json_path.read_text())
    assert report["config"]["method"] == "ria" and report["config"]["refine"] == "dsnot"
    sparsities = report["allocation"]["layer_sparsity"]
    assert len(set(sparsities)) > 1 and abs(sum(sparsities) / len(sparsities) - 0.6) < 1e-12
    assert sum(s["dsnot_swaps"] for s in report["linears"].values()) > 0
    out = tmp_path / "never"
    code, _, err = run(["prune", str(story_llama_dir), "--pattern", "2:4", "--sparsity-allocation", "owl", "--out",
                        str(out)], capsys)
    assert code == 2 and "fixes it at 1 - N/M" in one_error_line(err) and not out.exists()


@pytest.mark.parametrize("pattern,extra,layout", [
    ("2:4", ["--refine", "dsnot", "--dsnot-scope", "all"], "2:4"),  # RIA's channel reallocation folded in
    ("unstructured", ["--sparsity", "0.6", "--sparsity-allocation", "owl"], "unstructured")])
def test_ria_owl_dsnot_checkpoints_run_on_the_sparse_kernels(tmp_path, story_llama_dir, calib_file, capsys, pattern,
                                                             extra, layout):
    """The new methods through the same writer and swap as the others: the checkpoint `prune --out` writes (RIA with
    DSnoT at 2:4, its permuted down projections included; RIA with OWL unstructured) loads, every pruned linear takes
    its sparse CPU kernel, and greedy tokens equal the loaded model's without the swap."""
    from sparsefast.api import load
    from sparsefast.nn import SparsifyConfig, sparsify_
    from tests.nn.model_helpers import greedy_generate
    from tests.ops.sparse_cpu_helpers import require_cpu_kernels

    require_cpu_kernels()
    out = tmp_path / "out"
    code, _, err = run(["prune", str(story_llama_dir), "--method", "ria", "--pattern", pattern, *extra, "--calib",
                        str(calib_file), "--nsamples", "3", "--seqlen", "64", "--device", "cpu", "--out", str(out),
                        "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((out / "sparsefast.json").read_text())
    assert report["config"]["method"] == "ria"
    if pattern == "2:4":  # the reallocation was applied to a down projection, so the file holds permuted layers
        assert any(r.get("reallocation", {}).get("applied") for r in report["linears"].values())
    model, _ = load(out)
    ids = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    want = greedy_generate(model, ids)
    records = sparsify_(model, SparsifyConfig(calibrate=False))  # every pruned linear gets its kernel
    assert len(records) == 14 and all(r["chosen"] == layout for r in records.values()), records
    assert torch.equal(greedy_generate(model, ids), want)


def test_gguf_default_model(tmp_path, capsys):
    from sparsefast.models import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "smol"
    code, _, err = run(["prune", "smollm2", "--method", "wanda", "--pattern", "4:8", "--calib", "c4",
                        "--nsamples", "1", "--seqlen", "16", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[3].mlp.gate_proj.weight
    assert ((w != 0).view(w.shape[0], -1, 8).sum(-1) <= 4).all() and (w == 0).float().mean() == 0.5
    emb = model.get_input_embeddings().weight  # never pruned (Q4_1 dequantized: it has zeros of its own)
    assert ((emb != 0).view(emb.shape[0], -1, 8).sum(-1) > 4).any()


def bad_cases(tmp_path, story, calib_file):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    base = [story, "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "32"]
    cases = [
        (base + ["--sparsity", "1.0"], "sparsity must be a number in [0, 1)"),
        (base + ["--sparsity", "-0.2"], "sparsity must be"),
        (base + ["--pattern", "4:4"], "0 < N < M"),
        (base + ["--pattern", "2:5"], "M=5 must divide"),
        (base + ["--pattern", "dense"], "unknown pattern"),
        (base + ["--method", "obs"], "unknown method"),
        ([str(bert), "--nsamples", "2", "--seqlen", "32"], "unsupported architecture"),
        (base + ["--nsamples", "0"], "nsamples must be an integer >= 1"),
        (base[:-1] + ["600"], "exceeds the model's context of 512"),
        ([story, "--calib", str(short), "--nsamples", "1", "--seqlen", "32"], "calibration text too short"),
        ([story, "--calib", str(tmp_path / "missing.txt"), "--seqlen", "32"], "missing.txt"),
        ([str(tmp_path / "nomodel")], "nomodel"),
        (base + ["--eval", "imagenet"], "unknown perplexity dataset"),
    ]
    if not torch.cuda.is_available():
        cases.append((base + ["--device", "cuda"], "CUDA is not available"))
    return cases, full


def test_bad_inputs_write_nothing(tmp_path, story_llama_dir, calib_file, capsys):
    cases, full = bad_cases(tmp_path, str(story_llama_dir), calib_file)
    for argv, msg in cases:
        out = tmp_path / "never"
        code, _, err = run(["prune", *argv, "--out", str(out), "--no-progress"], capsys)
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("sparsefast prune: error:") and msg in last, (argv, err)
        assert not out.exists(), argv
    code, _, err = run(["prune", str(story_llama_dir), "--out", str(full)], capsys)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    code, _, err = run(["prune", str(story_llama_dir)], capsys)
    assert code == 2 and "nothing to do" in err


def test_overwrite(tmp_path, story_llama_dir, calib_file, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.bin").write_text("x")
    argv = ["prune", str(story_llama_dir), "--method", "magnitude", "--sparsity", "0.25", "--out", str(out),
            "--overwrite", "--no-progress"]
    code, _, err = run(argv, capsys)  # not a sparsefast output: --overwrite does not touch it
    assert code == 2 and "not a sparsefast output" in err and (out / "old.bin").read_text() == "x"
    (out / "old.bin").unlink()
    code, _, err = run(argv, capsys)  # empty: taken
    assert code == 0, err
    code, _, err = run(argv, capsys)  # our own output: replaced
    assert code == 0, err
    assert json.loads((out / "sparsefast.json").read_text())["calibration"] is None


def test_overwrite_never_deletes_a_project_folder_holding_a_report(tmp_path, story_llama_dir, capsys):
    """Issue 20, case 5: the report the user wrote with --json sparsefast.json does not make the folder ours."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "thesis.tex").write_text("years of work")
    (proj / "src" / "main.py").write_text("print('mine')")
    assert run(["prune", str(story_llama_dir), *MAGNITUDE, "--json", str(proj / "sparsefast.json")], capsys)[0] == 0
    code, _, err = run(["prune", str(story_llama_dir), *MAGNITUDE, "--out", str(proj), "--overwrite"], capsys)
    assert code == 2 and "delete it yourself or choose another --out" in one_error_line(err)
    assert sorted(p.relative_to(proj).as_posix() for p in proj.rglob("*")) == [
        "sparsefast.json", "src", "src/main.py", "thesis.tex"]


def test_json_never_replaces_a_file_without_overwrite(tmp_path, story_llama_dir, capsys, monkeypatch):
    """Issue 20, case 6: `prune M --json notes.txt` refuses before any work; with --overwrite it replaces it."""
    import sparsefast.models as models

    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    real_load = models.load_model

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --json was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    code, _, err = run(["prune", str(story_llama_dir), *MAGNITUDE, "--json", str(notes)], capsys)
    assert code == 2 and "notes.txt exists; choose another file name or pass --overwrite" in one_error_line(err)
    assert notes.read_text() == "the user's notes"
    monkeypatch.setattr(models, "load_model", real_load)
    code, _, err = run(["prune", str(story_llama_dir), *MAGNITUDE, "--json", str(notes), "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads(notes.read_text())["method"] == "magnitude"


def test_a_second_run_on_a_claimed_out_stops_before_work(tmp_path, story_llama_dir, capsys):
    """Issue 20, case 7, across two processes: this test holds the claim on --out (as a running `sparsefast prune`
    does from its checks to its save); `sparsefast prune --out ... --overwrite` in another process stops at once,
    exit 2, "not saved", and the output is untouched."""
    import subprocess
    import sys
    from pathlib import Path

    from sparsefast.checkpoint import OutputClaim, load_report

    out = tmp_path / "out"
    assert run(["prune", str(story_llama_dir), *MAGNITUDE, "--out", str(out)], capsys)[0] == 0
    repo = Path(__file__).resolve().parents[2]
    with OutputClaim(out, overwrite=True):
        second = subprocess.run([sys.executable, "-m", "sparsefast", "prune", str(story_llama_dir), *MAGNITUDE,
                                 "--sparsity", "0.5", "--out", str(out), "--overwrite"], cwd=repo,
                                capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "this result was not saved" in one_error_line(second.stderr)
    assert "Loading" not in second.stderr  # stopped before the model was read
    assert load_report(out)["config"]["sparsity"] == 0.25


def test_flags_left_out_give_the_config_defaults():
    from sparsefast.cli import build_parser
    from sparsefast.config import METHODS, make_config

    for method in METHODS:
        args = build_parser().parse_args(["prune", "m", "--method", method])
        assert prune_cli.config_from_args(args) == make_config(method)


def one_error_line(err: str, command: str = "prune") -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("Loading", "Writing"))]
    assert len(lines) == 1 and lines[0].startswith(f"sparsefast {command}: error:"), err
    return lines[0]


MAGNITUDE = ["--method", "magnitude", "--sparsity", "0.25", "--device", "cpu", "--no-progress"]


@pytest.fixture()
def pruned_src(tmp_path, story_llama_dir, capsys):
    """A mask-pruned checkpoint (our own output): the case where --overwrite alone would allow replacing it."""
    src = tmp_path / "pruned-src"
    assert run(["prune", str(story_llama_dir), *MAGNITUDE, "--out", str(src)], capsys)[0] == 0
    return src


def test_out_is_the_model_source(pruned_src, capsys):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in pruned_src.iterdir())
    code, _, err = run(["prune", str(pruned_src), *MAGNITUDE, "--out", str(pruned_src), "--overwrite"], capsys)
    assert code == 2 and "is the model source" in one_error_line(err)
    code, _, err = run(["prune", str(pruned_src), *MAGNITUDE, "--out", str(pruned_src.parent), "--overwrite"],
                       capsys)
    assert code == 2 and ("contains the model source" in err or "current directory" in err)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in pruned_src.iterdir()) == before


def test_out_dot_never_replaces_the_working_directory(tmp_path, story_llama_dir, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    (work / "sparsefast.json").write_text("{}")  # even a folder that looks like ours
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        code, _, err = run(["prune", str(story_llama_dir), *MAGNITUDE, "--out", out, "--overwrite"], capsys)
        assert code == 2 and "current directory" in one_error_line(err), err
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt", "sparsefast.json"]


def test_a_lost_publish_race_is_exit_2_and_keeps_the_winner(tmp_path, story_llama_dir, monkeypatch, capsys):
    """Another process publishes --out while this one is saving: this one must not replace it."""
    out = tmp_path / "out"
    real = transformers.PreTrainedModel.save_pretrained

    def save_then_lose(self, path, **kw):
        real(self, path, **kw)
        out.mkdir()
        (out / "sparsefast.json").write_text('{"method": "the other writer"}')

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_lose)
    code, _, err = run(["prune", str(story_llama_dir), *MAGNITUDE, "--out", str(out)], capsys)
    assert code == 2 and "this result was not saved" in one_error_line(err)
    assert json.loads((out / "sparsefast.json").read_text())["method"] == "the other writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_is_exit_130_and_writes_nothing(tmp_path, story_llama_dir, monkeypatch, capsys):
    out = tmp_path / "out"

    def interrupted(self, path, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", interrupted)
    code, _, err = run(["prune", str(story_llama_dir), *MAGNITUDE, "--out", str(out)], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 130 and last == f"sparsefast prune: interrupted; nothing was written to {out}"
    assert list(tmp_path.iterdir()) == []


def test_broken_calibration_files_are_one_line(tmp_path, story_llama_dir, capsys):
    gz = tmp_path / "calib.txt.gz"
    gz.write_text(STORY)
    code, _, err = run(["prune", str(story_llama_dir), "--calib", str(gz), "--nsamples", "1", "--seqlen", "32",
                        "--device", "cpu", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and "calib.txt.gz: not a valid gzip file" in one_error_line(err)
    binary = tmp_path / "calib.bin.txt"
    binary.write_bytes(bytes(range(128, 256)) * 64)
    code, _, err = run(["prune", str(story_llama_dir), "--calib", str(binary), "--nsamples", "1", "--seqlen", "32",
                        "--device", "cpu", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and "calib.bin.txt: not UTF-8 text" in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_missing_data_dir_is_an_error_before_loading(tmp_path, story_llama_dir, capsys, monkeypatch):
    import sparsefast.models as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    nowhere = tmp_path / "nowhere"
    code, _, err = run(["prune", str(story_llama_dir), *MAGNITUDE, "--out", str(tmp_path / "o"), "--data-dir",
                        str(nowhere)], capsys)
    assert code == 2 and f"--data-dir {nowhere} does not exist" in one_error_line(err)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_nan_weights_are_refused_and_nothing_is_written(poisoned_story, tmp_path, capsys, method):
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a fox. " * 200)
    out = tmp_path / "out"
    code = main(["prune", str(poisoned_story), "--method", method, "--calib", str(calib), "--nsamples", "2",
                 "--seqlen", "32", "--device", "cpu", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "model.layers.0.self_attn.v_proj holds NaN or inf" in err[-1], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
