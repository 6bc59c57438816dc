"""Model loading and per-family adapters (LLaMA 1/2/3, Mistral, Qwen2, OPT, GPT-NeoX).

`load_model(name_or_path)` → (model, tokenizer) for every checkpoint kind; `get_adapter(model)` → the `ModelAdapter`
that says where the decoder layers, embeddings, norm and head are and which linears a pruner may touch;
`save_structural` / `load_structural` → the structural checkpoint format (structure.json + safetensors).
"""

from sparsefast.device import resolve_device, resolve_dtype
from sparsefast.models import gpt_neox, llama, opt  # noqa: F401  (registers the adapters)
from sparsefast.models.base import (
    ModelAdapter,
    check_supported,
    get_adapter,
    register_adapter,
    supported_model_types,
)
from sparsefast.models.gpt_neox import GPTNeoXAdapter
from sparsefast.models.llama import LlamaAdapter
from sparsefast.models.loading import (
    SMOLLM2_ALIAS,
    load_config,
    load_model,
    load_structural,
    load_tokenizer,
    local_source_paths,
    model_context,
    read_local_config,
    resolve_model_source,
    smollm2_gguf_path,
)
from sparsefast.models.opt import OPTAdapter
from sparsefast.models.structural import save_structural
from sparsefast.models.weights import check_finite_weights, check_weight_files

__all__ = [
    "GPTNeoXAdapter",
    "LlamaAdapter",
    "ModelAdapter",
    "OPTAdapter",
    "SMOLLM2_ALIAS",
    "check_finite_weights",
    "check_supported",
    "check_weight_files",
    "get_adapter",
    "load_config",
    "load_model",
    "load_structural",
    "load_tokenizer",
    "local_source_paths",
    "model_context",
    "read_local_config",
    "register_adapter",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_source",
    "save_structural",
    "smollm2_gguf_path",
    "supported_model_types",
]
