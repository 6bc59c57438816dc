"""Discovered groups equal the known structures of Llama (GQA), Mistral, Qwen2, OPT and GPT-NeoX."""

from __future__ import annotations

import pytest

from sparsefast.prune.structural.graph import build_graph
from tests.conftest import tiny_model

H, HEADS, HD, INTER = 64, 4, 16, 128

# per family: layer prefix, attention (q, k, v, o) or fused qkv, MLP (row producers, column consumer),
# norms per layer, embeddings, final norm, head
FAMILIES = {
    "llama": dict(pre="model.layers.{}.", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                  o="self_attn.o_proj", up=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj",
                  norms=("input_layernorm", "post_attention_layernorm"), emb=("model.embed_tokens",),
                  final="model.norm", head="lm_head", kv=2),
    "opt": dict(pre="model.decoder.layers.{}.", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                o="self_attn.out_proj", up=("fc1",), down="fc2", norms=("self_attn_layer_norm", "final_layer_norm"),
                emb=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
                final="model.decoder.final_layer_norm", head=None, kv=4),
    "gpt_neox": dict(pre="gpt_neox.layers.{}.", qkv="attention.query_key_value", o="attention.dense",
                     up=("mlp.dense_h_to_4h",), down="mlp.dense_4h_to_h",
                     norms=("input_layernorm", "post_attention_layernorm"), emb=("gpt_neox.embed_in",),
                     final="gpt_neox.final_layer_norm", head="lm_head", kv=4),
}
FAMILIES["mistral"] = FAMILIES["llama"]
FAMILIES["qwen2"] = FAMILIES["llama"]


def canon(unit):
    return frozenset((m.param, m.dim, tuple(m.index.tolist())) for m in unit.members)


def rows(model, module, idx):
    """Slices for rows `idx` of a Linear (weight dim 0 and its bias, when it has one)."""
    mod = model.get_submodule(module)
    out = {(f"{module}.weight", 0, tuple(idx))}
    return out | ({(f"{module}.bias", 0, tuple(idx))} if mod.bias is not None else set())


def expected_attention(model, f, layer):
    p = f["pre"].format(layer)
    groups, queries = [], []
    per_group = HEADS // f["kv"]
    for g in range(f["kv"]):
        heads = range(g * per_group, (g + 1) * per_group)
        cols = [i for h in heads for i in range(h * HD, (h + 1) * HD)]
        if "qkv" in f:
            s = rows(model, p + f["qkv"], [i for h in heads for i in range(h * 3 * HD, (h + 1) * 3 * HD)])
        else:
            kv = list(range(g * HD, (g + 1) * HD))
            s = rows(model, p + f["q"], cols) | rows(model, p + f["k"], kv) | rows(model, p + f["v"], kv)
        groups.append(frozenset(s | {(p + f["o"] + ".weight", 1, tuple(cols))}))
        if per_group > 1:
            queries.append({frozenset(rows(model, p + f["q"], list(range(h * HD, (h + 1) * HD)))
                                      | {(p + f["o"] + ".weight", 1, tuple(range(h * HD, (h + 1) * HD)))})
                            for h in heads})
        else:
            queries.append({groups[-1]})
    return groups, queries


def expected_hidden(model, f, c):
    names = {n for n, _ in model.named_parameters()}
    s = {(e + ".weight", 1, (c,)) for e in f["emb"]}
    for layer in range(2):
        p = f["pre"].format(layer)
        consumers = [p + f["qkv"]] if "qkv" in f else [p + f["q"], p + f["k"], p + f["v"]]
        consumers += [p + u for u in f["up"]]
        s |= {(m + ".weight", 1, (c,)) for m in consumers}
        s |= rows(model, p + f["o"], [c]) | rows(model, p + f["down"], [c])
        s |= {(p + n + "." + w, 0, (c,)) for n in f["norms"] for w in ("weight", "bias") if p + n + "." + w in names}
    s |= {(f["final"] + "." + w, 0, (c,)) for w in ("weight", "bias") if f["final"] + "." + w in names}
    if f["head"] is not None and f"{f['head']}.weight" in names:
        s.add((f["head"] + ".weight", 1, (c,)))
    return frozenset(s)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt", "gpt_neox"])
def test_discovered_groups_equal_known_structure(family):
    model = tiny_model(family)
    f = FAMILIES[family]
    graph = build_graph(model)
    assert graph.num_layers == 2 and graph.other == 0
    for layer in range(2):
        groups, queries = expected_attention(model, f, layer)
        got = graph.attention[layer]
        assert [canon(g.unit) for g in got] == groups
        assert [{canon(q) for q in g.queries} for g in got] == queries
        assert graph.heads(layer) == (HEADS, f["kv"])
        p = f["pre"].format(layer)
        want_mlp = [frozenset(set().union(*(rows(model, p + u, [j]) for u in f["up"]))
                              | {(p + f["down"] + ".weight", 1, (j,))}) for j in range(INTER)]
        assert [canon(u) for u in graph.mlp[layer]] == want_mlp
    assert [canon(u) for u in graph.hidden] == [expected_hidden(model, f, c) for c in range(H)]


def test_tied_head_joins_the_hidden_group():
    model = tiny_model("llama", tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    graph = build_graph(model)
    params = {m.param for m in graph.hidden[5].members}
    assert "model.embed_tokens.weight" in params and "lm_head.weight" not in params
    assert len(graph.hidden) == H


def test_mha_llama_has_one_query_per_group():
    model = tiny_model("llama", num_key_value_heads=4)
    graph = build_graph(model)
    assert graph.heads(0) == (4, 4)
    assert all(g.queries == [g.unit] for g in graph.attention[0])


def test_equal_indices_are_one_tensor_and_a_meta_model_traces_alike():
    """Members with the same index values share one tensor (a model has a member per MLP channel per layer); a model
    whose decoder layers are on the meta device (pruning from disk) gives the same units."""
    import torch

    model = tiny_model("llama", num_hidden_layers=3)
    graph = build_graph(model)
    mlp = [u for units in graph.mlp.values() for u in units]
    indices = [m.index for u in mlp for m in u.members]
    assert len({id(i) for i in indices}) == len({tuple(i.tolist()) for i in indices}) == INTER
    for layer in model.model.layers:  # the embeddings, final norm and head stay real
        layer.to("meta")
    meta = build_graph(model)

    def units(g):
        return [[(m.param, m.dim, m.index.tolist()) for m in u.members]
                for u in g.hidden + [u for v in g.mlp.values() for u in v]
                + [a.unit for v in g.attention.values() for a in v]]

    assert units(meta) == units(graph) and meta.other == graph.other
    assert model.model.embed_tokens.weight.device == torch.device("cpu")  # put back after the trace
