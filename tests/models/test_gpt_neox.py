"""sparsefast.models.gpt_neox: the fused query/key/value projection's per-head row layout."""

from __future__ import annotations

import torch

from sparsefast.models import get_adapter
from tests.conftest import tiny_model


def test_gpt_neox_fused_qkv_layout_is_per_head():
    """The documented layout: rows [h*3d, h*3d+d) are head h's queries. Zeroing exactly those rows (and bias) must
    zero head h's query in the attention module's own split."""
    model = tiny_model("gpt_neox")
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    qkv = layer.get_submodule(adapter.attn_in[0])
    d, h = adapter.head_dim(model), 2
    with torch.no_grad():
        qkv.weight[h * 3 * d: h * 3 * d + d] = 0
        qkv.bias[h * 3 * d: h * 3 * d + d] = 0
    x = torch.randn(1, 5, 64)
    out = qkv(x).view(1, 5, -1, 3 * d).transpose(1, 2)  # how GPTNeoXAttention splits it
    q, k, _ = out.chunk(3, dim=-1)
    assert torch.all(q[:, h] == 0) and q[:, h - 1].abs().sum() > 0 and k[:, h].abs().sum() > 0
