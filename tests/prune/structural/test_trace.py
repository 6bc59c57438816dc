"""sparsefast.prune.structural.trace: an aten op without a channel rule fails loudly instead of grouping wrongly."""

from __future__ import annotations

import pytest
import torch

from sparsefast.prune.structural.trace import NodeSpace, trace_channels


def test_unknown_op_fails_loudly():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.head = torch.nn.Linear(8, 10)

        def forward(self, input_ids, use_cache=False):
            h = torch.fft.fft(self.emb(input_ids)).real  # an op with no channel rule
            return type("Out", (), {"logits": self.head(h)})()

        def get_input_embeddings(self):
            return self.emb

    with pytest.raises(RuntimeError, match="no channel rule"):
        trace_channels(Weird(), NodeSpace())
