"""sparsefast: prune LLMs fast (Wanda, SparseGPT, LLM-Pruner) and run the pruned models fast (2:4 CUDA kernels)."""

__version__ = "0.1.0"

# The public idioms `sparsefast.prune(model, config, calib)` and `model, tok = sparsefast.load(path)`. This rebinds
# the package attribute `prune` (the subpackage sparsefast.prune stays importable by its dotted path:
# `from sparsefast.prune.wanda import ...`).
from sparsefast.api import load, prune  # noqa: E402

__all__ = ["load", "prune", "__version__"]
