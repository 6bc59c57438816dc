"""Zero-shot scorer: prompts per task, log-likelihoods vs a hand computation, lm-eval's acc_norm, backends."""

from __future__ import annotations

import importlib.machinery
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from sparsefast.eval import tasks as T
from sparsefast.eval import zeroshot as Z

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LOCAL = FIXTURES / "zeroshot"


@pytest.fixture(scope="module")
def story(story_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(story_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(story_llama_dir)


def _first(task: str) -> T.MCExample:
    return T.load_local_task(task, LOCAL / T.TASKS[task].local_file)[0]


def _hf_first(name: str, task: str) -> T.MCExample:
    row = json.loads((FIXTURES / "zeroshot_hf" / f"{name}.jsonl").read_text().splitlines()[0])
    return T.TASKS[task].hf_adapter(row)


def test_prompt_formats_local():
    ex = _first("boolq")
    assert ex.contexts[0] == "The cat sat on the mat all day long.\nQuestion: did the cat sit on the mat?\nAnswer:"
    assert ex.continuations == (" no", " yes") and ex.gold == 1
    ex = _first("piqa")
    assert ex.contexts == ("Question: How do I dry wet shoes?\nAnswer:",) * 2
    assert ex.continuations == (" Stuff them with newspaper and leave them overnight.",
                                " Put them in the freezer overnight.")
    assert T.load_local_task("piqa", LOCAL / "piqa/valid.jsonl")[1].gold == 1  # label from valid-labels.lst
    ex = _first("hellaswag")
    assert ex.contexts[0] == "Baking cookies: A woman puts flour in a bowl. She"
    assert ex.continuations[2] == " adds two eggs and stirs." and ex.gold == 2
    ex = _first("winogrande")
    assert ex.contexts == ("The trophy did not fit in the suitcase because the trophy",
                           "The trophy did not fit in the suitcase because the suitcase")
    assert ex.continuations == (" was too big.",) * 2 and ex.gold == 0
    ex = _first("arc_easy")
    assert ex.contexts[0] == "Question: Which of these is a liquid at room temperature?\nAnswer:"
    assert ex.continuations[1] == " water" and ex.gold == 1
    ex = _first("openbookqa")
    assert ex.contexts[0] == "The moon is seen at night because it"
    assert ex.continuations[1] == " reflects sunlight" and ex.choices[1] == "reflects sunlight"


def test_hellaswag_wikihow_cleanup():
    ex = T.load_local_task("hellaswag", LOCAL / "hellaswag/hellaswag.jsonl")[1]
    # " [title]" -> ". ", other [tags] removed, double spaces collapsed, ctx_b capitalised (rest lowercased)
    assert ex.contexts[0] == "Home and Garden: How to water a plant. Check the soil. If the soil is dry"
    # lm-eval strips before removing "[step]", so the ending keeps a leading space
    assert ex.continuations[0] == "  Pour water slowly."
    assert ex.continuations[2] == " Paint the pot twice."


def test_prompt_formats_hf_rows_match_local():
    assert _hf_first("boolq", "boolq").contexts[0] == (
        "Cats -- The cat sat on the mat all day long.\nQuestion: did the cat sit on the mat?\nAnswer:")
    for name, task in [("piqa", "piqa"), ("hellaswag", "hellaswag"), ("winogrande", "winogrande"),
                       ("openbookqa", "openbookqa")]:
        assert _hf_first(name, task) == _first(task), task
    arc = _hf_first("arc", "arc_easy")  # 3 choices, answerKey letter -> index
    assert arc.choices == ("iron", "water", "salt") and arc.gold == 1
    assert arc.contexts[0] == _first("arc_easy").contexts[0]


def test_lambada_splits_the_text_at_its_last_space_as_lm_eval():
    ex = _first("lambada_openai")
    assert ex == T.ContinuationExample("Tom had a red ball. He threw the ball to his dog. The dog ran and brought "
                                       "back the", " ball")
    assert _hf_first("lambada_openai", "lambada_openai") == ex  # the HF row's text, split by lm-eval's YAML
    assert not T.TASKS["lambada_openai"].has_acc_norm


def test_encode_request_moves_trailing_space(story):
    _, tok = story
    ctx, cont = Z.encode_request(tok, "Question: hi \nAnswer: ", "yes")
    ctx2, cont2 = Z.encode_request(tok, "Question: hi \nAnswer:", " yes")
    assert (ctx, cont) == (ctx2, cont2) and cont
    assert ctx == tok("Question: hi \nAnswer:", add_special_tokens=False)["input_ids"]
    # this tokenizer has pieces spanning spaces ("there▁was▁a▁"): the context is no prefix of the whole
    ctx, cont = Z.encode_request(tok, "Once upon a time there was a", " little girl")
    assert ctx == tok("Once upon a time there was a", add_special_tokens=False)["input_ids"]
    assert cont == tok(" little girl", add_special_tokens=False)["input_ids"]


def _hand_ll(model, tok, ctx: str, cont: str) -> float:
    ctx_ids, cont_ids = Z.encode_request(tok, ctx, cont)
    whole = ctx_ids + cont_ids
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    return sum(torch.log_softmax(logits[j - 1], -1)[whole[j]].item() for j in range(len(ctx_ids), len(whole)))


def test_loglikelihoods_match_hand_computation(story):
    model, tok = story
    reqs = [("Once upon a time there was a", " little girl"), ("Tom had a", " big red ball that he loved"),
            ("She", " smiled."), ("The dog ran to the park and saw a cat. The cat", " ran up a tree.")]
    scored = Z.loglikelihoods(Z.ModelScorer(model, batch_size=3), tok, reqs, progress=False)  # padded, mixed length
    got = [ll.logprob for ll in scored]
    want = [_hand_ll(model, tok, c, k) for c, k in reqs]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert all(v < 0 for v in got)
    one = Z.loglikelihoods(Z.ModelScorer(model, batch_size=1, max_batch_tokens=1), tok, reqs, progress=False)
    assert [ll.logprob for ll in one] == pytest.approx(got, rel=1e-5, abs=1e-4)
    assert [ll.is_greedy for ll in one] == [ll.is_greedy for ll in scored]


def test_is_greedy_is_argmax_at_every_continuation_position(story):
    model, tok = story
    ctx = tok("Once upon a time there was a", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the model's own greedy continuation of 3 tokens, and the same with its last token changed
        ids = list(ctx)
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    other = ids[:-1] + [(ids[-1] + 1) % model.config.vocab_size]
    greedy, not_greedy = Z.ModelScorer(model).score([(ids, 3), (other, 3)], progress=False)
    assert greedy.is_greedy and not not_greedy.is_greedy and greedy.logprob > not_greedy.logprob


def test_scorer_picks_highest_summed_loglikelihood(story):
    model, tok = story
    out = Z.evaluate_zeroshot(model, tok, ["arc_easy", "winogrande"], data_dir=str(LOCAL), backend="builtin",
                              progress=False)
    for task in ("arc_easy", "winogrande"):
        examples = T.load_local_task(task, LOCAL / T.TASKS[task].local_file)
        hits = []
        for ex in examples:
            lls = [_hand_ll(model, tok, c, k) for c, k in zip(ex.contexts, ex.continuations)]
            hits.append(float(max(range(len(lls)), key=lls.__getitem__) == ex.gold))
        assert out["tasks"][task]["acc"] == pytest.approx(sum(hits) / len(hits))
        assert out["tasks"][task]["n"] == len(examples)
    # winogrande continuations are shared, so length normalisation cannot change the pick
    assert out["tasks"]["winogrande"]["acc_norm"] == out["tasks"]["winogrande"]["acc"]


def test_acc_norm_divides_by_characters_acc_bytes_by_bytes():
    # "abc": 3 chars/3 bytes, "éé": 2 chars/4 bytes; LL -3.0 vs -3.5.
    # per character (lm-eval's acc_norm): -1.0 vs -1.75 -> choice 0; per byte: -1.0 vs -0.875 -> choice 1.
    ex = T.MCExample(("q",) * 2, (" abc", " éé"), ("abc", "éé"), gold=1)
    assert Z.score_example([-3.0, -3.5], ex) == {"acc": 0.0, "acc_norm": 0.0, "acc_bytes": 1.0}
    ex0 = T.MCExample(("q",) * 2, (" abc", " éé"), ("abc", "éé"), gold=0)
    assert Z.score_example([-3.0, -3.5], ex0) == {"acc": 1.0, "acc_norm": 1.0, "acc_bytes": 0.0}
    # characters and raw LL disagree: "a" (1 char) -2.0 vs "bbbb" (4 chars) -3.0 -> acc 0, acc_norm 1
    ex2 = T.MCExample(("q",) * 2, (" a", " bbbb"), ("a", "bbbb"), gold=1)
    assert Z.score_example([-2.0, -3.0], ex2) == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}


def test_lambada_acc_is_greedy_match_and_perplexity_the_mean_loglikelihood(story):
    model, tok = story
    out = Z.evaluate_zeroshot(model, tok, ["lambada_openai"], data_dir=str(LOCAL), backend="builtin", progress=False,
                              samples=True)
    r = out["tasks"]["lambada_openai"]
    examples = T.load_local_task("lambada_openai", LOCAL / T.TASKS["lambada_openai"].local_file)
    lls = [_hand_ll(model, tok, ex.context, ex.continuation) for ex in examples]
    assert [s["loglikelihood"] for s in r["samples"]] == pytest.approx(lls, rel=1e-5, abs=1e-4)
    assert r["perplexity"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)
    assert r["acc"] == sum(s["is_greedy"] for s in r["samples"]) / len(examples) == r["acc_norm"]


def test_samples_record_each_items_picks(story):
    model, tok = story
    out = Z.evaluate_zeroshot(model, tok, ["arc_easy"], data_dir=str(LOCAL), backend="builtin", progress=False,
                              samples=True)
    examples = T.load_local_task("arc_easy", LOCAL / T.TASKS["arc_easy"].local_file)
    for item, ex in zip(out["tasks"]["arc_easy"]["samples"], examples, strict=True):
        assert item["pred"] == Z.pick_choices(item["loglikelihoods"], ex) and item["gold"] == ex.gold
        assert item["acc"] == float(item["pred"]["acc"] == ex.gold)
    assert "samples" not in Z.evaluate_zeroshot(model, tok, ["arc_easy"], data_dir=str(LOCAL), backend="builtin",
                                                progress=False)["tasks"]["arc_easy"]


def test_tasks_without_acc_norm_in_lm_eval_report_acc(story):
    # boolq's "no"/"yes" differ in length, so a length-normalised pick could differ from acc; lm-eval has no
    # acc_norm for boolq (nor winogrande) and neither do we: acc_norm is acc there
    assert not T.TASKS["boolq"].has_acc_norm and not T.TASKS["winogrande"].has_acc_norm
    assert all(T.TASKS[t].has_acc_norm for t in ("piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"))
    ex = T.MCExample(("q",) * 2, (" no", " yes"), ("no", "yes"), gold=1)
    assert Z.score_example([-2.0, -2.5], ex, has_acc_norm=False)["acc_norm"] == 0.0  # per char it would pick yes
    assert Z.score_example([-2.0, -2.5], ex)["acc_norm"] == 1.0
    model, tok = story
    out = Z.evaluate_zeroshot(model, tok, ["boolq"], limit=3, data_dir=str(LOCAL), backend="builtin", progress=False)
    r = out["tasks"]["boolq"]
    assert r["acc_norm"] == r["acc"] and set(Z.METRICS) <= set(r)


def test_empty_context_is_prefixed_with_bos_when_the_tokenizer_has_one():
    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    tok = Tok()
    assert Z.prefix_token_id(tok) == 1
    tok.bos_token_id = None
    assert Z.prefix_token_id(tok) == 2
    tok.bos_token_id = 1
    seen = []

    class Model(torch.nn.Module):
        config = types.SimpleNamespace(max_position_embeddings=64)

        def forward(self, input_ids, attention_mask):
            seen.append(input_ids[0].tolist())
            return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, 256))

    Z.loglikelihoods(Z.ModelScorer(Model()), tok, [("", "ab")], progress=False)
    assert seen == [[1, ord("a")]]  # BOS, then the continuation minus its last token


def test_all_tasks_limit_and_result_shape(story):
    model, tok = story
    out = Z.evaluate_zeroshot(model, tok, list(T.TASKS), limit=1, data_dir=str(LOCAL), backend="builtin",
                              progress=False)
    assert out["backend"] == "builtin" and set(out["tasks"]) == set(T.TASKS)
    assert all(r["n"] == 1 and r["acc"] in (0.0, 1.0) for r in out["tasks"].values())
    assert out["tasks"]["hellaswag"]["requests"] == 4 and out["tasks"]["lambada_openai"]["requests"] == 1
    assert out["average"]["acc"] == pytest.approx(sum(r["acc"] for r in out["tasks"].values()) / len(T.TASKS))


def test_bad_input_errors(story, tmp_path):
    model, tok = story
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        Z.evaluate_zeroshot(model, tok, ["boolq", "mmlu"], data_dir=str(LOCAL))
    with pytest.raises(ValueError, match="limit"):
        Z.evaluate_zeroshot(model, tok, ["boolq"], limit=0, data_dir=str(LOCAL))
    bad = tmp_path / "boolq"
    bad.mkdir()
    (bad / "boolq.jsonl").write_text('{"query": "Passage: a\\nQuestion: b?", "choices": ["no", "yes"], "gold": 1}\n'
                                     "{not json\n")
    with pytest.raises(ValueError, match=r"boolq.jsonl:2: not valid JSON"):
        Z.evaluate_zeroshot(model, tok, ["boolq"], data_dir=str(tmp_path), backend="builtin")
    (bad / "boolq.jsonl").write_text('{"query": "Passage: a", "choices": ["no", "yes"], "gold": 5}\n')
    with pytest.raises(ValueError, match="row 1"):
        Z.evaluate_zeroshot(model, tok, ["boolq"], data_dir=str(tmp_path), backend="builtin")


@pytest.mark.parametrize("task,rows", [("boolq", 3270), ("piqa", 1838), ("hellaswag", 1000), ("winogrande", 1267),
                                       ("arc_easy", 2376), ("arc_challenge", 1172), ("openbookqa", 500),
                                       ("lambada_openai", 5153)])
def test_shared_task_files_parse(shared_dir, task, rows):
    examples, source = Z.load_task(task, data_dir=str(shared_dir / "data"))
    assert len(examples) == rows and source.endswith(T.TASKS[task].local_file)
    if T.TASKS[task].output_type == "loglikelihood":
        assert all(ex.continuation.startswith(" ") and ex.context for ex in examples)
    else:
        assert all(0 <= ex.gold < len(ex.choices) for ex in examples)


def _fake_lm_eval(monkeypatch, calls: list) -> None:
    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {"boolq": {"acc,none": 0.5, "acc_stderr,none": 0.1},
                            "arc_easy": {"acc,none": 0.25, "acc_stderr,none": 0.1, "acc_norm,none": 0.3,
                                         "acc_norm_stderr,none": 0.1}}}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size, device):
            self.pretrained = pretrained

    root = types.ModuleType("lm_eval")
    root.__spec__ = importlib.machinery.ModuleSpec("lm_eval", None)
    root.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", root)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)


def test_backend_selected_only_when_lm_eval_importable(monkeypatch, story):
    monkeypatch.delenv("SPARSEFAST_ZEROSHOT_BACKEND", raising=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # find_spec -> None: not importable
    assert Z.select_backend("auto") == "builtin"
    with pytest.raises(ValueError, match="pip install lm-eval"):
        Z.select_backend("lm_eval")
    calls: list = []
    _fake_lm_eval(monkeypatch, calls)
    assert Z.select_backend("auto") == "lm_eval"
    assert Z.select_backend("auto", data_dir=str(LOCAL)) == "builtin"  # local data asked for: score it here
    assert Z.select_backend("builtin") == "builtin"
    model, tok = story
    out = Z.evaluate_zeroshot(model, tok, ["boolq", "arc_easy"], limit=7)
    assert out["backend"] == "lm_eval" and calls[0]["tasks"] == ["boolq", "arc_easy"] and calls[0]["limit"] == 7
    assert out["tasks"]["boolq"]["acc_norm"] == 0.5  # no acc_norm in lm-eval's boolq: acc stands in
    assert out["average"] == {"acc": pytest.approx(0.375), "acc_norm": pytest.approx(0.4)}
