"""`sparsefast eval --server` (sparsefast.eval.server): a model served by the real server (in this process, on
127.0.0.1) scores 20 items of arc_easy, piqa and lambada_openai of the shared data item for item as `sparsefast eval`
scores them with the model loaded here: the same picks, the same accuracies, per-choice log-likelihoods within 1e-4
(fp32). And the one-line errors for what cannot work: a URL that is not http(s), nothing listening, a server that
wants a key, one that does not score prompts, one that tokenizes otherwise, --ppl with --server."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sparsefast.cli import main
from sparsefast.eval.server import ServerScorer, check_server_url
from sparsefast.serve.app import ServerConfig, create_app
from sparsefast.serve.engine import GenerationEngine
from tests.serve.server_helpers import free_port, running_server

TASKS, LIMIT, ATOL = "arc_easy,piqa,lambada_openai", 20, 1e-4


@pytest.fixture(scope="module")
def story_server(story_llama_dir):
    """(base URL, tokenizer) of `sparsefast serve`'s app over the story llama (fp32), key "k"."""
    from sparsefast.models import load_model

    model, tokenizer = load_model(str(story_llama_dir))
    engine = GenerationEngine(model, tokenizer, max_batch=8, max_queue=64, max_model_len=512)
    app = create_app(lambda: (engine, tokenizer), ServerConfig(model_name="story", api_key="k"))
    with running_server(app) as base:
        yield base, tokenizer


def _eval(argv: list[str]) -> None:
    assert main(["eval", *argv, "--no-progress"]) == 0


def test_served_model_scores_item_for_item_as_the_local_one(story_server, story_llama_dir, shared_dir, tmp_path):
    base, _ = story_server
    common = [str(story_llama_dir), "--tasks", TASKS, "--limit", str(LIMIT), "--data-dir", str(shared_dir / "data"),
              "--log-samples"]
    _eval([*common, "--json", str(tmp_path / "local.json")])
    _eval([*common, "--server", base + "/v1/", "--api-key", "k", "--json", str(tmp_path / "server.json")])
    local = json.loads((tmp_path / "local.json").read_text())
    served = json.loads((tmp_path / "server.json").read_text())
    assert served["server"]["url"] == base and served["server"]["model"] == "story"
    assert served["server"]["max_model_len"] == 512
    for task in TASKS.split(","):
        a, b = local["zeroshot"]["tasks"][task], served["zeroshot"]["tasks"][task]
        assert a["n"] == b["n"] == LIMIT and a["requests"] == b["requests"]
        for m in ("acc", "acc_norm", "acc_bytes"):
            assert a[m] == b[m], (task, m)
        for x, y in zip(a["samples"], b["samples"], strict=True):
            assert x["doc_id"] == y["doc_id"]
            if task == "lambada_openai":
                assert x["is_greedy"] == y["is_greedy"] and x["loglikelihood"] == pytest.approx(y["loglikelihood"],
                                                                                                abs=ATOL)
                assert x["loglikelihood"] < 0
                continue
            assert x["pred"] == y["pred"] and x["gold"] == y["gold"], (task, x["doc_id"])
            assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=ATOL, rel=0), (task, x["doc_id"])
            # real numbers: negative, and not one value for every choice
            assert all(v < 0 for v in x["loglikelihoods"]) and len(set(x["loglikelihoods"])) > 1
    ppl = (local["zeroshot"]["tasks"]["lambada_openai"]["perplexity"],
           served["zeroshot"]["tasks"]["lambada_openai"]["perplexity"])
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-4) and ppl[0] > 1


def _error(argv: list[str], capsys) -> str:
    assert main(["eval", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_server_urls_and_options_fail_in_one_line(story_server, story_llama_dir, capsys):
    model = str(story_llama_dir)
    assert "not an http(s) URL" in _error([model, "--tasks", "piqa", "--server", "127.0.0.1:8000"], capsys)
    assert "--ppl cannot be scored through --server" in _error(
        [model, "--tasks", "piqa", "--ppl", "wikitext2", "--server", "http://127.0.0.1:1"], capsys)
    assert "--server scores zero-shot tasks only" in _error([model, "--server", "http://127.0.0.1:1"], capsys)
    assert "cannot reach the server" in _error(
        [model, "--tasks", "piqa", "--server", f"http://127.0.0.1:{free_port()}"], capsys)
    assert "wants an API key (401)" in _error([model, "--tasks", "piqa", "--server", story_server[0]], capsys)
    assert check_server_url("http://h:1/v1/") == "http://h:1" and check_server_url("https://h/x/") == "https://h/x"


def _stub_app(echo_text: str | None, logprobs: int | None = None) -> FastAPI:
    """A one-model server that does not score prompts (echo_text None: 400 on echo) or echoes `echo_text` with
    `logprobs` prompt logprobs (None: one per prompt token)."""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        if echo_text is None:
            return JSONResponse({"error": {"message": "echo: not supported", "type": "invalid_request_error"}}, 400)
        n = logprobs or len((await request.json())["prompt"][0])
        lp = {"tokens": ["x"] * n, "token_logprobs": [None] + [-1.0] * (n - 1),
              "top_logprobs": [None] + [{"x": -1.0}] * (n - 1), "text_offset": list(range(n))}
        return JSONResponse({"choices": [{"index": 0, "text": echo_text, "logprobs": lp}]})

    return app


def test_servers_that_cannot_score_are_refused_before_any_work(story_server):
    tokenizer = story_server[1]
    with running_server(_stub_app(None)) as base:
        scorer = ServerScorer(base)
        assert scorer.connect()["id"] == "stub" and scorer.max_tokens == 2047
        with pytest.raises(ValueError, match="does not score prompts .*answered 400: echo: not supported"):
            scorer.check(tokenizer)
    with running_server(_stub_app("ab", logprobs=2)) as base:
        scorer = ServerScorer(base)
        scorer.connect()
        with pytest.raises(ValueError, match="does not return prompt logprobs"):
            scorer.check(tokenizer)  # two logprobs for a longer prompt
    with running_server(_stub_app("another text")) as base:
        scorer = ServerScorer(base)
        scorer.connect()
        with pytest.raises(ValueError, match="echoes 'another text' for the ids of .*: it tokenizes differently"):
            scorer.check(tokenizer)
    with pytest.raises(RuntimeError, match="before connect"):
        ServerScorer("http://127.0.0.1:1").score([([1, 2], 1)])
