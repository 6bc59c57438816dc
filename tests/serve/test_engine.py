"""GenerationEngine on the tiny story llama (CPU). Output against transformers' generate, token for token (greedy):
dense, structurally pruned (different head counts and MLP widths per layer), 2:4 magnitude-pruned, prompts of
different lengths served concurrently, both runners (batched LLaMA runner and the per-request HF fallback). Then the
scheduling behaviours: seeded sampling, top-k/top-p, stop strings, EOS, max_tokens, cancel, the bounded queue,
shutdown, input validation and asyncio streaming."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from sparsefast.serve.engine import EngineClosedError, GenerationEngine, QueueFullError, SamplingParams
from tests.serve.server_helpers import record_prefills

PROMPTS = ["Once upon a time", "The little dog ran to the park and saw a big", "Tom had a red ball. He",
           "Lily", "One day, a girl named Sue went to the shop with her mom. She wanted to buy"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
PROMPT = PROMPTS[0]


def _load(story_llama_dir):
    from sparsefast.api import load

    return load(story_llama_dir)


@pytest.fixture(scope="module")
def dense(story_llama_dir):
    return _load(story_llama_dir)


@contextlib.contextmanager
def running_engine(model, tokenizer, **engine_kw) -> Iterator[GenerationEngine]:
    """A started engine, shut down however the block ends."""
    engine = GenerationEngine(model, tokenizer, **engine_kw)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture()
def engine(dense):
    model, tok = dense
    with running_engine(model, tok, max_batch=4, max_queue=8, max_model_len=192) as eng:
        yield eng


def reference(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' greedy generate, never stopping at EOS (as ignore_eos=True)."""
    ids = tokenizer(prompt)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def served_alone(model, tokenizer, prompts, params=GREEDY, **engine_kw) -> list[list[int]]:
    with running_engine(model, tokenizer, max_model_len=128, **engine_kw) as engine:
        return [engine.generate(tokenizer(p)["input_ids"], params) for p in prompts]


def served_together(model, tokenizer, prompts, params_list, **engine_kw) -> list[list[int]]:
    """All requests queued before the engine starts: its first step admits max_batch of them at once (one padded
    prefill of prompts of different lengths); the rest join as slots free up."""
    engine = GenerationEngine(model, tokenizer, max_model_len=128, **engine_kw)
    try:
        streams = [engine.submit(tokenizer(p)["input_ids"], sp) for p, sp in zip(prompts, params_list)]
        engine.start()
        return [[t for ev in s for t in ev.token_ids] for s in streams]
    finally:
        engine.shutdown()


def ids_of(tok, text=PROMPT):
    return tok(text)["input_ids"]


def collect(stream):
    events = list(stream)
    return events, [t for e in events for t in e.token_ids], "".join(e.text for e in events)


def long_request_under_way(engine, tok):
    """A 150-token greedy request that has produced its first event: (its stream, an iterator over the rest)."""
    stream = engine.submit(ids_of(tok), SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True))
    events = iter(stream)
    next(events)
    return stream, events


@pytest.mark.parametrize("runner", ["batched", "hf"])
def test_greedy_matches_generate_dense(dense, runner):
    model, tok = dense
    got = served_alone(model, tok, PROMPTS[:3], runner=runner)
    assert got == [reference(model, tok, p, GREEDY.max_tokens) for p in PROMPTS[:3]]


@pytest.mark.parametrize("runner", ["batched", "hf"])
def test_concurrent_prompts_of_different_lengths_match_single_requests(dense, runner):
    """5 prompts, 3 slots, different max_tokens: requests join mid-flight as others leave, and rows at different
    positions decode in one batch; each must equal its own single-request output."""
    model, tok = dense
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (7, 20, 13, 24, 5)]
    together = served_together(model, tok, PROMPTS, params, max_batch=3, runner=runner)
    assert together == [reference(model, tok, p, sp.max_tokens) for p, sp in zip(PROMPTS, params)]


def test_structural_checkpoint_with_per_layer_widths(story_llama_dir, tmp_path):
    """Layer 0 loses half its KV groups (kv_groups mode) and MLP channels, layer 1 stays dense; the engine's cache
    is sized per layer. Saved and reloaded through the structural checkpoint path, as `sparsefast serve` loads it."""
    from sparsefast.api import load
    from sparsefast.models import save_structural
    from sparsefast.prune.structural import StructuralConfig, prune_structured

    model, tok = _load(story_llama_dir)
    prune_structured(model, tok, StructuralConfig(ratio=0.5, importance="l2", layers="0-0", gqa="kv_groups"))
    save_structural(model, tmp_path / "struct", tokenizer=tok)
    model, tok = load(tmp_path / "struct")
    layers = model.model.layers
    widths = [(lay.self_attn.q_proj.out_features, lay.self_attn.k_proj.out_features, lay.mlp.up_proj.out_features)
              for lay in layers]
    assert widths[0] != widths[1] and widths[0][1] < widths[1][1], widths
    engine = GenerationEngine(model, tok, max_model_len=64)
    assert [k.shape[1] for k in engine.runner.cache.keys] == [w[1] // 16 for w in widths]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (16, 9, 12)]
    together = served_together(model, tok, PROMPTS[:3], params, max_batch=2)
    assert together == [reference(model, tok, p, sp.max_tokens) for p, sp in zip(PROMPTS[:3], params)]


def test_two_four_mask_pruned_model(story_llama_dir):
    from sparsefast.api import prune
    from sparsefast.config import MagnitudeConfig

    model, tok = _load(story_llama_dir)
    prune(model, MagnitudeConfig(pattern="2:4", device="cpu"), progress=False)
    w = model.model.layers[0].mlp.down_proj.weight
    assert ((w.reshape(-1, 4) != 0).sum(-1) <= 2).all()
    assert served_alone(model, tok, PROMPTS[:2]) == [reference(model, tok, p, GREEDY.max_tokens) for p in PROMPTS[:2]]


def test_opt_family_uses_the_hf_runner():
    """Families without the LLaMA layout fall back to the per-request HF runner and still match generate."""
    from tests.conftest import tiny_model

    model = tiny_model("opt")

    class ByteTokenizer:
        eos_token_id = 2

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i % 26) for i in ids)

    engine = GenerationEngine(model, ByteTokenizer(), max_model_len=64)
    assert type(engine.runner).__name__ == "HFRequestRunner"
    engine.start()
    try:
        prompt = [5, 17, 33, 4]
        got = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    finally:
        engine.shutdown()
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert got == ref[0, 4:].tolist()


def test_seeded_sampling_reproducible_alone_and_in_a_batch(engine, dense):
    _, tok = dense
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


def test_top_k_one_and_tiny_top_p_are_greedy(engine, dense):
    _, tok = dense
    greedy = engine.generate(ids_of(tok), SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    k1 = engine.generate(ids_of(tok), SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=3,
                                                     ignore_eos=True))
    p0 = engine.generate(ids_of(tok), SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, seed=3,
                                                     ignore_eos=True))
    assert greedy == k1 == p0


def test_max_tokens_finishes_with_length(engine, dense):
    _, tok = dense
    events, ids, _ = collect(engine.submit(ids_of(tok), SamplingParams(max_tokens=9, temperature=0.0,
                                                                       ignore_eos=True)))
    assert len(ids) == 9 and events[-1].finish_reason == "length" and events[-1].completion_tokens == 9
    assert all(e.finish_reason is None for e in events[:-1])
    assert [e.prompt_tokens for e in events] == [len(ids_of(tok))] * len(events)


def test_stop_string_cuts_text_and_ends_with_stop(engine, dense):
    _, tok = dense
    full_ids = engine.generate(ids_of(tok), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    full = tok.decode(full_ids, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 5]
    assert stop.strip() and full.find(stop) > 0
    events, ids, text = collect(engine.submit(ids_of(tok), SamplingParams(max_tokens=40, temperature=0.0,
                                                                          stop=("zzzz", stop))))
    assert text == full[:full.find(stop)]
    assert events[-1].finish_reason == "stop" and len(ids) < 40 and ids == full_ids[:len(ids)]


def test_eos_ends_the_request_unless_ignored(engine, dense):
    _, tok = dense
    full = engine.generate(ids_of(tok), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    engine.eos_ids = frozenset({full[6]})  # pretend the 7th greedy token is the model's EOS
    events, ids, _ = collect(engine.submit(ids_of(tok), SamplingParams(max_tokens=20, temperature=0.0)))
    assert ids == full[:full.index(full[6]) + 1] and events[-1].finish_reason == "stop"
    assert engine.generate(ids_of(tok), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)) == full


def test_stream_text_reassembles_to_decode(engine, dense):
    _, tok = dense
    events, ids, text = collect(engine.submit(ids_of(tok), SamplingParams(max_tokens=30, temperature=0.7, seed=5,
                                                                          ignore_eos=True)))
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert all(b.time >= a.time for a, b in zip(events, events[1:]))


def test_cancel_frees_the_slot_for_the_next_request(dense):
    model, tok = dense
    with running_engine(model, tok, max_batch=1, max_queue=4, max_model_len=192) as eng:
        long, it = long_request_under_way(eng, tok)
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


def test_cancel_while_waiting_leaves_the_queue(dense):
    model, tok = dense
    with running_engine(model, tok, max_batch=1, max_queue=2, max_model_len=192) as eng:
        running, it = long_request_under_way(eng, tok)
        waiting = eng.submit(ids_of(tok), SamplingParams(max_tokens=4))
        waiting.cancel()
        assert [e.finish_reason for e in waiting] == ["cancelled"]  # ends while the only slot is still busy
        assert eng.queue_depth == 0 and eng.running == 1
        running.cancel()
        assert list(it)[-1].finish_reason == "cancelled"


def test_queue_full_raises_and_shutdown_cancels_waiting(dense):
    model, tok = dense
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


def test_shutdown_cancels_running_requests(dense):
    model, tok = dense
    eng = GenerationEngine(model, tok, max_batch=2, max_model_len=192)
    eng.start()
    _, it = long_request_under_way(eng, tok)
    eng.shutdown()
    assert list(it)[-1].finish_reason == "cancelled"
    assert not eng._thread.is_alive()


def test_bad_requests_raise_value_errors_naming_the_problem(engine, dense):
    _, tok = dense
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


def test_async_iteration_streams_the_same_tokens(engine, dense):
    _, tok = dense
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = engine.generate(ids_of(tok), sp)

    async def run_two():
        async def one():
            return [t async for e in engine.submit(ids_of(tok), sp) for t in e.token_ids]
        return await asyncio.gather(one(), one())

    assert asyncio.run(run_two()) == [expected, expected]


def test_build_in_thread_returns_or_raises_from_a_thread_that_has_ended():
    import threading

    from sparsefast.serve.engine import build_in_thread

    seen = []
    assert build_in_thread(lambda: seen.append(threading.current_thread()) or 7) == 7
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()

    def fail():
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        build_in_thread(fail)


# ---- admission of a burst ------------------------------------------------------------------------------------------
def _gather_seconds(engine: GenerationEngine) -> float:
    """How long the engine's burst gathering holds what is waiting now (called directly on an engine not started)."""
    with engine._cond:
        t0 = time.perf_counter()
        engine._gather_burst()
        return time.perf_counter() - t0


def test_idle_engine_prefills_a_burst_of_arrivals_in_one_forward(dense):
    model, tok = dense
    ids = ids_of(tok)
    with running_engine(model, tok, max_batch=4, admit_wait=0.5) as eng:
        prefills = record_prefills(eng)
        streams = []
        for _ in range(3):  # 50 ms apart: each within admit_wait of the one before
            streams.append(eng.submit(ids, SHORT))
            time.sleep(0.05)
        assert all(len([e for e in s if e.token_ids]) == 2 for s in streams)
    assert [len(p) for p in prefills] == [3]


def test_gathering_waits_admit_wait_for_a_lone_request_and_not_at_all_when_off_or_full(dense):
    model, tok = dense
    ids = ids_of(tok)
    for admit_wait, requests, low, high in ((0.3, 1, 0.29, 2.0), (0.0, 1, 0.0, 0.05), (1.0, 2, 0.0, 0.5)):
        eng = GenerationEngine(model, tok, max_batch=2, admit_wait=admit_wait)
        try:
            for _ in range(requests):
                eng.submit(ids, SHORT)
            assert low <= _gather_seconds(eng) < high, (admit_wait, requests)
        finally:
            eng.shutdown()


def test_a_steady_trickle_is_held_at_most_ten_admit_waits(dense):
    model, tok = dense
    ids = ids_of(tok)
    eng = GenerationEngine(model, tok, max_batch=256, max_queue=256, max_model_len=32, admit_wait=0.1)
    stop = threading.Event()

    def trickle():  # an arrival every 20 ms for up to 4 s: the burst never ends by itself
        for _ in range(200):
            if stop.wait(0.02):
                return
            eng.submit(ids, SHORT)

    eng.submit(ids, SHORT)
    feeder = threading.Thread(target=trickle)
    feeder.start()
    try:
        held = _gather_seconds(eng)
        depth = eng.queue_depth
    finally:
        stop.set()
        feeder.join()
        eng.shutdown()
    assert 0.9 <= held < 1.5 and 1 < depth < 200  # stopped by the 10 x admit_wait cap, not by the arrivals


def test_shutdown_while_gathering_cancels_without_a_prefill(dense):
    model, tok = dense
    ids = ids_of(tok)
    eng = GenerationEngine(model, tok, max_batch=4, admit_wait=1.0)
    prefills = record_prefills(eng)
    eng.start()
    stream = eng.submit(ids, SHORT)
    time.sleep(0.2)  # the engine is gathering now (up to 10 s)
    t0 = time.perf_counter()
    eng.shutdown()
    assert time.perf_counter() - t0 < 0.5
    events = list(stream)
    assert [(e.token_ids, e.finish_reason) for e in events] == [((), "cancelled")] and prefills == []


@pytest.mark.parametrize("bad", [-0.1, 2, True, "5", float("nan"), float("inf")])
def test_bad_admit_wait_is_refused_before_anything_is_built(dense, bad):
    model, tok = dense
    with pytest.raises(ValueError, match="admit_wait must be a number of seconds in"):
        GenerationEngine(model, tok, admit_wait=bad)
