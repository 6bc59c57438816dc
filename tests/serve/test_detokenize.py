"""Incremental detokenization (sparsefast.serve.detokenize): text that may still become a stop string, or ends in an
incomplete UTF-8 sequence, is held back until it is final."""

from __future__ import annotations

from sparsefast.serve.detokenize import IncrementalDetokenizer


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
