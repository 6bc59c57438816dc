"""sparsefast.checkpoint, the one checkpoint writer: a pruned model reloads with its zeros; saves are atomic (an
interrupted one leaves nothing, a failed overwrite keeps the old output); --overwrite replaces only an empty directory
or our own output, never the model source, the working directory or its parents; two writers to one new directory:
exactly one wins; the umask is respected; stale partial saves of the same target are removed on the next save; a
model transformers cannot save is refused before any work."""

from __future__ import annotations

import fcntl
import os
import stat
import threading

import pytest
import torch
import transformers

import sparsefast.api as api
from sparsefast.checkpoint import check_output_dir, check_savable, load_report, save_checkpoint, write_json
from sparsefast.config import WandaConfig
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_saved_checkpoint_reloads_with_zeros(tmp_path, story_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(story_llama_dir)
    tok = transformers.AutoTokenizer.from_pretrained(story_llama_dir)
    calib = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(1))
    rep = api.prune(model, WandaConfig(pattern="4:8", nsamples=2, seqlen=32), calib, progress=False)
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


def test_unsavable_quantized_model_is_refused_before_work():
    class Quantizer:
        quantization_config = type("QC", (), {"quant_method": "bitsandbytes"})()

        @staticmethod
        def is_serializable():
            return False

    model = tiny_model("llama")
    model.hf_quantizer = Quantizer()
    with pytest.raises(ValueError, match="quantized with bitsandbytes, which transformers cannot save"):
        check_savable(model)


def test_overwrite_refuses_a_directory_that_is_not_our_output(tmp_path, model):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not a sparsefast output"):
        save_checkpoint(model, None, work, {"method": "m"}, overwrite=True)
    assert [p.name for p in work.iterdir()] == ["thesis.tex"]
    (tmp_path / "empty").mkdir()
    save_checkpoint(model, None, tmp_path / "empty", {"method": "m"}, overwrite=True)  # an empty dir is fine
    save_checkpoint(model, None, tmp_path / "empty", {"method": "again"}, overwrite=True)  # our own output too
    assert load_report(tmp_path / "empty")["method"] == "again"
    # a structure.json of someone else's format does not make a directory ours
    other = tmp_path / "other"
    other.mkdir()
    (other / "structure.json").write_text('{"format": "their-tool"}')
    with pytest.raises(ValueError, match="not a sparsefast output"):
        check_output_dir(other, overwrite=True)


def test_out_may_not_be_the_cwd_its_parents_or_the_model_source(tmp_path, monkeypatch, model):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(ValueError, match="current directory"):
            check_output_dir(out, overwrite=True)
    src = tmp_path / "models" / "src"
    save_checkpoint(model, None, src, {"method": "dense original"})
    for out in (src, src / ".." / "src"):
        with pytest.raises(ValueError, match="is the model source"):
            check_output_dir(out, overwrite=True, sources=[src])
    with pytest.raises(ValueError, match="contains the model source"):
        check_output_dir(tmp_path / "models", overwrite=True, sources=[src / "model.safetensors"])
    assert load_report(src)["method"] == "dense original"


def test_two_writers_to_one_new_dir_exactly_one_wins(tmp_path):
    """Both writers are inside save_pretrained at the same time (a barrier), so both passed every existence check
    before either published: the second rename must fail instead of replacing the first result."""
    out = tmp_path / "out"
    barrier = threading.Barrier(2, timeout=60)
    results: dict[str, object] = {}

    def writer(tag: str) -> None:
        m = tiny_model("llama", seed=len(tag))
        real = m.save_pretrained

        def save_in_lockstep(path, **kw):
            real(path, **kw)
            barrier.wait()

        m.save_pretrained = save_in_lockstep
        try:
            results[tag] = save_checkpoint(m, None, out, {"method": tag})
        except Exception as exc:  # noqa: BLE001 - the loser's exception is the result under test
            results[tag] = exc

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    errors = [r for r in results.values() if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], FileExistsError), results
    winner = next(tag for tag, r in results.items() if not isinstance(r, BaseException))
    assert load_report(out)["method"] == winner
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the loser's partial dir is gone


def test_output_dirs_follow_the_umask(tmp_path, model):
    old = os.umask(0o022)
    try:
        out = save_checkpoint(model, None, tmp_path / "new" / "out", {"method": "m"})
        report = write_json(tmp_path / "report.json", {"method": "m"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(report.stat().st_mode) == 0o644
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o755
    for f in out.iterdir():  # safetensors writes 0600 files of its own
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_stale_partials_of_the_target_are_removed_with_a_message(tmp_path, model, capsys):
    stale = tmp_path / ".out.partial-k1ll3d"  # left by a SIGKILLed save of `out`
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    live = tmp_path / ".out.partial-l1ve"  # another writer is still filling this one: it holds the lock
    live.mkdir()
    other = tmp_path / ".other.partial-x"  # a partial of another target is not ours to judge
    other.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        save_checkpoint(model, None, tmp_path / "out", {"method": "m"})
    finally:
        os.close(fd)
    assert not stale.exists() and live.is_dir() and other.is_dir()
    err = capsys.readouterr().err
    assert "removed" in err and str(stale) in err and "interrupted" in err
    assert load_report(tmp_path / "out")["method"] == "m"


WRITER = """
import sys, time
from pathlib import Path
from sparsefast.checkpoint import save_checkpoint
from tests.conftest import tiny_model

out, tag = Path(sys.argv[1]), sys.argv[2]
model = tiny_model("llama")
real = model.save_pretrained

def save_then_wait_for_the_other(path, **kw):
    real(path, **kw)
    (out.parent / f"ready-{tag}").touch()
    deadline = time.time() + 120
    while len(list(out.parent.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.02)

model.save_pretrained = save_then_wait_for_the_other
try:
    save_checkpoint(model, None, out, {"method": tag})
except FileExistsError as exc:
    print(exc)
    sys.exit(2)
"""


def test_two_processes_to_one_new_dir_exactly_one_wins(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), tag], cwd=repo, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for tag in ("p1", "p2")]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(out_text for code, out_text, _ in results if code == 2)
    assert "this result was not saved" in loser
    winner = ("p1", "p2")[[code for code, _, _ in results].index(0)]
    assert load_report(out)["method"] == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ready-p1", "ready-p2"]
