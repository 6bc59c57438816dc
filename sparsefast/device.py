"""Device and dtype names as users type them (CLI flags, API arguments) → torch objects, with clear errors.

torch is imported inside the functions: the CLI parsers take DEVICE_CHOICES / DTYPE_CHOICES from here, and
`sparsefast --help` must not import torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
# which implementation runs an op (sparsefast.ops._dispatch.select_backend says how "auto" picks)
BACKEND_CHOICES = ("auto", "cuda", "triton", "cpu", "torch")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Map "auto" | "cpu" | "cuda" | "cuda:N" (or a torch.device) to a usable torch.device.

    "auto" picks cuda:0 when CUDA is available, else cpu. Asking for CUDA on a machine without it raises
    ValueError before any work starts (instead of torch's error deep inside a forward pass).
    """
    import torch

    if isinstance(name, torch.device):
        dev = name
    else:
        text = str(name).strip().lower()
        if text == "auto":
            return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(text)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(dev)!r}; use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(dev)!r} was requested but CUDA is not available "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu or auto"
            )
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        dev = torch.device("cuda", index)
    return dev


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Map "auto" | None → None (let the loader decide) and "float32" | "float16" | "bfloat16" (or fp32/fp16/bf16,
    or a torch.dtype) → that torch.dtype. Anything else is a ValueError listing the choices."""
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
               "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    key = str(name).strip().lower()
    if key not in aliases:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return aliases[key]
