"""The per-family model adapter: where a causal LM keeps its decoder layers, embeddings, final norm and head, which
linear layers a pruner may touch, and the attention/MLP structure the structural pruner (LLM-Pruner) slices.

Adapters hold no state: they read module paths (dotted names, resolved with `nn.Module.get_submodule`) and the
model's config. Each family subclasses `ModelAdapter`, sets the class attributes and registers itself for its HF
`config.model_type` values with `@register_adapter`. `get_adapter(model)` is the one entry point.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

from torch import nn

_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make `cls` the adapter of every `config.model_type` listed in `cls.model_types`."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> tuple[str, ...]:
    """The HF `config.model_type` values that have an adapter, sorted (e.g. gpt_neox, llama, mistral, opt, qwen2)."""
    return tuple(sorted(_REGISTRY))


def check_supported(model_type: str | None, what: str = "model") -> None:
    """Raise ValueError naming the supported architectures when `model_type` has no adapter."""
    if model_type not in _REGISTRY:
        raise ValueError(
            f"unsupported architecture {model_type!r} for {what}; supported model types: "
            f"{', '.join(supported_model_types())} (LLaMA 1/2/3 load as 'llama')"
        )


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of `model` (a transformers `*ForCausalLM`), chosen by `model.config.model_type`.

    Raises ValueError listing the supported architectures when the family is unknown or `model` has no config.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    check_supported(model_type, what=type(model).__name__)
    return _REGISTRY[model_type]()


class ModelAdapter:
    """Structure of one model family. All paths are dotted module names.

    Class attributes (set by each family):
        model_types: HF `config.model_type` values this adapter handles.
        layers_path: path from the CausalLM to the `nn.ModuleList` of decoder layers.
        embedding_paths: token embedding, then the learned positional embedding if the family has one.
        pre_layer_paths: modules that run between the embeddings and layer 0 (e.g. OPT-350m's project_in); optional.
        final_norm_path / post_layer_paths / lm_head_paths: after the last layer (the head path is tried in order:
            transformers renamed GPT-NeoX's `embed_out` to `lm_head` in v5).
        rotary_path: the shared rotary-embedding module, if any (it has no parameters but must sit on the device).
        attn_in / attn_out / mlp_in / mlp_out: per-layer linear names relative to the layer. `attn_in` are the
            projections that read the attention input (q, k, v or a fused qkv), `attn_out` the output projection,
            `mlp_in` those that read the MLP input (gate and up, or fc1), `mlp_out` the down projection.
        attn_norm / mlp_norm: the norms that feed attention and MLP (relative to the layer).
        fused_qkv: True when one linear computes q, k and v (`qkv_layout` then says how its output rows are ordered).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str]
    embedding_paths: ClassVar[tuple[str, ...]]
    pre_layer_paths: ClassVar[tuple[str, ...]] = ()
    final_norm_path: ClassVar[str | None]
    post_layer_paths: ClassVar[tuple[str, ...]] = ()
    lm_head_paths: ClassVar[tuple[str, ...]] = ("lm_head",)
    rotary_path: ClassVar[str | None] = None
    attn_in: ClassVar[tuple[str, ...]]
    attn_out: ClassVar[tuple[str, ...]]
    mlp_in: ClassVar[tuple[str, ...]]
    mlp_out: ClassVar[tuple[str, ...]]
    attn_norm: ClassVar[str]
    mlp_norm: ClassVar[str]
    fused_qkv: ClassVar[bool] = False
    qkv_layout: ClassVar[str | None] = None

    # ---- where things are -------------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in execution order."""
        return model.get_submodule(self.layers_path)

    def embeddings(self, model: nn.Module) -> list[nn.Module]:
        """[token embedding] or [token embedding, learned positional embedding]. Never pruned."""
        return [model.get_submodule(p) for p in self.embedding_paths]

    def pre_layer_modules(self, model: nn.Module) -> list[nn.Module]:
        """Everything that must be on the compute device to produce layer 0's input: the embeddings, any
        projection between them and layer 0, and the rotary embedding."""
        mods = self.embeddings(model) + [m for p in self.pre_layer_paths if (m := _maybe(model, p)) is not None]
        rotary = self.rotary_embedding(model)
        return mods + ([rotary] if rotary is not None else [])

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """The norm after the last layer, or None (OPT-350m has none: `do_layer_norm_before=False`)."""
        return None if self.final_norm_path is None else _maybe(model, self.final_norm_path)

    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output projection to vocabulary logits (tied to the token embedding in some models). Never pruned."""
        for path in self.lm_head_paths:
            head = _maybe(model, path)
            if head is not None:
                return head
        raise ValueError(f"{type(model).__name__} has no LM head at {' or '.join(self.lm_head_paths)}; "
                         "load it as a *ForCausalLM model")

    def post_layer_modules(self, model: nn.Module) -> list[nn.Module]:
        """Final norm, any projection after it, and the LM head: what turns the last layer's output into logits."""
        mods = [self.final_norm(model)] + [_maybe(model, p) for p in self.post_layer_paths]
        return [m for m in mods if m is not None] + [self.lm_head(model)]

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        """The model-level rotary embedding module (LLaMA family, GPT-NeoX in transformers ≥ 4.45) or None."""
        return None if self.rotary_path is None else _maybe(model, self.rotary_path)

    # ---- what may be pruned -----------------------------------------------------------------------------------
    @property
    def linear_names(self) -> tuple[str, ...]:
        """All per-layer linear names in execution order: attn_in, attn_out, mlp_in, mlp_out."""
        return self.attn_in + self.attn_out + self.mlp_in + self.mlp_out

    def prunable_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """{name relative to the layer: nn.Linear} for every linear a pruner may touch, in execution order.

        Embeddings and the LM head live outside the decoder layers and are never returned. A listed name that is
        no longer a plain `nn.Linear` (e.g. already swapped for a packed 2:4 module) is left out; a name that does not
        exist at all means the adapter does not match the model and raises ValueError.
        """
        out: dict[str, nn.Linear] = {}
        for name in self.linear_names:
            module = _maybe(layer, name)
            if module is None:
                raise ValueError(f"{type(layer).__name__} has no submodule {name!r}; "
                                 f"the {type(self).__name__} does not match this model")
            if isinstance(module, nn.Linear):
                out[name] = module
        return out

    def channel_producers(self, linears: Mapping[str, nn.Linear]) -> dict[str, list[nn.Linear]]:
        """{name: the linears whose output rows are that linear's input channels} for the one place in a layer where
        a permutation of input channels folds into the producing weights exactly (only elementwise operations in
        between): the MLP's down projection and the projections feeding it (gate and up, or fc1). Attention's
        output projection is left out (its inputs are grouped by head), and so are the projections reading the
        residual stream (their input order is shared by every layer)."""
        if len(self.mlp_out) != 1 or not all(n in linears for n in (*self.mlp_in, *self.mlp_out)):
            return {}
        return {self.mlp_out[0]: [linears[n] for n in self.mlp_in]}

    # ---- structure hints ----------------------------------------------------------------------------------------
    def max_context(self, model: nn.Module) -> int:
        """The longest sequence the model was built for (`config.max_position_embeddings`)."""
        return int(model.config.max_position_embeddings)

    def head_dim(self, model: nn.Module) -> int:
        """Per-head width: `config.head_dim` when set (Mistral, Qwen3-style configs), else hidden / heads."""
        cfg = model.config
        explicit = getattr(cfg, "head_dim", None)
        return int(explicit) if explicit else cfg.hidden_size // cfg.num_attention_heads

    def num_heads(self, model: nn.Module, layer: nn.Module | None = None) -> int:
        """Query heads. With `layer`, counted from that layer's query projection width, so it stays right after
        structural pruning removed heads (LLM-Pruner keeps a different count per layer)."""
        if layer is None:
            return int(model.config.num_attention_heads)
        return self._q_rows(layer) // self.head_dim(model)

    def num_kv_heads(self, model: nn.Module, layer: nn.Module | None = None) -> int:
        """Key/value heads (< num_heads with grouped-query attention). With `layer`, counted from its k projection."""
        if layer is None:
            kv = getattr(model.config, "num_key_value_heads", None)
            return int(kv) if kv else self.num_heads(model)
        return self._k_rows(layer) // self.head_dim(model)

    def _q_rows(self, layer: nn.Module) -> int:
        return layer.get_submodule(self.attn_in[0]).out_features

    def _k_rows(self, layer: nn.Module) -> int:
        return layer.get_submodule(self.attn_in[1]).out_features


def _maybe(root: nn.Module, path: str) -> nn.Module | None:
    """`root.get_submodule(path)`, or None when the path does not exist or holds None."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None
