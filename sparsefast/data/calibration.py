"""Calibration samples: `nsamples` random windows of `seqlen` tokens, drawn as Wanda (Sun et al. 2023, "A Simple and
Effective Pruning Approach for Large Language Models") and SparseGPT (Frantar & Alistarh 2023) draw them.

Sampler (Wanda's `get_c4`): a `random.Random(seed)` generator — the same draws as the reference code's
`random.seed(seed)` followed by module-level `random.randint` calls, without touching Python's global RNG. For each
sample: draw document indices `randint(0, n_docs - 1)` until one tokenizes to MORE than `seqlen` tokens, then a start
`randint(0, n_tokens - seqlen - 1)` (the reference's bound: the very last window is never chosen), and take
`ids[start : start + seqlen]`. A source with a single document (WikiText-2 train joined with " ", a .txt file) skips
the document draw, as SparseGPT/Wanda's `get_wikitext2` does. Each document is tokenized on its own, special tokens
included, exactly as the reference's `tokenizer(doc)`; tokenization is lazy and cached, so only drawn documents are
tokenized.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import torch

from sparsefast.data.files import find_data_file, read_documents, read_text, split_lines, tokenize

# Wanda's calibration shard (allenai/c4 en/c4-train.00000-of-01024.json.gz) when present, else the bundled sample
C4_TRAIN_FILES = ("c4/c4-train.00000-of-01024.json.gz", "c4/c4-sample.00000-of-00001.json.gz")
# WikiText-2 train text is never bundled (10.8 MB). The test split is deliberately NOT a fallback: calibrating on the
# text the model is then evaluated on would leak. Preference: raw train, raw valid, tokenized train, tokenized valid.
WIKITEXT2_CALIB_FILES = ("wikitext-2-raw/wiki.train.raw", "wikitext-2-raw/wiki.valid.raw",
                         "wikitext-2/train.txt", "wikitext-2/valid.txt")
CALIBRATION_SOURCES = ("c4", "wikitext2")


def calibration_documents(source: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The documents the sampler draws from.

    - "c4": the JSON-lines records' `text` of c4/c4-train.00000-of-01024.json.gz (Wanda's shard) if found, else the
      bundled 1000-document C4 sample (the same sample `get_eval_tokens("c4")` falls back to: see its caveat).
    - "wikitext2": ONE document, the HF rows of the first WikiText-2 file found among WIKITEXT2_CALIB_FILES joined
      with " " (SparseGPT/Wanda `get_wikitext2`). The train split is not available offline here and is not bundled;
      put `wikitext-2-raw/wiki.train.raw` in --data-dir to get the reference behaviour. Without it the raw or
      tokenized (`<unk>`-containing) validation split is used — what exists offline — never the test split.
    - a path to a local .txt / .raw (one document) or .jsonl / .json(.gz) (records with "text") file.
    """
    if source == "c4":
        return read_documents(find_data_file(C4_TRAIN_FILES, data_dir))
    if source == "wikitext2":
        lines = split_lines(read_text(find_data_file(WIKITEXT2_CALIB_FILES, data_dir)))
        return [" ".join(line + "\n" if line.strip() else "" for line in lines)]
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration source {source!r} is neither one of {', '.join(CALIBRATION_SOURCES)} "
                                f"nor an existing file (looked at {os.path.abspath(path)})")
    return read_documents(path)


def sample_windows(
    documents: Sequence[str],
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
) -> torch.LongTensor:
    """Wanda's sampler over `documents` (see the module docstring) → LongTensor [nsamples, seqlen].

    Raises ValueError for nsamples < 1, seqlen < 1, no documents, or when no document tokenizes to more than
    seqlen tokens (the message gives the longest document's token count).
    """
    _check_sizes(nsamples, seqlen)
    if not documents:
        raise ValueError("the calibration source has no (non-empty) documents")
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}

    def ids_of(index: int) -> list[int]:
        if index not in cache:
            cache[index] = tokenize(tokenizer, documents[index])[0]
        return cache[index]

    n_docs = len(documents)
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    eligible = 0  # documents known to be long enough; lets a hopeless search stop instead of looping forever
    for s in range(nsamples):
        if n_docs == 1:
            ids = ids_of(0)
            if len(ids) <= seqlen:
                raise _too_short(seqlen, [len(ids)])
        else:
            while True:
                index = rng.randint(0, n_docs - 1)
                new = index not in cache
                ids = ids_of(index)
                if len(ids) > seqlen:
                    eligible += new
                    break
                if new and len(cache) == n_docs and eligible == 0:
                    raise _too_short(seqlen, [len(v) for v in cache.values()])
        start = rng.randint(0, len(ids) - seqlen - 1)
        out[s] = torch.tensor(ids[start:start + seqlen], dtype=torch.long)
    return out


def get_calibration(
    source: str,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> torch.LongTensor:
    """Calibration token windows → LongTensor [nsamples, seqlen] on CPU.

    Args:
        source: "c4" (default of the papers: 128 × 2048 from C4, seed 0), "wikitext2", or a local text/JSON path
            (see `calibration_documents` for what each reads and the offline WikiText-2 caveat).
        tokenizer: a transformers tokenizer (fast ones are much quicker on long texts).
        nsamples, seqlen: number and length of the windows, both ≥ 1. That seqlen fits the model's context is
            checked by the caller, which knows the model.
        seed: seeds `random.Random(seed)`; identical to the reference code's `random.seed(seed)` draws.
        data_dir: searched first for data files (then $SPARSEFAST_DATA, then the bundled copy).

    Raises ValueError (bad sizes, text too short for one sample) or FileNotFoundError (every place looked at) before
    any tokenization.
    """
    _check_sizes(nsamples, seqlen)
    documents = calibration_documents(source, data_dir)
    return sample_windows(documents, tokenizer, nsamples, seqlen, seed)


def _check_sizes(nsamples: int, seqlen: int) -> None:
    if int(nsamples) != nsamples or nsamples < 1:
        raise ValueError(f"nsamples must be an integer ≥ 1, got {nsamples!r}")
    if int(seqlen) != seqlen or seqlen < 1:
        raise ValueError(f"seqlen must be an integer ≥ 1, got {seqlen!r}")


def _too_short(seqlen: int, lengths: list[int]) -> ValueError:
    return ValueError(
        f"calibration text too short: no document has more than seqlen={seqlen} tokens (the longest of "
        f"{len(lengths)} has {max(lengths, default=0)} tokens); use a smaller --seqlen or a longer text"
    )
