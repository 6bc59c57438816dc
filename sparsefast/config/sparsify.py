"""SparsifyConfig: how `sparsefast.nn.sparsify_` swaps sparse linears into a model (the serving modes of
`sparsefast.load(sparse=...)`, `sparsefast serve --sparse` and `sparsefast generate --sparse`). Imports no torch."""

from __future__ import annotations

import os
from dataclasses import dataclass

# auto: the fastest measured kernel per layer (CPU: timed here; CUDA: 2:4 layers with the GPU's table);
# sparse24: every 2:4 linear as Sparse24Linear on any device, untimed; off: the model as loaded
SPARSE_MODES = ("auto", "sparse24", "off")


@dataclass(frozen=True)
class SparsifyConfig:
    """mode: auto | sparse24 | off (see sparsefast.nn.sparsify). calibrate: CPU layers under "auto" are timed on this
    machine (False: no timing, the kernel for M <= 64). dispatch_table: a dispatch table JSON
    (`{"rows": [[max_tokens, backend], ...]}`, as bench/micro/bench_sparse24_matmul.py writes) for every
    Sparse24Linear made; None: the table shipped for the GPU it first runs on (sparsefast.nn.dispatch).
    int8_activations: for an int8-quantized model (prune --quantize int8) under "auto" on the CPU, quantize each
    linear's input per token and 32-column block too (dynamic W8A8: integer dot products, AVX-512 VNNI kernels where
    the CPU has avx512vbmi; sparsefast.ops.int8_rows.int8_activation_linear)."""

    mode: str = "auto"
    calibrate: bool = True
    dispatch_table: str | os.PathLike | None = None
    int8_activations: bool = False

    def __post_init__(self) -> None:
        if self.mode not in SPARSE_MODES:
            raise ValueError(f"sparse must be one of {', '.join(SPARSE_MODES)} (SparsifyConfig.mode); "
                             f"got {self.mode!r}")
        if self.int8_activations and self.mode != "auto":
            raise ValueError(f"int8 activations run in the CPU modules of sparse mode 'auto', not {self.mode!r}; use "
                             "--sparse auto (SparsifyConfig(mode='auto'))")
        if self.dispatch_table is not None and not os.path.isfile(self.dispatch_table):
            raise ValueError(f"SparsifyConfig.dispatch_table {os.fspath(self.dispatch_table)!r} is not a file; give "
                             "the path of a dispatch table JSON (bench/micro/bench_sparse24_matmul.py writes one)")
