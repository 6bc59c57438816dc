"""sparsefast.export.gguf read back with gguf's own reader: architecture, per-layer arrays, every tensor's shape and
values (rotary rows un-permuted), tokenizer and chat template, outtypes, and the output-safety rules."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers

from sparsefast.export.gguf import export_gguf, is_sparsefast_gguf, rotary_rows_to_gguf
from tests.conftest import tiny_model


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _tensors(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def _values(t: gguf.ReaderTensor) -> np.ndarray:
    """A tensor's values as float32 [rows, cols] (numpy order), dequantized when quantized."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def _from_gguf_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of rotary_rows_to_gguf."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def test_dense_story_llama_reads_back(story, tmp_path):
    model, tok = story
    path = export_gguf(model, tok, tmp_path / "story.gguf")
    r = gguf.GGUFReader(path)
    assert _field(r, "general.architecture") == "llama"
    assert (_field(r, "llama.block_count"), _field(r, "llama.attention.head_count"),
            _field(r, "llama.attention.head_count_kv"), _field(r, "llama.feed_forward_length")) == (2, 8, 4, 384)
    assert _field(r, "llama.attention.key_length") == 16 and _field(r, "llama.rope.freq_base") == 10000.0
    tensors = _tensors(r)
    assert "output.weight" not in tensors   # tied head: llama.cpp reuses token_embd
    assert len(tensors) == 2 + 2 * 9
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(_values(tensors["token_embd.weight"]), sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(_values(tensors["blk.1.ffn_down.weight"]), sd["model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(_from_gguf_rows(_values(tensors["blk.0.attn_q.weight"]), 8),
                                  sd["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(_from_gguf_rows(_values(tensors["blk.0.attn_k.weight"]), 4),
                                  sd["model.layers.0.self_attn.k_proj.weight"])
    # tokenizer: SentencePiece-style BPE with byte fallback → llama.cpp's "llama" model, ids unchanged
    assert _field(r, "tokenizer.ggml.model") == "llama"
    tokens = _field(r, "tokenizer.ggml.tokens")
    vocab = tok.get_vocab()
    assert len(tokens) == 2048 and all(vocab[t] == i for i, t in enumerate(tokens))
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[1] == gguf.TokenType.CONTROL and types[tokens.index("\n")] == gguf.TokenType.NORMAL
    scores = _field(r, "tokenizer.ggml.scores")
    assert scores[tokens.index("th")] == -2.0 > scores[tokens.index("happ")]   # merge 2 before merge 100
    assert _field(r, "tokenizer.ggml.bos_token_id") == 1 and _field(r, "tokenizer.ggml.add_bos_token") is True
    assert is_sparsefast_gguf(path)


def test_layerwise_structural_uses_deci_arrays(story_layerwise, tmp_path):
    model, tok = story_layerwise
    r = gguf.GGUFReader(export_gguf(model, tok, tmp_path / "s.gguf"))
    assert _field(r, "general.architecture") == "deci"
    assert _field(r, "deci.attention.head_count") == [8, 4]
    assert _field(r, "deci.attention.head_count_kv") == [4, 4]
    assert _field(r, "deci.feed_forward_length") == [384, 269]
    assert _field(r, "deci.attention.key_length") == 16 and _field(r, "deci.rope.dimension_count") == 16
    t = _tensors(r)
    assert [int(d) for d in t["blk.1.attn_q.weight"].shape] == [128, 64]
    assert [int(d) for d in t["blk.1.attn_output.weight"].shape] == [64, 128]
    assert [int(d) for d in t["blk.1.ffn_down.weight"].shape] == [269, 128]
    q = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(_from_gguf_rows(_values(t["blk.1.attn_q.weight"]), 4), q)


def test_rotary_permutation_turns_half_split_rope_into_pairwise_rope():
    """What llama.cpp computes with the permuted rows (rotation of consecutive pairs) equals what transformers
    computes with the original rows (rotation of first half against second half), row for row after the same
    permutation: the permutation is right, not just invertible."""
    torch.manual_seed(0)
    heads, dim, hidden = 3, 8, 5
    w, x = torch.randn(heads * dim, hidden), torch.randn(hidden)
    angle = torch.rand(dim // 2) * 3
    cos, sin = angle.cos(), angle.sin()
    q = (w @ x).reshape(heads, dim)
    a, b = q[:, : dim // 2], q[:, dim // 2:]
    hf = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=1)           # transformers' rotate_half
    qp = (rotary_rows_to_gguf(w, heads) @ x).reshape(heads, dim // 2, 2)
    pairs = torch.stack([qp[..., 0] * cos - qp[..., 1] * sin, qp[..., 1] * cos + qp[..., 0] * sin], dim=-1)
    expected = rotary_rows_to_gguf(hf.reshape(-1, 1), heads).reshape(heads, dim // 2, 2)
    torch.testing.assert_close(pairs, expected)


@pytest.mark.parametrize("outtype,kind,atol", [("f16", gguf.GGMLQuantizationType.F16, 1e-3),
                                               ("bf16", gguf.GGMLQuantizationType.BF16, 1e-2),
                                               ("q8_0", gguf.GGMLQuantizationType.Q8_0, 2e-2),
                                               ("q4_1", gguf.GGMLQuantizationType.Q4_1, None)])
def test_outtypes_and_block_type_mlp_padding(story_layerwise, tmp_path, outtype, kind, atol):
    model, tok = story_layerwise
    with torch.no_grad():   # mask-pruned zeros must stay exact zeros in every outtype but q4_1 (offset grid)
        model.model.layers[0].mlp.up_proj.weight[:, ::2] = 0
    r = gguf.GGUFReader(export_gguf(model, tok, tmp_path / "q.gguf", outtype=outtype))
    t = _tensors(r)
    assert t["blk.0.ffn_up.weight"].tensor_type == kind
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert t["blk.1.ffn_down.weight"].tensor_type == kind

    def close(got: np.ndarray, want: torch.Tensor) -> None:
        want = want.detach().numpy()
        # q4_1: 16 levels between a block's min and max, so half a step is at most max|w| / 15 (plus fp16 rounding)
        np.testing.assert_allclose(got, want, atol=atol if atol is not None else np.abs(want).max() / 15 * 1.01)

    up = _values(t["blk.0.ffn_up.weight"])
    assert outtype == "q4_1" or (up[:, ::2] == 0).all()
    close(up, model.model.layers[0].mlp.up_proj.weight)
    # layer 1 keeps 269 MLP channels, not whole blocks of 32 along down_proj's rows: q8_0 and q4_1 pad it to 288
    # with zero gate/up rows (exact in every type: a block of zeros) and zero down columns (exact but in q4_1, where
    # they only ever multiply the zero channels), the other outtypes keep 269
    mlp = model.model.layers[1].mlp
    ffn = 288 if outtype in ("q8_0", "q4_1") else 269
    assert mlp.down_proj.weight.shape[1] == 269 and list(_field(r, "deci.feed_forward_length"))[1] == ffn
    down, gate = _values(t["blk.1.ffn_down.weight"]), _values(t["blk.1.ffn_gate.weight"])
    assert down.shape[1] == gate.shape[0] == ffn
    assert (outtype == "q4_1" or (down[:, 269:] == 0).all()) and (gate[269:] == 0).all()
    assert (_values(t["blk.1.ffn_up.weight"])[269:] == 0).all()
    close(down[:, :269], mlp.down_proj.weight)


def test_untied_head_and_gpt2_tokenizer(tmp_path):
    """A byte-level BPE tokenizer (SmolLM2's, from its GGUF) → "gpt2" model with merges, "gpt-2" pre-tokenizer,
    special tokens CONTROL and the chat template; an untied head is written as output.weight."""
    from sparsefast.models.loading import smollm2_gguf_path

    src = smollm2_gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = tiny_model("llama", vocab_size=49152, tie_word_embeddings=False)
    r = gguf.GGUFReader(export_gguf(model, tok, tmp_path / "g.gguf", outtype="f16"))
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "gpt-2"
    source = gguf.GGUFReader(src)
    assert _field(r, "tokenizer.ggml.tokens") == _field(source, "tokenizer.ggml.tokens")
    assert _field(r, "tokenizer.ggml.merges") == _field(source, "tokenizer.ggml.merges")
    assert _field(r, "tokenizer.ggml.token_type")[:3] == [gguf.TokenType.CONTROL] * 3
    assert _field(r, "tokenizer.chat_template") == tok.chat_template
    assert "output.weight" in _tensors(r)


def test_output_rules(story, tmp_path):
    model, tok = story
    out = tmp_path / "m.gguf"
    out.write_bytes(b"my notes")
    with pytest.raises(ValueError, match="--overwrite"):
        export_gguf(model, tok, out)
    with pytest.raises(ValueError, match="not written by sparsefast"):
        export_gguf(model, tok, out, overwrite=True)
    assert out.read_bytes() == b"my notes"
    out.unlink()
    export_gguf(model, tok, out)
    first = out.stat().st_ino
    export_gguf(model, tok, out, overwrite=True, outtype="f16")   # our own file: replaced
    assert out.stat().st_ino != first and is_sparsefast_gguf(out)
    with pytest.raises(ValueError, match="is a directory"):
        export_gguf(model, tok, tmp_path)
    with pytest.raises(ValueError, match="model source"):
        export_gguf(model, tok, tmp_path / "src" / "x.gguf", sources=[tmp_path / "src"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]   # no partial left behind


def test_failed_export_leaves_nothing(story, tmp_path, monkeypatch):
    model, tok = story
    import sparsefast.export.gguf as mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "_add_tensor", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(model, tok, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_appears_meanwhile_is_kept(story, tmp_path, monkeypatch):
    """Two writers to one new name: the one that publishes second gets FileExistsError, the first file stays."""
    model, tok = story
    out = tmp_path / "m.gguf"
    import sparsefast.export.gguf as mod

    real = mod._add_hyperparameters

    def racing(*a, **k):
        out.write_bytes(b"the other writer")
        return real(*a, **k)

    monkeypatch.setattr(mod, "_add_hyperparameters", racing)
    with pytest.raises(FileExistsError, match="not saved"):
        export_gguf(model, tok, out)
    assert out.read_bytes() == b"the other writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
