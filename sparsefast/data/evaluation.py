"""Perplexity evaluation text for WikiText-2, PTB and C4 under the two published protocols.

"gptq" (GPTQ / SparseGPT / Wanda, `datautils.py` of those repos; the default):
    wikitext2  WikiText-2 raw test, HF rows `[l + "\\n" if l.strip() else "" for l in lines]` of wiki.test.raw,
               joined with "\\n\\n" (so the text starts "\\n\\n = Robert Boulter = \\n\\n\\n\\n\\n Robert Boulter is").
    ptb        PTB test, HF `ptb_text_only` rows (each line stripped), joined with " ".
    c4         the first 1100 validation documents joined with " ", tokenized, truncated to 256 × seqlen tokens
               (`get_c4_new`). Only the first shard `c4/c4-validation.00000-of-00008.json.gz` is the real thing; when
               it is absent the bundled 1000-document C4 sample is used instead (all 1000 documents, since there are
               fewer than 1100). That sample is NOT the validation split, and `get_calibration("c4")` draws from the
               same 1000 documents, so C4 perplexity on it is neither comparable to published numbers nor
               independent of C4 calibration. WikiText-2 and PTB follow the protocol exactly.
"llm-pruner" (LLM-Pruner, Ma et al. 2023, `LLMPruner/datasets/ppl_dataset.py`; pair it with seqlen 128):
    wikitext2  WikiText-2 raw test rows joined with "\\n\\n" (the same text as "gptq").
    ptb        PTB **validation** rows joined with "\\n\\n".
    c4         not defined by that protocol → ValueError.
The whole text is tokenized once, special tokens included (one BOS at the start for LLaMA tokenizers), as the
reference `tokenizer(text, return_tensors="pt")` does.
"""

from __future__ import annotations

import os

import torch

from sparsefast.data.files import find_data_file, read_documents, read_text, split_lines, tokenize

EVAL_DATASETS = ("wikitext2", "ptb", "c4")
PROTOCOLS = ("gptq", "llm-pruner")
C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256

WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
PTB_TEST = "ptb/ptb.test.txt"
PTB_VALID = "ptb/ptb.valid.txt"
C4_VALID_FILES = ("c4/c4-validation.00000-of-00008.json.gz", "c4/c4-sample.00000-of-00001.json.gz")


def check_eval_request(name: str, protocol: str = "gptq") -> None:
    """Raise ValueError for an unknown dataset or protocol, or a pair the protocol does not define."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown perplexity protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if name not in EVAL_DATASETS:
        raise ValueError(f"unknown perplexity dataset {name!r}; choose from {', '.join(EVAL_DATASETS)}")
    if protocol == "llm-pruner" and name == "c4":
        raise ValueError("the llm-pruner protocol defines wikitext2 and ptb only; use --protocol gptq for c4")


def eval_data_files(name: str, protocol: str = "gptq") -> tuple[str, ...]:
    """Relative data paths (in order of preference) that `name` under `protocol` reads."""
    check_eval_request(name, protocol)
    if name == "wikitext2":
        return (WIKITEXT2_TEST,)
    if name == "ptb":
        return (PTB_TEST,) if protocol == "gptq" else (PTB_VALID,)
    return C4_VALID_FILES


def wikitext2_rows(text: str) -> list[str]:
    """HF `wikitext-2-raw-v1` rows from the raw file's text: every line, "" for blank ones, "\\n" kept on others."""
    return [line + "\n" if line.strip() else "" for line in split_lines(text)]


def ptb_rows(text: str) -> list[str]:
    """HF `ptb_text_only` rows ("sentence" field): every line of the file, stripped."""
    return [line.strip() for line in split_lines(text)]


def get_eval_text(name: str, protocol: str = "gptq", data_dir: str | os.PathLike | None = None) -> str:
    """The evaluation text of `name` under `protocol`, before tokenization (see the module docstring).

    For c4 this is the joined documents; the 256 × seqlen token cut happens in `get_eval_tokens`.
    Raises ValueError (unknown name/protocol) or FileNotFoundError (every path looked at).
    """
    path = find_data_file(eval_data_files(name, protocol), data_dir)
    if name == "wikitext2":
        return "\n\n".join(wikitext2_rows(read_text(path)))
    if name == "ptb":
        rows = ptb_rows(read_text(path))
        return " ".join(rows) if protocol == "gptq" else "\n\n".join(rows)
    return " ".join(read_documents(path)[:C4_EVAL_DOCS])


def get_eval_tokens(
    name: str,
    tokenizer,
    protocol: str = "gptq",
    data_dir: str | os.PathLike | None = None,
    *,
    seqlen: int | None = None,
) -> torch.LongTensor:
    """Token ids of the evaluation text → LongTensor [1, T] on CPU.

    Args:
        name: "wikitext2", "ptb" or "c4".
        tokenizer: a transformers tokenizer; the text is tokenized in one call with special tokens.
        protocol: "gptq" (default) or "llm-pruner".
        data_dir: searched first for data files, then $SPARSEFAST_DATA, then the bundled copy.
        seqlen: only for c4 under "gptq": keep the first 256 × seqlen tokens, as the reference does. Ignored
            otherwise; None keeps all c4 tokens.
    """
    text = get_eval_text(name, protocol, data_dir)
    ids = tokenize(tokenizer, text)[0]
    if name == "c4" and seqlen is not None:
        if seqlen < 1:
            raise ValueError(f"seqlen must be ≥ 1, got {seqlen}")
        ids = ids[: C4_EVAL_WINDOWS * seqlen]
    return torch.tensor([ids], dtype=torch.long)
