"""Incremental detokenization with stop strings (OpenAI semantics: the stop string and everything after it are not
returned). Text is held back while it could still become a stop string, or while it ends in an incomplete UTF-8
sequence (the tokenizer decodes that as U+FFFD), so every emitted piece is final.

Cost of the stop check per step: the text held back is at most the longest stop string minus one character plus
MAX_PENDING_REPLACEMENTS, so each stop string is searched for in that tail plus the step's new text, and the tail that
may grow into a stop string is found by trying only the prefixes that end in the tail's last character. With the
request limits of sparsefast.serve.sampling (MAX_STOP_STRINGS strings of MAX_STOP_CHARS characters) a step's check is
bounded whatever the request asks; the engine validates those limits before a request runs.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
# an incomplete UTF-8 character is at most 3 bytes, which a tokenizer decodes to at most 3 U+FFFD; more of them in a
# row are real U+FFFD characters of the text and are emitted
MAX_PENDING_REPLACEMENTS = 3


class IncrementalDetokenizer:
    """Feed generated token ids one at a time; get the newly final text back.

    Decodes the whole generated sequence on each call (skip_special_tokens=True), so tokenizers that merge pieces
    across token boundaries (SentencePiece's leading space, byte fallback) give exactly `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.stopped = False
        self._longest_stop = max(map(len, stop), default=0)
        # per stop string: character c -> the lengths k (longest first) of its proper prefixes that end in c
        self._prefix_ends: list[tuple[str, dict[str, list[int]]]] = []
        for s in stop:
            ends: dict[str, list[int]] = {}
            for k in range(len(s) - 1, 0, -1):
                ends.setdefault(s[k - 1], []).append(k)
            self._prefix_ends.append((s, ends))

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became final. Sets `stopped` when a stop string appeared."""
        self.ids.append(int(token_id))
        text = self._text()
        if self.stop:
            # search from just before the emitted part: a stop string may straddle it
            start = max(0, self.emitted - self._longest_stop + 1)
            hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
            if hits:
                self.stopped = True
                cut = max(min(hits), self.emitted)
                out, self.emitted = text[self.emitted:cut], cut
                return out
        end = len(text)
        pending = 0
        while end > self.emitted and pending < MAX_PENDING_REPLACEMENTS and text[end - 1] == REPLACEMENT:
            end, pending = end - 1, pending + 1
        end -= self._stop_prefix_at(text, end)
        out, self.emitted = text[self.emitted:end], max(self.emitted, end)
        return out

    def _stop_prefix_at(self, text: str, end: int) -> int:
        """Length of the longest proper prefix of a stop string that text[emitted:end] ends with (0 if none): that
        tail may still grow into the stop string."""
        if end <= self.emitted:
            return 0
        room, best = end - self.emitted, 0
        for s, ends in self._prefix_ends:
            for k in ends.get(text[end - 1], ()):
                if k <= best:
                    break
                if k <= room and text.endswith(s[:k], 0, end):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """Everything not yet returned (call when generation ends for a reason other than a stop string)."""
        if self.stopped:
            return ""
        text = self._text()
        out, self.emitted = text[self.emitted:], len(text)
        return out
