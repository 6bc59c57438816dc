"""sparsefast: prune LLMs fast (Wanda, SparseGPT, LLM-Pruner) and run the pruned models fast (2:4 CUDA kernels)."""

__version__ = "0.1.0"
