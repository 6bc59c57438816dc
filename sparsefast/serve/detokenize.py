"""Incremental detokenization with stop strings (OpenAI semantics: the stop string and everything after it are not
returned). Text is held back while it could still become a stop string, or while it ends in an incomplete UTF-8
sequence (the tokenizer decodes that as U+FFFD), so every emitted piece is final.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


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

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became final. Sets `stopped` when a stop string appeared."""
        self.ids.append(int(token_id))
        text = self._text()
        if self.stop:
            # search from just before the emitted part: a stop string may straddle it
            start = max(0, self.emitted - max(map(len, self.stop)) + 1)
            hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
            if hits:
                self.stopped = True
                cut = max(min(hits), self.emitted)
                out, self.emitted = text[self.emitted:cut], cut
                return out
        end = len(text)
        while end > self.emitted and text[end - 1] == REPLACEMENT:
            end -= 1
        end -= max((k for s in self.stop for k in range(1, min(len(s) - 1, end - self.emitted) + 1)
                    if text.endswith(s[:k], 0, end)), default=0)  # a tail that may grow into a stop string
        out, self.emitted = text[self.emitted:end], max(self.emitted, end)
        return out

    def flush(self) -> str:
        """Everything not yet returned (call when generation ends for a reason other than a stop string)."""
        if self.stopped:
            return ""
        text = self._text()
        out, self.emitted = text[self.emitted:], len(text)
        return out
