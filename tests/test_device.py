"""sparsefast.device: device and dtype names as users type them → torch objects, with clear errors."""

from __future__ import annotations

import pytest
import torch

from sparsefast.device import resolve_device, resolve_dtype


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu0")
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
            resolve_device("cuda")
    assert resolve_dtype("auto") is None and resolve_dtype(None) is None
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")
