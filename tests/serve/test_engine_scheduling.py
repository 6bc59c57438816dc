"""Engine behaviour beyond greedy equality: seeded sampling, top-k/top-p, stop strings, EOS, max_tokens, cancel,
the bounded queue, shutdown, input validation and asyncio streaming (tiny story llama on CPU)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from sparsefast.serve.detokenize import IncrementalDetokenizer
from sparsefast.serve.engine import EngineClosedError, GenerationEngine, QueueFullError, SamplingParams
from sparsefast.serve.sampling import sample_next

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def model_tok(story_llama_dir):
    from sparsefast.api import load

    return load(story_llama_dir)


@pytest.fixture()
def engine(model_tok):
    model, tok = model_tok
    eng = GenerationEngine(model, tok, max_batch=4, max_queue=8, max_model_len=192)
    eng.start()
    yield eng
    eng.shutdown()


def ids_of(tok, text=PROMPT):
    return tok(text)["input_ids"]


def collect(stream):
    events = list(stream)
    return events, [t for e in events for t in e.token_ids], "".join(e.text for e in events)


def test_seeded_sampling_reproducible_alone_and_in_a_batch(engine, model_tok):
    _, tok = model_tok
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    first = engine.generate(ids_of(tok), sp)
    again = engine.generate(ids_of(tok), sp)
    noise = [engine.submit(ids_of(tok, "Tom and Sue"), SamplingParams(max_tokens=30, temperature=1.0, seed=s))
             for s in (1, 2)]
    in_batch = engine.generate(ids_of(tok), sp)
    for s in noise:
        list(s)
    greedy = engine.generate(ids_of(tok), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    assert first == again == in_batch
    assert first != greedy  # temperature 1 over 20 tokens leaves the greedy path on this model


def test_top_k_one_and_tiny_top_p_are_greedy(engine, model_tok):
    _, tok = model_tok
    greedy = engine.generate(ids_of(tok), SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    k1 = engine.generate(ids_of(tok), SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=3,
                                                     ignore_eos=True))
    p0 = engine.generate(ids_of(tok), SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, seed=3,
                                                     ignore_eos=True))
    assert greedy == k1 == p0


def test_sample_next_support_of_top_k_and_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(97, generator=gen)
    top3 = set(torch.topk(logits, 3).indices.tolist())
    draws = {sample_next(logits, SamplingParams(temperature=2.0, top_k=3), gen) for _ in range(300)}
    assert draws == top3
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    # the nucleus for top_p = mass of the 4 most likely tokens keeps exactly those 4
    p = float(probs[order[:4]].sum()) - 1e-6
    draws = {sample_next(logits, SamplingParams(top_p=p), gen) for _ in range(400)}
    assert draws == set(order[:4].tolist())


def test_max_tokens_finishes_with_length(engine, model_tok):
    _, tok = model_tok
    events, ids, _ = collect(engine.submit(ids_of(tok), SamplingParams(max_tokens=9, temperature=0.0,
                                                                       ignore_eos=True)))
    assert len(ids) == 9 and events[-1].finish_reason == "length" and events[-1].completion_tokens == 9
    assert all(e.finish_reason is None for e in events[:-1])
    assert [e.prompt_tokens for e in events] == [len(ids_of(tok))] * len(events)


def test_stop_string_cuts_text_and_ends_with_stop(engine, model_tok):
    _, tok = model_tok
    full_ids = engine.generate(ids_of(tok), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    full = tok.decode(full_ids, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 5]
    assert stop.strip() and full.find(stop) > 0
    events, ids, text = collect(engine.submit(ids_of(tok), SamplingParams(max_tokens=40, temperature=0.0,
                                                                          stop=("zzzz", stop))))
    assert text == full[:full.find(stop)]
    assert events[-1].finish_reason == "stop" and len(ids) < 40 and ids == full_ids[:len(ids)]


def test_eos_ends_the_request_unless_ignored(engine, model_tok):
    _, tok = model_tok
    full = engine.generate(ids_of(tok), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    engine.eos_ids = frozenset({full[6]})  # pretend the 7th greedy token is the model's EOS
    events, ids, _ = collect(engine.submit(ids_of(tok), SamplingParams(max_tokens=20, temperature=0.0)))
    assert ids == full[:full.index(full[6]) + 1] and events[-1].finish_reason == "stop"
    assert engine.generate(ids_of(tok), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)) == full


def test_stream_text_reassembles_to_decode(engine, model_tok):
    _, tok = model_tok
    events, ids, text = collect(engine.submit(ids_of(tok), SamplingParams(max_tokens=30, temperature=0.7, seed=5,
                                                                          ignore_eos=True)))
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert all(b.time >= a.time for a, b in zip(events, events[1:]))


def test_cancel_frees_the_slot_for_the_next_request(model_tok):
    model, tok = model_tok
    eng = GenerationEngine(model, tok, max_batch=1, max_queue=4, max_model_len=192)
    eng.start()
    try:
        long = eng.submit(ids_of(tok), SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True))
        it = iter(long)
        next(it)
        waiting = eng.submit(ids_of(tok, "Tom"), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        assert eng.queue_depth == 1
        long.cancel()
        long.cancel()  # idempotent
        rest = list(it)
        assert rest[-1].finish_reason == "cancelled" and sum(len(e.token_ids) for e in rest) < 149
        events, ids, _ = collect(waiting)
        assert len(ids) == 5 and events[-1].finish_reason == "length"
        deadline = time.monotonic() + 5
        while eng.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.running == 0 and eng._slots.free == [0]
    finally:
        eng.shutdown()


def test_cancel_while_waiting_leaves_the_queue(model_tok):
    model, tok = model_tok
    eng = GenerationEngine(model, tok, max_batch=1, max_queue=2, max_model_len=192)
    eng.start()
    try:
        running = eng.submit(ids_of(tok), SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True))
        it = iter(running)
        next(it)
        waiting = eng.submit(ids_of(tok), SamplingParams(max_tokens=4))
        waiting.cancel()
        assert [e.finish_reason for e in waiting] == ["cancelled"]  # ends while the only slot is still busy
        assert eng.queue_depth == 0 and eng.running == 1
        running.cancel()
        assert list(it)[-1].finish_reason == "cancelled"
    finally:
        eng.shutdown()


def test_queue_full_raises_and_shutdown_cancels_waiting(model_tok):
    model, tok = model_tok
    eng = GenerationEngine(model, tok, max_batch=2, max_queue=2, max_model_len=64)  # not started: nothing runs
    streams = [eng.submit(ids_of(tok), SamplingParams(max_tokens=4)) for _ in range(2)]
    assert eng.queue_depth == 2
    with pytest.raises(QueueFullError, match="max_queue 2"):
        eng.submit(ids_of(tok), SamplingParams(max_tokens=4))
    eng.shutdown()
    for s in streams:
        assert [e.finish_reason for e in s] == ["cancelled"]
    with pytest.raises(EngineClosedError):
        eng.submit(ids_of(tok), SamplingParams(max_tokens=4))
    eng.shutdown()  # idempotent


def test_shutdown_cancels_running_requests(model_tok):
    model, tok = model_tok
    eng = GenerationEngine(model, tok, max_batch=2, max_model_len=192)
    eng.start()
    stream = eng.submit(ids_of(tok), SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True))
    it = iter(stream)
    next(it)
    eng.shutdown()
    assert list(it)[-1].finish_reason == "cancelled"
    assert not eng._thread.is_alive()


def test_bad_requests_raise_value_errors_naming_the_problem(engine, model_tok):
    _, tok = model_tok
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match=r"180 tokens \+ max_tokens 20 exceeds max_model_len 192"):
        engine.submit([5] * 180, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([5, 99999], SamplingParams())
    for bad, field in ((dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
                       (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(seed=-1), "seed"),
                       (dict(stop=("",)), "stop")):
        with pytest.raises(ValueError, match=f"^{field}:"):
            engine.submit(ids_of(tok), SamplingParams(**bad))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        GenerationEngine(engine.model, tok, max_model_len=100000)


def test_async_iteration_streams_the_same_tokens(engine, model_tok):
    _, tok = model_tok
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = engine.generate(ids_of(tok), sp)

    async def run_two():
        async def one():
            return [t async for e in engine.submit(ids_of(tok), sp) for t in e.token_ids]
        return await asyncio.gather(one(), one())

    assert asyncio.run(run_two()) == [expected, expected]


class _CharTokenizer:
    """decode(ids) = the characters with those code points (byte-level behaviour is not needed here)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_detokenizer_holds_back_a_possible_stop_string():
    det = IncrementalDetokenizer(_CharTokenizer(), stop=("END",))
    pieces = [det.add(ord(c)) for c in "abcEN"]
    assert "".join(pieces) == "abc"  # "EN" may still become "END"
    assert det.add(ord("X")) == "ENX"
    assert det.add(ord("E")) + det.add(ord("N")) == ""
    assert det.add(ord("D")) == "" and det.stopped and det.flush() == ""


def test_detokenizer_holds_back_incomplete_utf8():
    det = IncrementalDetokenizer(_CharTokenizer())
    assert det.add(ord("a")) == "a"
    assert det.add(0xFFFD) == ""  # what a tokenizer yields for a partial multi-byte character
    assert det.flush() == "\ufffd"
