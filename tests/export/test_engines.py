"""Slow: the exported files run in the engines themselves (peer venvs from bench/peers/, found through
$SPARSEFAST_LLAMA_CPP_VENV / $SPARSEFAST_VLLM_VENV; skipped without them). llama.cpp's 32 greedy tokens at f32 equal
sparsefast's for the tiny story llama (dense, layer-wise structural through the deci architecture, uniform) and
SmolLM2 (dense, Wanda 2:4, structural 20%); vLLM's OpenAI server serves the structural SmolLM2 export with the same
greedy completion as `sparsefast serve`, and the Wanda 2:4 / 50% SmolLM2 exports through sparsefast's vLLM plugin
(packed, sparsefast's kernels; sparsefast installed in the vLLM venv) with the same completion as `sparsefast serve`
and as vLLM's dense load of the zero-filled checkpoint. bench/e2e/export_equality.py runs the same checks and commits
the tokens."""

from __future__ import annotations

import pytest

import sparsefast
from sparsefast.bench.export_peers import (
    completion,
    llama_cpp_run,
    peer_python,
    sparsefast_greedy,
    sparsefast_server,
    vllm_server,
)
from sparsefast.checkpoint import save_checkpoint
from sparsefast.config import WandaConfig
from sparsefast.config.structural import StructuralConfig
from sparsefast.export.gguf import export_gguf
from sparsefast.export.vllm import export_vllm
from sparsefast.export.vllm_sparse import export_vllm_sparse
from sparsefast.prune.structural import prune_structured
from tests.export.conftest import pruned_story

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is a city that"


def _peer(name: str) -> None:
    try:
        peer_python(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _same_tokens_in_llama_cpp(model, tok, prompt: str, tmp_path) -> None:
    ids = list(tok(prompt)["input_ids"])
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    assert llama_cpp_run(path, ids, 32)["tokens"] == sparsefast_greedy(model, ids, 32)


@pytest.mark.parametrize("config", [None, {"ratio": 0.3, "layers": "1-1"}, {"ratio": 0.3, "uniform": True}])
def test_story_llama_in_llama_cpp(story_llama_dir, tmp_path, config):
    _peer("llama_cpp")
    model, tok = pruned_story(story_llama_dir, **config) if config else sparsefast.load(str(story_llama_dir))
    _same_tokens_in_llama_cpp(model, tok, "Once upon a time there was a little", tmp_path)


@pytest.mark.parametrize("kind", ["dense", "wanda-2of4", "structural-20"])
def test_smollm2_in_llama_cpp(tmp_path, kind):
    _peer("llama_cpp")
    model, tok = sparsefast.load("smollm2")
    if kind == "wanda-2of4":
        from sparsefast.data import get_calibration

        sparsefast.prune(model, WandaConfig(pattern="2:4"), get_calibration("c4", tok, nsamples=4, seqlen=128, seed=0))
    elif kind == "structural-20":
        prune_structured(model, tok, StructuralConfig(ratio=0.2, importance="l2"))
    _same_tokens_in_llama_cpp(model, tok, PROMPT, tmp_path)


def test_structural_smollm2_in_vllm_serve(tmp_path):
    _peer("vllm")
    model, tok = sparsefast.load("smollm2")
    prune_structured(model, tok, StructuralConfig(ratio=0.2, importance="l2"))
    sparsefast.models.save_structural(model, tmp_path / "s20", tokenizer=tok)
    export_vllm(model, tok, tmp_path / "vllm")
    del model
    with vllm_server(tmp_path / "vllm", log_dir=tmp_path) as server:
        theirs = completion(server, PROMPT, 32)
    with sparsefast_server(str(tmp_path / "s20"), log_dir=tmp_path) as server:
        ours = completion(server, PROMPT, 32)
    assert theirs["text"] == ours["text"]


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_wanda_smollm2_in_vllm_plugin(tmp_path, pattern):
    _peer("vllm")
    from sparsefast.data import get_calibration

    model, tok = sparsefast.load("smollm2")
    sparsefast.prune(model, WandaConfig(pattern=pattern),
                     get_calibration("c4", tok, nsamples=4, seqlen=128, seed=0))
    save_checkpoint(model, tok, tmp_path / "pruned")
    export_vllm(model, tok, tmp_path / "dense")  # zero-filled: vLLM's own dense layers
    model, tok = sparsefast.load(str(tmp_path / "pruned"))
    summary = export_vllm_sparse(model, tok, tmp_path / "packed", calibrate=False)
    assert sum(summary["packed_layers"].values()) == 4 * 30  # every vLLM linear of the 30 layers packed
    del model
    prompts = (PROMPT, "Photosynthesis is the process by which plants")
    texts = {}
    for name, serve in (("plugin", lambda: vllm_server(tmp_path / "packed", log_dir=tmp_path, name="vllm-plugin")),
                        ("dense", lambda: vllm_server(tmp_path / "dense", log_dir=tmp_path, name="vllm-dense")),
                        ("ours", lambda: sparsefast_server(str(tmp_path / "pruned"), log_dir=tmp_path))):
        with serve() as server:
            texts[name] = [completion(server, p, 32)["text"] for p in prompts]
    assert texts["plugin"] == texts["ours"] == texts["dense"]
