"""Exporters: pruned (and dense) models as files the engines users already run load, one module per target.

* `export_gguf` (sparsefast.export.gguf): one GGUF file for llama.cpp / Ollama; per-layer widths through llama.cpp's
  `deci` architecture, the plain `llama` one when every layer has the same widths.
* `export_vllm` (sparsefast.export.vllm): a Hugging Face directory vLLM loads: a plain config when every layer has the
  same widths, else `DeciLMForCausalLM` (nemotron-nas `block_configs`).
* `export_vllm_sparse` (sparsefast.export.vllm_sparse): a mask-pruned model for vLLM with its sparse linears stored
  packed, run by sparsefast's kernels through the vLLM plugin (sparsefast.vllm_plugin).

Both take a model as `sparsefast.load` returns it (dense, mask-pruned or structural) and write atomically and
exclusively, like every sparsefast output. This package module imports no torch (the `export` parser takes its
choices from here); import the exporters from their modules.
"""

TARGETS = ("gguf", "vllm", "vllm-sparse")
# GGUF weight types (sparsefast.export.gguf); vLLM takes the float ones (safetensors in that dtype)
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_1")
VLLM_OUTTYPES = ("f32", "f16", "bf16")
VLLM_SPARSE_OUTTYPES = ("f32", "bf16")  # the CPU kernels' dtypes
