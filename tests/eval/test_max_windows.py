"""perplexity(max_windows=N) evaluates exactly the first N windows."""

import math

import pytest
import torch

from sparsefast.eval.perplexity import perplexity, window_nll
from tests.conftest import tiny_model


def test_max_windows_equals_hand_computation_on_prefix():
    model = tiny_model("llama")
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (1, 16 * 5 + 3))
    got = perplexity(model, tokens, 16, max_windows=2, progress=False)
    windows = tokens[0, :32].view(2, 16)
    want = math.exp(window_nll(model, windows).double().sum().item() / (2 * 15))
    assert got == pytest.approx(want, rel=1e-9)
    # a limit above the number of windows is the full evaluation
    assert perplexity(model, tokens, 16, max_windows=99, progress=False) == pytest.approx(
        perplexity(model, tokens, 16, progress=False), rel=1e-12)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_max_windows_raises(bad):
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(tiny_model("llama"), torch.randint(0, 256, (1, 64)), 16, max_windows=bad, progress=False)
