"""RecoverConfig: the settings of LoRA recovery after pruning (LoRA: Hu et al., 2021, arXiv:2106.09685; run as in
LLM-Pruner's post-training), trained by sparsefast.recover.train. Imports no torch: the `recover` parser takes its
defaults, DEFAULT_TARGETS and COMPUTE_DTYPES from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# the linears LLM-Pruner's post-training adapts: every attention and MLP projection of a LLaMA-style layer
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# no fp16: LLM-Pruner's fp16 autocast overflows to NaN on LLaMA-2 (horseee/LLM-Pruner#13); bf16 has fp32's range
COMPUTE_DTYPES = ("bf16", "fp32")


@dataclass(frozen=True)
class RecoverConfig:
    """LoRA recovery settings (the ``sparsefast recover`` flags), validated on construction and frozen: every
    instance is valid, so the training code trusts it. ``batch_size`` is the micro-batch; an optimizer step sees
    ``batch_size * grad_accum`` samples. ``dtype`` (one of COMPUTE_DTYPES) is the compute and saved dtype."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    cutoff_len: int = 256
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 4
    max_samples: int | None = None
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        """Raise ValueError naming the first bad field and its valid range."""
        ints = {"lora_r": self.lora_r, "epochs": self.epochs, "batch_size": self.batch_size,
                "grad_accum": self.grad_accum, "cutoff_len": self.cutoff_len}
        for name, value in ints.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.cutoff_len < 2:
            raise ValueError(f"cutoff_len must be >= 2, got {self.cutoff_len}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 (or None for all), got {self.max_samples}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)} (fp16 diverges to NaN, see "
                             f"LLM-Pruner#13), got {self.dtype!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be non-empty module names, got {self.target_modules!r}")


__all__ = ["COMPUTE_DTYPES", "DEFAULT_TARGETS", "RecoverConfig"]
