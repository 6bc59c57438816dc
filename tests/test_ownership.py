"""sparsefast.ownership: the record of the files a save wrote is the only proof of ownership; a directory holding
anything it does not list, or a record that does not parse, names paths outside the directory or through a link,
is refused; removal takes exactly the listed files and never anything else; the output lock excludes a second
holder."""

from __future__ import annotations

import json
import os

import pytest

from sparsefast.ownership import RECORD_FORMAT, RECORD_NAME, owned_files, remove_owned, take_lock, write_record


@pytest.fixture()
def output(tmp_path):
    """A directory as a save leaves it: two files, one in a subdirectory, and the record."""
    root = tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"\0" * 16)
    (root / "sub" / "tokenizer.json").write_text("{}")
    write_record(root)
    return root


def test_the_record_lists_every_file_written(output):
    record = json.loads((output / RECORD_NAME).read_text())
    assert record == {"format": RECORD_FORMAT, "files": ["model.safetensors", "sub/tokenizer.json"]}
    assert owned_files(output) == ["model.safetensors", "sub/tokenizer.json"]


def test_no_record_is_none_and_a_report_named_sparsefast_json_is_no_proof(tmp_path):
    (tmp_path / "sparsefast.json").write_text("{}")
    assert owned_files(tmp_path) is None


@pytest.mark.parametrize("stray", ["thesis.tex", "sub/main.py", "empty-dir/", "sub/deeper/"])
def test_anything_not_listed_is_refused_by_name(output, stray):
    path = output / stray.rstrip("/")
    if stray.endswith("/"):
        path.mkdir()
    else:
        path.write_text("the user's")
    with pytest.raises(ValueError, match=f"holds {stray.rstrip('/')}, which sparsefast did not write"):
        owned_files(output)


@pytest.mark.parametrize("files, message", [
    (["../outside.txt"], "not a file inside"),
    (["/etc/passwd"], "not a file inside"),
    (["./model.safetensors"], "not a file inside"),
    (["sub//tokenizer.json"], "not a file inside"),
    ([""], "not a file inside"),
    ([RECORD_NAME], "not a file inside"),
    (["sub"], "not a regular file"),
    ("model.safetensors", "not a sparsefast-output/1 record"),
    ([1, 2], "not a sparsefast-output/1 record"),
])
def test_a_record_naming_paths_outside_or_not_files_is_refused(output, files, message):
    (output / RECORD_NAME).write_text(json.dumps({"format": RECORD_FORMAT, "files": files}))
    with pytest.raises(ValueError, match=message):
        owned_files(output)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": "their-tool/1", "files": []}), "[]"])
def test_a_record_that_does_not_parse_or_is_not_ours_is_refused(output, text):
    (output / RECORD_NAME).write_text(text)
    with pytest.raises(ValueError, match="does not parse|not a sparsefast-output/1 record"):
        owned_files(output)


def test_links_are_never_followed(output, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "tokenizer.json").write_text("the user's")
    os.rename(output / "sub", tmp_path / "moved")
    (output / "sub").symlink_to(theirs)  # a listed path now runs through a link
    with pytest.raises(ValueError, match="is a symbolic link"):
        owned_files(output)
    (output / "sub").unlink()
    os.rename(tmp_path / "moved", output / "sub")
    (output / "model.safetensors").unlink()
    (output / "model.safetensors").symlink_to(theirs / "tokenizer.json")
    with pytest.raises(ValueError, match="is a symbolic link"):
        owned_files(output)
    record = (output / RECORD_NAME).read_text()
    (output / RECORD_NAME).unlink()
    (tmp_path / "record.json").write_text(record)
    (output / RECORD_NAME).symlink_to(tmp_path / "record.json")
    with pytest.raises(ValueError, match="not a regular file"):
        owned_files(output)
    assert (theirs / "tokenizer.json").read_text() == "the user's"


def test_remove_owned_takes_exactly_the_listed_files(output, capsys):
    files = owned_files(output)
    assert remove_owned(output, files) and not output.exists()
    root = output
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "tokenizer.json").write_text("{}")
    write_record(root)
    files = owned_files(root)
    (root / "sub" / "late.txt").write_text("appeared after the check")
    assert not remove_owned(root, files)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["sub", "sub/late.txt"]
    assert "kept" in capsys.readouterr().err


def test_the_lock_has_one_holder_and_is_removed_on_release(tmp_path):
    lock = tmp_path / ".out.lock"
    fd = take_lock(lock, tmp_path / "out")
    with pytest.raises(FileExistsError, match="another sparsefast run is writing .*not saved"):
        take_lock(lock, tmp_path / "out")
    lock.unlink()  # what a releasing holder does before it unlocks: the next taker locks a fresh file
    os.close(fd)
    fd = take_lock(lock, tmp_path / "out")
    assert lock.is_file() and os.fstat(fd).st_ino == lock.stat().st_ino
    os.close(fd)
