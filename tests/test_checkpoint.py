"""sparsefast.checkpoint, the one checkpoint writer: a pruned model reloads with its zeros; saves are atomic (an
interrupted one leaves nothing, a failed overwrite keeps the old output); --overwrite replaces only an empty directory
or an output whose record lists everything in it, and removes only the listed files, never the model source, the
working directory or its parents, never a user's folder that merely holds a sparsefast.json; two processes on one
directory (new, or replaced with overwrite): exactly one writes, the other gets "not saved"; --json files are never
replaced without overwrite; the umask is respected; stale partial saves of the same target are removed on the next
save; a model transformers cannot save is refused before any work."""

from __future__ import annotations

import fcntl
import json
import os
import stat

import pytest
import torch
import transformers

import sparsefast.api as api
from sparsefast.checkpoint import (
    OutputClaim,
    check_output_dir,
    check_savable,
    load_report,
    save_checkpoint,
    write_json,
)
from sparsefast.config import WandaConfig
from sparsefast.ownership import RECORD_NAME
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


def test_overwrite_replaces_only_the_files_sparsefast_wrote(tmp_path, model):
    out = save_checkpoint(model, None, tmp_path / "out", {"method": "old"})
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        save_checkpoint(model, None, out, {})
    save_checkpoint(model, None, out, {"method": "m"}, overwrite=True)
    assert load_report(out)["method"] == "m" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["format"] == "sparsefast-output/1"
    assert sorted(record["files"]) == sorted(p.name for p in out.iterdir() if p.name != RECORD_NAME)
    (out / "notes").mkdir()
    (out / "notes" / "stale.txt").write_text("the user's, inside our own output")
    with pytest.raises(ValueError, match="holds notes, which sparsefast did not write"):
        save_checkpoint(model, None, out, {"method": "again"}, overwrite=True)
    assert (out / "notes" / "stale.txt").read_text() == "the user's, inside our own output"
    assert load_report(out)["method"] == "m"


def test_a_project_folder_with_a_report_named_sparsefast_json_is_never_replaced(tmp_path, model):
    """Issue 20, case 5: thesis.tex, src/main.py and a report the user wrote with --json sparsefast.json."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "thesis.tex").write_text("years of work")
    (proj / "src" / "main.py").write_text("print('mine')")
    write_json(proj / "sparsefast.json", {"method": "wanda"})
    before = sorted(p.relative_to(proj).as_posix() for p in proj.rglob("*"))
    with pytest.raises(ValueError, match="holds sparsefast.json but no record.*delete it yourself or choose another"):
        save_checkpoint(model, None, proj, {"method": "m"}, overwrite=True)
    assert sorted(p.relative_to(proj).as_posix() for p in proj.rglob("*")) == before
    assert (proj / "thesis.tex").read_text() == "years of work"


def test_an_output_of_an_earlier_version_is_refused_with_the_way_out(tmp_path, model):
    old = save_checkpoint(model, None, tmp_path / "old", {"method": "m"})
    (old / RECORD_NAME).unlink()  # what sparsefast before the record wrote
    with pytest.raises(ValueError, match="no record of the files sparsefast wrote.*earlier sparsefast versions"):
        check_output_dir(old, overwrite=True)


def test_a_file_that_appears_during_the_save_is_kept_and_the_result_not_saved(tmp_path, model, monkeypatch):
    out = save_checkpoint(model, None, tmp_path / "out", {"method": "first"})
    real = model.save_pretrained

    def save_while_the_user_adds_a_file(path, **kw):
        real(path, **kw)
        (out / "added-meanwhile.txt").write_text("the user's")

    monkeypatch.setattr(model, "save_pretrained", save_while_the_user_adds_a_file)
    with pytest.raises(FileExistsError, match="added-meanwhile.txt, which sparsefast did not write.*not saved"):
        save_checkpoint(model, None, out, {"method": "second"}, overwrite=True)
    assert load_report(out)["method"] == "first" and (out / "added-meanwhile.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_claim_holds_the_output_for_the_whole_run(tmp_path, model):
    out = tmp_path / "new" / "deeper" / "out"
    with OutputClaim(out) as claim:
        with pytest.raises(FileExistsError, match="another sparsefast run is writing .*this result was not saved"):
            save_checkpoint(model, None, out, {"method": "intruder"})
        assert save_checkpoint(model, None, claim, {"method": "owner"}) == out.resolve()
    assert load_report(out)["method"] == "owner" and sorted(p.name for p in out.parent.iterdir()) == ["out"]
    with pytest.raises(KeyboardInterrupt):  # a run stopped before its save leaves no directory it made
        with OutputClaim(tmp_path / "made" / "for" / "out"):
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


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
    with pytest.raises(ValueError, match="is inside the model source"):  # adding files to the input changes it too
        check_output_dir(src / "pruned", sources=[src])
    assert load_report(src)["method"] == "dense original"


def test_json_files_are_replaced_only_with_overwrite(tmp_path, monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    with pytest.raises(ValueError, match="notes.txt exists; choose another file name or pass --overwrite"):
        write_json(notes, {"method": "m"}, overwrite=False)
    assert notes.read_text() == "the user's notes"
    real_link = os.link

    def link_after_the_user_wrote(src, dst):
        (tmp_path / "late.json").write_text("written by the user meanwhile")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_the_user_wrote)
    with pytest.raises(FileExistsError, match="late.json appeared while this result was being written.*not saved"):
        write_json(tmp_path / "late.json", {"method": "m"}, overwrite=False)
    assert (tmp_path / "late.json").read_text() == "written by the user meanwhile"
    monkeypatch.undo()
    write_json(notes, {"method": "m"}, overwrite=True)
    assert json.loads(notes.read_text()) == {"method": "m"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.json", "notes.txt"]  # no temporary file left


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

out, sync, tag, other, overwrite = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
model = tiny_model("llama")
real = model.save_pretrained

def save_then_wait_for_the_other(path, **kw):
    real(path, **kw)
    (sync / f"ready-{tag}").touch()
    deadline = time.time() + 120  # until the other is inside its save too, or has given up
    while not any((sync / f"{s}-{other}").exists() for s in ("ready", "done")) and time.time() < deadline:
        time.sleep(0.02)

model.save_pretrained = save_then_wait_for_the_other
try:
    save_checkpoint(model, None, out, {"method": tag}, overwrite=overwrite)
except FileExistsError as exc:
    print(exc)
    sys.exit(2)
finally:
    (sync / f"done-{tag}").touch()
"""


@pytest.mark.parametrize("overwrite", [False, True], ids=["new-dir", "overwrite"])
def test_two_processes_on_one_output_exactly_one_wins(tmp_path, model, overwrite):
    """Each writer waits inside its save until the other is inside its own or has stopped: without a lock on the
    target both publish (with overwrite, both "saved", the last one wins); with it the second stops at once."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out, sync = tmp_path / "out", tmp_path / "sync"
    sync.mkdir()
    if overwrite:
        save_checkpoint(model, None, out, {"method": "earlier"})
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(sync), tag, other, str(int(overwrite))],
                              cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag, other in (("p1", "p2"), ("p2", "p1"))]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(out_text for code, out_text, _ in results if code == 2)
    assert "this result was not saved" in loser
    winner = ("p1", "p2")[[code for code, _, _ in results].index(0)]
    assert load_report(out)["method"] == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sync"]  # no partial, lock or old directory left
