"""sparsefast: prune LLMs fast (Wanda, SparseGPT, LLM-Pruner) and run the pruned models fast (2:4 CUDA kernels)."""

__version__ = "0.1.0"

# The public idiom `sparsefast.prune(model, config, calib)`. This rebinds the package attribute `prune` (the
# subpackage sparsefast.prune stays importable by its dotted path: `from sparsefast.prune.wanda import ...`).
from sparsefast.api import prune  # noqa: E402

__all__ = ["prune", "__version__"]
