"""sparsefast.data.files: a broken calibration file (not gzip, not UTF-8) or a missing --data-dir is one error
naming it."""

from __future__ import annotations

import pytest

from sparsefast.data import find_data_file, read_documents


def test_bad_gzip_and_binary_calibration_files_name_the_file(tmp_path):
    fake = tmp_path / "c4.json.gz"
    fake.write_text('{"text": "plain text, not gzip"}\n')
    with pytest.raises(ValueError, match=r"c4\.json\.gz: not a valid gzip file"):
        read_documents(fake)
    binary = tmp_path / "calib.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=r"calib\.txt: not UTF-8 text"):
        read_documents(binary)


def test_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir .*nowhere does not exist"):
        find_data_file("wikitext-2-raw/wiki.test.raw", tmp_path / "nowhere")
