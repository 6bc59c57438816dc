"""The side-by-side decode benchmark (sparsefast.bench.decode_run / decode_report / decode_options): the summary's
arithmetic on known numbers; the whole run on the tiny story llama with real sparsefast workers and the peer worker
script driving fake llama_cpp / vllm packages (the real ones live in venvs CI does not build); a worker that fails to
load is recorded, not fatal; the busy core; bad options refused before any work."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsefast.bench.decode_options import DecodeBenchConfig
from sparsefast.bench.decode_report import summarize
from sparsefast.bench.decode_run import BusyCore, Variant, prepare_checkpoints, run_decode_bench, start_workers

FAKE_LLAMA_CPP = '''
from llama_cpp.llama import Llama
__version__ = "fake"
'''
FAKE_LLAMA_CPP_LLAMA = '''
import time
from llama_cpp import llama_cpp  # llama-cpp-python's layout: the ctypes bindings, read by Llama at load
class Llama:
    def __init__(self, model_path, **kw):
        self.model_path = model_path
        self.params = llama_cpp.llama_model_default_params()  # where peer_worker turns extra buffer types off
    def generate(self, tokens, **kw):
        i = 0
        while True:  # never stops by itself, like llama.cpp's generator
            time.sleep(0.001)
            yield (len(tokens) + i) % 7
            i += 1
'''
FAKE_LLAMA_CPP_BINDINGS = '''
import types
def llama_model_default_params():
    return types.SimpleNamespace(use_extra_bufts=True)
'''
FAKE_VLLM = '''
import os, time, types
__version__ = "fake"
class SamplingParams:
    def __init__(self, max_tokens, temperature, ignore_eos):
        self.max_tokens = max_tokens
class LLM:
    def __init__(self, model, **kw):
        print("vllm chatter on stdout")  # must not reach the protocol, nor what a child process prints
        os.system("echo engine process chatter")
    def generate(self, prompts, params, use_tqdm=True):
        time.sleep(0.001 * params.max_tokens)
        out = types.SimpleNamespace(token_ids=list(range(params.max_tokens)))
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]
'''


@pytest.fixture
def fake_peer_python(tmp_path) -> str:
    """A "venv python" that runs this interpreter with fake llama_cpp and vllm packages on its path."""
    pkgs = tmp_path / "pkgs"
    (pkgs / "llama_cpp").mkdir(parents=True)
    (pkgs / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA_CPP)
    (pkgs / "llama_cpp" / "llama.py").write_text(FAKE_LLAMA_CPP_LLAMA)
    (pkgs / "llama_cpp" / "llama_cpp.py").write_text(FAKE_LLAMA_CPP_BINDINGS)
    (pkgs / "vllm").mkdir()
    (pkgs / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (pkgs / "vllm" / "inputs.py").write_text("TokensPrompt = dict\n")
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{pkgs}" exec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return str(python)


def _reply(tpot: float, **extra) -> dict:
    return {"result": {"decode_tokens_per_s": 1 / tpot, "ttft_s": 0.1, "median_itl_s": tpot, **extra}}


def test_summary_arithmetic():
    variants = [Variant("d", [], "sparsefast", "float32", "dense", compiled=True),
                Variant("s", [], "sparsefast", "float32", "2:4", compiled=True),
                Variant("e", [], "sparsefast", "float32", "dense", compiled=False),
                Variant("llama", [], "llama_cpp", "f32", concurrent=False),
                Variant("vllm", [], "vllm", "float32")]
    conc = {"result": {"output_tokens_per_s": 160.0, "tpot_s_median": 0.05}}
    raw = {"d": {"b1": [_reply(0.04), _reply(0.05), _reply(0.06)], "concurrent": [conc] * 3},
           "s": {"b1": [_reply(0.025)] * 3, "concurrent": [conc] * 3},
           "e": {"b1": [_reply(0.1)] * 2 + [{"error": "boom"}], "concurrent": []},
           "llama": {"b1": [{"result": {"tpot_s": 0.04}}] * 3, "concurrent": []},
           "vllm": {"b1": [{"result": {"tpot_s": 0.1}}] * 3,
                    "concurrent": [{"result": {"tpot_s": 0.04, "output_tokens_per_s": 100.0}}] * 3}}
    readies = {"d": {"weight_bytes_per_token": 500_000_000}, "s": {"weight_bytes_per_token": 300_000_000},
               "e": {"weight_bytes_per_token": 500_000_000}, "llama": {"model_bytes": 520_000_000}, "vllm": {}}
    out = summarize(variants, raw, readies, {"copy_gbs": 20.0}, concurrency=8)
    d = out["variants"]["d"]
    assert d["b1_tpot_s"] == 0.05 and d["b1_tokens_per_s"] == pytest.approx(20.0)
    assert d["b1_weight_gbs"] == pytest.approx(10.0) and d["b1_fraction_of_copy_bw"] == pytest.approx(0.5)
    assert d["concurrent_vs_b1"] == pytest.approx(8.0)
    assert out["variants"]["e"]["errors"] == ["boom"] and out["variants"]["e"]["b1_tpot_s"] == 0.1
    assert out["variants"]["vllm"]["weight_bytes_per_token"] == 500_000_000  # the dense model's, same dtype
    assert out["variants"]["llama"]["weight_bytes_per_token"] == 520_000_000  # the GGUF file
    assert out["ratios"]["s"]["vs_dense_same_precision_and_mode"] == pytest.approx(2.0)
    assert out["ratios"]["s"]["vs llama"] == pytest.approx(1.6) and out["ratios"]["s"]["vs vllm"] == pytest.approx(4.0)
    assert out["ratios"]["d"]["compiled_vs_eager"] == pytest.approx(2.0)
    goals = out["goals"]
    assert goals["dense_fp32_b1_fraction_of_copy_bw"] == {"value": pytest.approx(0.5), "target": 0.6, "met": False}
    assert goals["2:4_vs_compiled_dense_fp32_b1"]["met"] is True
    assert goals["50%_vs_compiled_dense_fp32_b1"]["met"] is None  # not measured in this run
    assert goals["2:4 float32 b1 vs llama"]["value"] == pytest.approx(1.6)
    assert goals["dense fp32 c8 TPOT vs vllm"] == {"value": pytest.approx(1.25), "target": 1.0, "met": False}


def test_summary_of_int8_variants_against_llama_cpp_q8_0():
    variants = [Variant("di", [], "sparsefast", "float32", "dense-int8", compiled=True),
                Variant("si", [], "sparsefast", "float32", "2:4-int8", compiled=True),
                Variant("q8", [], "llama_cpp", "q8_0", concurrent=False),
                Variant("q4", [], "llama_cpp", "q4_1", concurrent=False),
                Variant("f32", [], "llama_cpp", "f32", concurrent=False)]
    raw = {"di": {"b1": [_reply(0.02)], "concurrent": []}, "si": {"b1": [_reply(0.01)], "concurrent": []},
           "q8": {"b1": [{"result": {"tpot_s": 0.0125}}], "concurrent": []},
           "q4": {"b1": [{"result": {"tpot_s": 0.01}}], "concurrent": []},
           "f32": {"b1": [{"result": {"tpot_s": 0.04}}], "concurrent": []}}
    readies = {"di": {"weight_bytes_per_token": 1}, "si": {"weight_bytes_per_token": 1}, "q8": {}, "q4": {},
               "f32": {}}
    out = summarize(variants, raw, readies, {"copy_gbs": 20.0}, concurrency=8)
    assert out["ratios"]["si"]["vs q8"] == pytest.approx(1.25) and out["ratios"]["si"]["vs q4"] == pytest.approx(1.0)
    assert out["ratios"]["si"]["vs f32"] == pytest.approx(4.0)
    goals = out["goals"]
    assert goals["2:4-int8 float32 b1 vs llama.cpp Q8_0"] == {"value": pytest.approx(1.25), "target": 1.4,
                                                              "met": False}
    assert goals["2:4-int8 float32 b1 vs dense-int8"] == {"value": pytest.approx(2.0), "target": 1.6, "met": True}
    assert "50%-int8 float32 b1 vs llama.cpp Q8_0" not in goals  # not measured
    assert not any("Q4_1" in g for g in goals)


def test_w8a8_variants_run_the_int8_checkpoint_with_int8_activations(tmp_path):
    """A -w8a8 variant needs no checkpoint of its own (the -int8 one), its worker gets --int8-activations, and its
    goals compare it with the dense model of the same numerics and with llama.cpp's Q8_0."""
    from sparsefast.bench.decode_options import checkpoint_name, int8_activations, is_int8
    from sparsefast.bench.decode_run import sparsefast_variants

    assert [checkpoint_name(v) for v in ("2:4-w8a8", "50%-w8a8", "dense-w8a8", "2:4-int8")] == [
        "2:4-int8", "50%-int8", "dense-int8", "2:4-int8"]
    assert is_int8("2:4-w8a8") and int8_activations("dense-w8a8") and not int8_activations("2:4-int8")
    cfg = DecodeBenchConfig(sparsities=("2:4-int8", "2:4-w8a8"), dtypes=("float32",), compile_modes=("on",))
    argvs = {v.sparsity: v.argv for v in sparsefast_variants(cfg, {"2:4-int8": str(tmp_path)})}
    assert "--int8-activations" in argvs["2:4-w8a8"] and "--int8-activations" not in argvs["2:4-int8"]
    assert argvs["2:4-w8a8"][3] == str(tmp_path)
    variants = [Variant("dw", [], "sparsefast", "float32", "dense-w8a8", compiled=True),
                Variant("sw", [], "sparsefast", "float32", "2:4-w8a8", compiled=True),
                Variant("q8", [], "llama_cpp", "q8_0", concurrent=False)]
    raw = {"dw": {"b1": [_reply(0.02)], "concurrent": []}, "sw": {"b1": [_reply(0.0125)], "concurrent": []},
           "q8": {"b1": [{"result": {"tpot_s": 0.0125}}], "concurrent": []}}
    readies = {"dw": {"weight_bytes_per_token": 1}, "sw": {"weight_bytes_per_token": 1}, "q8": {}}
    goals = summarize(variants, raw, readies, {"copy_gbs": 20.0}, concurrency=8)["goals"]
    assert goals["2:4-w8a8 float32 b1 vs dense-w8a8"]["value"] == pytest.approx(1.6)
    assert goals["2:4-w8a8 float32 b1 vs llama.cpp Q8_0"]["value"] == pytest.approx(1.0)


def test_whole_run_with_fake_peers(story_llama_dir, fake_peer_python, tmp_path):
    out = tmp_path / "decode.json"
    cfg = DecodeBenchConfig(model=str(story_llama_dir), sparsities=("dense", "dense-torch", "2:4"), dtypes=("float32",),
                            compile_modes=("off",), pruner="magnitude", llama_cpp_python=fake_peer_python,
                            gguf_types=("f32",), vllm_python=fake_peer_python, concurrency=2, prompt_len=4,
                            new_tokens=3, rounds=2, threads=1, choice_loads=1, json_path=str(out))
    lines = []
    result = run_decode_bench(cfg, progress=lines.append)
    assert result["failed"] == {} and json.loads(out.read_text())["what"] == "decode"
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"  # the plot beside it
    # vLLM (its idle engine keeps a core busy) loads only after the others' last round: a phase of its own
    vllm_setup = next(i for i, ln in enumerate(lines) if ln.startswith("[setup] vLLM"))
    assert vllm_setup > max(i for i, ln in enumerate(lines) if ln.startswith("[1] llama.cpp"))
    names = ["sparsefast dense float32 eager", "sparsefast dense-torch float32 eager", "sparsefast 2:4 float32 eager",
             "llama.cpp F32", "vLLM float32", "vLLM float32 2:4 (sparsefast plugin)"]
    assert list(result["variants"]) == names
    # the 2:4 checkpoint also runs in vLLM as a `--to vllm-sparse` export (sparsefast's plugin), scored against
    # vLLM's dense model (issue 23's goals)
    plugin = result["variants"]["vLLM float32 2:4 (sparsefast plugin)"]
    sparse = result["variants"]["sparsefast 2:4 float32 eager"]
    assert plugin["weight_bytes_per_token"] == sparse["weight_bytes_per_token"]
    assert "vLLM float32 2:4 (sparsefast plugin) b1 vs vLLM float32 dense" in result["goals"]
    assert any("vllm-sparse" in ln and "2:4" in ln for ln in lines)
    # both dense variants run the one dense checkpoint: with the dense CPU kernel (serve's default), and without
    workers = result["workers"]
    assert workers["sparsefast dense float32 eager"]["dense_kernel_layers"] > 0
    assert workers["sparsefast dense-torch float32 eager"]["dense_kernel_layers"] == 0
    assert "vs_dense_torch_same_precision_and_mode" in result["ratios"]["sparsefast dense float32 eager"]
    for name in names:
        rows = result["raw"][name]
        assert len(rows["b1"]) == 2 and all("result" in r for r in rows["b1"] + rows["concurrent"]), rows
    assert len(result["raw"]["llama.cpp F32"]["concurrent"]) == 0  # one sequence at a time
    assert result["raw"]["llama.cpp F32"]["b1"][0]["result"]["tokens"] == 3
    amx = " amx_tile" in Path("/proc/cpuinfo").read_text()  # llama.cpp's extra buffer types crash on AMX CPUs
    assert result["workers"]["llama.cpp F32"]["extra_bufts"] is (not amx)
    dense = result["variants"]["sparsefast dense float32 eager"]
    assert result["variants"]["vLLM float32"]["weight_bytes_per_token"] == dense["weight_bytes_per_token"]
    assert result["workers"]["sparsefast 2:4 float32 eager"]["swapped"]  # the timed CPU swap ran
    choice = result["kernel_choice"]["sparsefast 2:4 float32 eager"]
    assert set(choice) == {"quiet", "under_test", "stable", "differing_layers"} and len(choice["under_test"]) == 1
    assert "vs llama.cpp F32" in result["ratios"]["sparsefast 2:4 float32 eager"]
    with pytest.raises(ValueError, match="exists; choose another file name or pass --overwrite"):
        run_decode_bench(cfg)  # refused before any work


def test_a_second_run_in_the_work_directory_reuses_what_the_first_made(story_llama_dir, tmp_path):
    """--warm-only, then the measured run, in one --work-dir: the checkpoints and GGUF files of the same model are
    reused, not refused as existing outputs; another model's are not taken."""
    cfg = DecodeBenchConfig(model=str(story_llama_dir), sparsities=("dense", "2:4"), pruner="magnitude",
                            llama_cpp_python=sys.executable, gguf_types=("f32",))
    first = prepare_checkpoints(cfg, tmp_path, progress=lambda *a: None)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    said = []
    assert prepare_checkpoints(cfg, tmp_path, progress=said.append) == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    assert len(said) == 3 and all("made by an earlier run" in line for line in said)
    other = DecodeBenchConfig(model="llama-tiny-random", sparsities=("dense",), llama_cpp_python=sys.executable)
    with pytest.raises(ValueError, match="exists"):  # not this model's checkpoint: never reused, never replaced
        prepare_checkpoints(other, tmp_path, progress=lambda *a: None)


def test_int8_variants_are_quantized_checkpoints_and_dense_stays_as_loaded(story_llama_dir, tmp_path):
    """*-int8 variants save `prune --quantize int8` checkpoints (dense-int8 unpruned), in any order with "dense",
    which stays the model as loaded."""
    from safetensors.torch import load_file

    cfg = DecodeBenchConfig(model=str(story_llama_dir), sparsities=("2:4-int8", "dense", "dense-int8"),
                            pruner="magnitude")
    ckpts, _ = prepare_checkpoints(cfg, tmp_path, progress=lambda *a: None)
    tensors = {name: load_file(str(Path(d) / "model.safetensors")) for name, d in ckpts.items()}
    source = load_file(str(story_llama_dir / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(tensors["dense"][key], source[key])
    assert not any(k.endswith("weight_scale") for k in tensors["dense"])
    for name in ("dense-int8", "2:4-int8"):
        scale = tensors[name][key.replace(".weight", ".weight_scale")]
        q = tensors[name][key] / scale[:, None]
        assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127.01
    assert (tensors["dense-int8"][key] == 0).float().mean() < 0.1
    assert (tensors["2:4-int8"][key] == 0).float().mean() == 0.5
    # this benchmark's checkpoint made with other settings (an older run's) is replaced, not reused nor refused
    report = Path(ckpts["dense-int8"]) / "sparsefast.json"
    report.write_text(report.read_text().replace('"lm_head": "int8"', '"lm_head": null'))
    said = []
    again, _ = prepare_checkpoints(cfg, tmp_path, progress=said.append)
    assert again == ckpts and sum("made by an earlier run" in line for line in said) == 2
    assert '"lm_head": "int8"' in report.read_text()


def test_a_worker_that_fails_to_load_is_recorded(tmp_path):
    ok = Variant("ok", [sys.executable, "-c", "import json, sys; print(json.dumps({'ready': {}}), flush=True); "
                                              "sys.stdin.readline()"], "sparsefast", "float32")
    bad = Variant("bad", [sys.executable, "-c", "import sys; sys.exit(3)"], "sparsefast", "float32")
    workers, failed = start_workers([bad, ok], tmp_path, progress=lambda *a: None)
    try:
        assert list(workers) == ["ok"] and "exited with code 3" in failed["bad"]
    finally:
        for w in workers.values():
            w.close()


def test_busy_core_spins_on_that_core_until_the_block_ends():
    core = min(os.sched_getaffinity(0))
    with BusyCore(core) as busy:
        deadline = time.time() + 10
        while os.sched_getaffinity(busy.proc.pid) != {core} and time.time() < deadline:
            time.sleep(0.05)
        assert os.sched_getaffinity(busy.proc.pid) == {core} and busy.proc.poll() is None
    assert busy.proc.poll() is not None


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsities": ("dense", "70%")}, "--variants takes a comma list of dense, dense-torch, 2:4, 50%"),
    ({"dtypes": ("float16",)}, "--dtypes takes a comma list of float32, bfloat16"),
    ({"compile_modes": ()}, "--compile takes a comma list of on, off; got none"),
    ({"checkpoints": {"2:4": "/nonexistent"}}, "not a checkpoint directory"),
    ({"checkpoints": {"dense-torch": "/nonexistent"}}, "the name must be one of dense, 2:4, 50%"),
    ({"busy_core": 4096}, "--busy-core 4096 is not a core this process may run on"),
    ({"device": "cuda", "busy_core": 0}, "CPU measurements; drop them with --device cuda"),
    ({"new_tokens": 1}, "--new-tokens must be >= 2"),
    ({"llama_cpp_python": "/nonexistent/bin/python"}, "is not an executable python"),
])
def test_bad_options_are_refused_on_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeBenchConfig(**kwargs)


def test_the_peer_worker_is_standalone():
    """peer_worker.py runs in venvs without sparsefast: it imports only the standard library (and the peer)."""
    source = (Path(__file__).resolve().parents[2] / "sparsefast" / "bench" / "peer_worker.py").read_text()
    assert "sparsefast" not in "".join(line for line in source.splitlines() if line.startswith(("import", "from")))


def test_command_line(capsys):
    from sparsefast.bench.decode_options import add_decode_arguments, config_from_args
    from sparsefast.cli import main

    parser = __import__("argparse").ArgumentParser()
    add_decode_arguments(parser)
    dry = config_from_args(parser.parse_args(["--dry-run", "--variants", "dense,2:4", "--compile", "off"]))
    assert (dry.model, dry.pruner, dry.rounds, dry.out_dir) == ("llama-tiny-random", "magnitude", 1, "/tmp")
    assert dry.sparsities == ("dense", "2:4") and dry.compile_modes == ("off",) and dry.choice_loads == 0
    assert config_from_args(parser.parse_args(["--busy-core", "0"])).choice_loads == 3
    assert main(["bench", "decode", "--variants", "dense,70%"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--variants takes a comma list of dense, dense-torch, 2:4, 50%" in err[0]
