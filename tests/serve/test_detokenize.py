"""Incremental detokenization (sparsefast.serve.detokenize): text that may still become a stop string, or ends in an
incomplete UTF-8 sequence, is held back until it is final, and no more than that (the per-step stop check searches
the held-back text)."""

from __future__ import annotations

import random

from sparsefast.serve.detokenize import MAX_PENDING_REPLACEMENTS, IncrementalDetokenizer


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


def test_only_an_incomplete_character_is_held_back():
    """At most MAX_PENDING_REPLACEMENTS U+FFFD can be an unfinished character; a longer run is text and goes out, so
    the held-back text (which every step searches for stop strings) stays bounded."""
    det = IncrementalDetokenizer(_CharTokenizer(), stop=("END",))
    out = "".join(det.add(0xFFFD) for _ in range(MAX_PENDING_REPLACEMENTS + 5))
    assert out == "\ufffd" * 5 and det.flush() == "\ufffd" * MAX_PENDING_REPLACEMENTS


def test_held_back_tail_equals_the_brute_force_rule():
    """The tail kept back is the longest proper prefix of a stop string that the unreturned text ends with; the
    indexed search against trying every prefix, on random texts over a small alphabet (many partial matches)."""
    rng = random.Random(0)
    for _ in range(300):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 4)))
        det = IncrementalDetokenizer(_CharTokenizer(), stop=stops)
        text = "".join(rng.choice("abc") for _ in range(rng.randint(1, 12)))
        det.emitted = rng.randint(0, len(text) - 1)
        room = len(text) - det.emitted
        brute = max((k for s in stops for k in range(1, min(len(s) - 1, room) + 1) if text.endswith(s[:k])),
                    default=0)
        assert det._stop_prefix_at(text, len(text)) == brute, (stops, text, det.emitted)


def test_pieces_reassemble_to_the_text_cut_at_the_first_completed_stop():
    rng = random.Random(1)
    for _ in range(200):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4)))
        text = "".join(rng.choice("abc") for _ in range(30))
        det = IncrementalDetokenizer(_CharTokenizer(), stop=stops)
        out = ""
        for c in text:
            out += det.add(ord(c))
            if det.stopped:
                break
        out += det.flush()
        # generation stops when the first stop string is complete; the text ends where the earliest one found starts
        done = min((i + len(s) for s in stops if (i := text.find(s)) >= 0), default=len(text))
        cut = min((i for s in stops if (i := text.find(s, 0, done)) >= 0), default=len(text))
        assert out == text[:cut] and det.stopped == (cut < len(text)), (stops, text)
