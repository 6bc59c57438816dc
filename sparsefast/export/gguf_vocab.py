"""A Hugging Face tokenizer as GGUF metadata (tokens, token types, scores or merges, special ids, chat template), the
way llama.cpp's convert_hf_to_gguf.py writes them for the two tokenizer kinds of the LLaMA family:

* byte-level BPE (GPT-2 style: SmolLM2, Llama 3) → `tokenizer.ggml.model = "gpt2"` with its merges and the
  pre-tokenizer name llama.cpp splits text with (`tokenizer.ggml.pre`);
* SentencePiece-style BPE with byte fallback (LLaMA 1/2, Mistral, the tiny story llama) → `"llama"`, whose merge
  priority llama.cpp reads from per-token scores: a token made by merge number r scores −r, so llama.cpp merges in
  the tokenizer's own merge order.

The token list is padded to the model's vocabulary (embedding rows) with unused `[PAD{i}]` tokens, as the converter
does. Token ids are the tokenizer's own, so ids that sparsefast produces mean the same tokens in llama.cpp.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import gguf

# the split regex of Llama 3's tokenizer.json, which llama.cpp names "llama-bpe"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """Write `tokenizer` (a transformers tokenizer with a tokenizer.json) into `writer` for a model of `vocab_size`
    embedding rows. Raises ValueError for a tokenizer kind llama.cpp cannot reproduce."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        if not path.is_file():
            raise ValueError("the tokenizer has no tokenizer.json (a slow tokenizer); export needs a fast one: "
                             "save it with transformers' AutoTokenizer first")
        spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model {model.get('type')!r} is not BPE; GGUF export supports byte-level BPE and "
                         "SentencePiece-style BPE tokenizers")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tokens, types = _tokens_and_types(tokenizer, vocab_size)
    if model.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(_merge_scores(tokens, merges))
        writer.add_token_types([gguf.TokenType.BYTE if _BYTE_TOKEN.fullmatch(t) and ty == gguf.TokenType.NORMAL
                                else ty for t, ty in zip(tokens, types)])
        writer.add_add_space_prefix(_prepends_space(spec))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int):
            getattr(writer, f"add_{kind}_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _tokens_and_types(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their GGUF types (special added tokens CONTROL, other added tokens USER_DEFINED),
    padded with UNUSED `[PAD{i}]` up to `vocab_size`."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embedding rows")
    added = {i: tok for i, tok in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores: the token made by merge r scores −r (earlier merges win in llama.cpp); tokens
    that no merge makes (single characters, bytes, specials) score 0."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _prepends_space(spec: dict) -> bool:
    """Whether the normalizer (or a Metaspace pre-tokenizer) puts ▁ before the text: llama.cpp's add_space_prefix."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer: ByteLevel with its GPT-2 regex → gpt-2; Llama 3's split
    regex followed by ByteLevel → llama-bpe. Raises ValueError for others."""
    parts = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") if isinstance(p, dict) else None for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    raise ValueError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp equivalent known to "
                     "sparsefast (supported: GPT-2 byte level, Llama 3); export is not possible for this tokenizer")
