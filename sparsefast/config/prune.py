"""Mask-pruning configurations (one frozen dataclass per method: magnitude, Wanda, SparseGPT, RIA; the per-layer
allocation (uniform | OWL) and the mask refinement (DSnoT) are settings every method shares) and the single place
where sparsity patterns are parsed. Imports no torch (sparsefast.config).

A config is parsed and validated once, where it is made: `__post_init__` checks every model-independent setting
(ValueError naming the field and the fix), and the instance is frozen, so every config that exists is valid and
`prune()`, the pruners and the calibration engine trust it. Checks that need the model (the pattern against every
prunable linear, seqlen against the context, finite weights) run once per public call in sparsefast.api.

A pattern is either "unstructured" (any sparsity in [0, 1)) or an "N:M" string: in every group of M consecutive
input columns of a weight row at most N weights stay nonzero (Mishra et al. 2021, "Accelerating Sparse Deep Neural
Networks"; 2:4 is what sparse tensor cores run). For N:M the sparsity is implied (1 - N/M); giving a different one
is an error.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from sparsefast.device import BACKEND_CHOICES, DEVICE_CHOICES, resolve_dtype

if TYPE_CHECKING:
    from torch import nn

METHODS = ("magnitude", "wanda", "sparsegpt", "ria")
MAGNITUDE_SCOPES = ("layer", "row")
ALLOCATIONS = ("uniform", "owl")
REFINERS = ("dsnot",)
DSNOT_SCOPES = ("attention", "all")
QUANTIZE_CHOICES = ("int8",)
FROM_DISK_CHOICES = ("auto", "on", "off")  # prune_pretrained(from_disk=...), `sparsefast prune --from-disk`
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: `nm` is None for unstructured, else (N kept, M group size)."""

    nm: tuple[int, int] | None

    @property
    def structured(self) -> bool:
        return self.nm is not None

    def __str__(self) -> str:
        return "unstructured" if self.nm is None else f"{self.nm[0]}:{self.nm[1]}"


def parse_pattern(pattern: str) -> Pattern:
    """Parse "unstructured" or "N:M" (0 < N < M). Raises ValueError naming the accepted forms."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string ('unstructured' or 'N:M' such as '2:4'), got {pattern!r}")
    if pattern.strip().lower() == "unstructured":
        return Pattern(None)
    match = _NM_RE.match(pattern)
    if match is None:
        raise ValueError(f"unknown pattern {pattern!r}; use 'unstructured' or 'N:M' with integers, e.g. '2:4' or '4:8'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: N:M needs 0 < N < M (N weights kept out of every M); "
                         f"e.g. '2:4' keeps 2 of 4")
    return Pattern((n, m))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PruneConfig:
    """Settings every pruner shares (validated on construction; frozen).

    sparsity: fraction of weights set to zero in each prunable linear, in [0, 1). None → 0.5 for unstructured and
        1 - N/M for an N:M pattern. pattern: "unstructured" or "N:M". nsamples × seqlen: calibration size.
    calib: "c4", "wikitext2" or a path to a local text/jsonl file. device: "auto", "cpu" or "cuda" (the compute
        device; the model may stay on CPU). dtype: None/"auto" keeps the model's dtype, else "float32", "float16",
        "bfloat16" (sparsefast.device.resolve_dtype).
    batch_size: calibration samples per layer forward. backend: passed to every sparsefast.ops call.
    allocation: "uniform" (every layer at `sparsity`) or "owl" (Yin et al. 2024, sparsefast.prune.owl: per-layer
        sparsity from the layer's outlier ratio, hyper-parameters owl_m (M: an outlier scores above M × the layer's
        mean Wanda score) and owl_lambda (λ: the per-layer sparsities span at most 2λ); their mean is `sparsity`
        exactly). Unstructured patterns only; needs calibration data for every method.
    refine: None or "dsnot" (Zhang et al. 2024, sparsefast.prune.dsnot: prune-and-grow swaps per output row that
        shrink the expected reconstruction error), at most dsnot_cycles swaps per row, rows stop once the error is
        within dsnot_threshold; growth candidates are ranked by |W·E[x]| / Var(x)^dsnot_var_power; dsnot_scope:
        "attention" (the paper's code default: the attention projections only) or "all" (the MLP's too).
    quantize: None or "int8": the kept weights are also quantized, symmetric per output row (sparsefast.ops.int8_rows);
        SparseGPT quantizes inside its sweep so the OBS updates compensate the rounding too (SparseGPT section 3.5,
        as GPTQ), every other method rounds its pruned weights to the grid. The model keeps the dequantized
        weights (scale · q, so any engine evaluates it) and each linear a `weight_scale` buffer [out] (float32).
        The LM head (never pruned) is rounded to its per-row grid too, and with it a tied token embedding, as
        llama.cpp's Q8_0 files hold theirs: in a small model it is a large part of the bytes a token reads
        (SmolLM2-135M: 113 of the 538 MB in fp32).
    """

    method: ClassVar[str] = "base"
    method_needs_calibration: ClassVar[bool] = True

    sparsity: float | None = None
    pattern: str = "unstructured"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    calib: str = "c4"
    device: str = "auto"
    dtype: str | None = None
    batch_size: int = 8
    backend: str = "auto"
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    refine: str | None = None
    dsnot_cycles: int = 50
    dsnot_threshold: float = 0.1
    dsnot_var_power: float = 1.0
    dsnot_scope: str = "attention"
    quantize: str | None = None

    def __post_init__(self) -> None:
        """Check every model-independent setting; raise ValueError naming the problem and the fix."""
        pat = self.parsed_pattern
        if self.sparsity is not None:
            s = self.sparsity
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity must be a number in [0, 1), got {s!r}")
            if pat.nm is not None and not math.isclose(s, 1.0 - pat.nm[0] / pat.nm[1], abs_tol=1e-9):
                n, m = pat.nm
                raise ValueError(f"pattern {n}:{m} implies sparsity {1 - n / m:g}, but sparsity {s:g} was given; "
                                 "drop --sparsity for N:M patterns")
        for name in ("nsamples", "seqlen", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.device not in DEVICE_CHOICES and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)} (or cuda:N), got {self.device!r}")
        resolve_dtype(self.dtype)
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {self.backend!r}")
        self._check_allocation()
        self._check_refine()
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} (or none), got {self.quantize!r}")

    def _check_allocation(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "uniform":
            return
        if self.parsed_pattern.nm is not None:
            raise ValueError(f"allocation owl sets a sparsity per layer, but pattern {self.parsed_pattern} fixes it "
                             "at 1 - N/M in every layer; use --pattern unstructured with owl, or allocation uniform")
        for name in ("owl_m", "owl_lambda"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.owl_m <= 0:
            raise ValueError(f"owl_m (OWL's M: outliers score above M x the layer mean) must be > 0, got {self.owl_m}")
        s, lam = self.target_sparsity, self.owl_lambda
        if not 0 <= lam or s - 2 * lam < 0 or s + 2 * lam >= 1:
            raise ValueError(f"owl_lambda {lam:g} with sparsity {s:g}: per-layer sparsities may range over "
                             f"sparsity ± 2λ, which must stay in [0, 1); use 0 <= owl_lambda <= {s / 2:.4g} "
                             f"and < {(1 - s) / 2:.4g}")

    def _check_refine(self) -> None:
        if self.refine is None:
            return
        if self.refine not in REFINERS:
            raise ValueError(f"refine must be one of {', '.join(REFINERS)} (or none), got {self.refine!r}")
        if self.dsnot_scope not in DSNOT_SCOPES:
            raise ValueError(f"dsnot_scope must be one of {', '.join(DSNOT_SCOPES)}, got {self.dsnot_scope!r}")
        if not _is_int(self.dsnot_cycles) or self.dsnot_cycles < 1:
            raise ValueError(f"dsnot_cycles must be an integer >= 1, got {self.dsnot_cycles!r}")
        for name in ("dsnot_threshold", "dsnot_var_power"):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or value < 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")

    @property
    def needs_calibration(self) -> bool:
        """Calibration data is needed by the method itself, by OWL's outlier ratios and by DSnoT's statistics."""
        return self.method_needs_calibration or self.allocation != "uniform" or self.refine is not None

    @cached_property
    def parsed_pattern(self) -> Pattern:
        """`pattern` parsed (once: the first access is __post_init__'s)."""
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The sparsity the pattern asks for: 1 - N/M for N:M, else `sparsity` (0.5 when None)."""
        nm = self.parsed_pattern.nm
        if nm is not None:
            return 1.0 - nm[0] / nm[1]
        return 0.5 if self.sparsity is None else float(self.sparsity)

    def check_linears(self, linears: Mapping[str, nn.Module]) -> None:
        """Model-dependent check, run before any work: M divides every prunable linear's in_features."""
        pat = self.parsed_pattern
        if not linears:
            raise ValueError("the model has no prunable linear layers")
        if pat.nm is None:
            return
        m = pat.nm[1]
        bad = [f"{name} (in_features={lin.in_features})" for name, lin in linears.items() if lin.in_features % m]
        if bad:
            raise ValueError(f"pattern {pat}: M={m} must divide the input size of every prunable linear; "
                             f"not divisible: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["method"] = self.method
        out["target_sparsity"] = self.target_sparsity
        return out


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning (|W| ranking, no calibration data). scope: "layer" ranks all weights of a linear together
    (exactly int(numel·sparsity) pruned), "row" ranks each output row (exactly int(in·sparsity) per row). N:M
    patterns always rank within each M-group."""

    method: ClassVar[str] = "magnitude"
    method_needs_calibration: ClassVar[bool] = False
    scope: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in MAGNITUDE_SCOPES:
            raise ValueError(f"magnitude scope must be one of {', '.join(MAGNITUDE_SCOPES)}, got {self.scope!r}")


@dataclass(frozen=True)
class WandaConfig(PruneConfig):
    """Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂ compared within each output row (or M-group)."""

    method: ClassVar[str] = "wanda"


@dataclass(frozen=True)
class SparseGPTConfig(PruneConfig):
    """SparseGPT (Frantar & Alistarh 2023): blocked OBS with lazy updates of `blocksize` columns, damping
    percdamp·mean(diag H). hessian_dtype: "float32" or "float64" for H and the OBS updates."""

    method: ClassVar[str] = "sparsegpt"
    blocksize: int = 128
    percdamp: float = 0.01
    hessian_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.blocksize) or self.blocksize < 1:
            raise ValueError(f"blocksize must be an integer >= 1, got {self.blocksize!r}")
        nm = self.parsed_pattern.nm
        if nm is not None and self.blocksize % nm[1]:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of M={nm[1]}")
        if not (isinstance(self.percdamp, (int, float)) and math.isfinite(self.percdamp) and self.percdamp > 0):
            raise ValueError(f"percdamp must be a positive number, got {self.percdamp!r}")
        if self.hessian_dtype not in ("float32", "float64"):
            raise ValueError(f"hessian_dtype must be 'float32' or 'float64', got {self.hessian_dtype!r}")


@dataclass(frozen=True)
class RIAConfig(PruneConfig):
    """RIA (Zhang et al. 2024, "Plug-and-Play"): relative importance |W_ij|/Σ_k|W_ik| + |W_ij|/Σ_k|W_kj| times
    ‖X_j‖₂^alpha. scope: "layer" (the paper's default: one threshold per linear) or "row" (per output row, Wanda's
    comparison group); N:M patterns rank within each M-group. reallocation: with N:M, the paper's channel
    reallocation where it folds into the weights (the MLP's down projection; sparsefast.prune.ria)."""

    method: ClassVar[str] = "ria"
    alpha: float = 0.5
    scope: str = "layer"
    reallocation: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in MAGNITUDE_SCOPES:
            raise ValueError(f"ria scope must be one of {', '.join(MAGNITUDE_SCOPES)}, got {self.scope!r}")
        if (not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool)
                or not math.isfinite(self.alpha) or self.alpha < 0):
            raise ValueError(f"alpha (RIA's activation exponent) must be a number >= 0, got {self.alpha!r}")
        if not isinstance(self.reallocation, bool):
            raise ValueError(f"reallocation must be True or False, got {self.reallocation!r}")


CONFIGS: dict[str, type[PruneConfig]] = {"magnitude": MagnitudeConfig, "wanda": WandaConfig,
                                         "sparsegpt": SparseGPTConfig, "ria": RIAConfig}


def make_config(method: str, **kwargs: Any) -> PruneConfig:
    """The (validated) config of `method`, e.g. make_config("wanda", pattern="2:4")."""
    if method not in CONFIGS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return CONFIGS[method](**kwargs)


__all__ = ["ALLOCATIONS", "CONFIGS", "DSNOT_SCOPES", "MAGNITUDE_SCOPES", "METHODS", "REFINERS", "MagnitudeConfig",
           "Pattern", "PruneConfig", "RIAConfig", "SparseGPTConfig", "WandaConfig", "make_config", "parse_pattern"]
