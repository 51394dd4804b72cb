"""One adapter per model family: everything sparsetx knows about a model's layout lives here.

A family says where each block's Q, K, V, O and FFN live, which position scheme the model uses,
how its KV cache is read, cut and written, and which differences between transformers releases
matter (the supported range is in pyproject.toml; scripts/test_range.sh tests both ends):

* the cache keyword: ``cache`` from transformers 5.24, ``past_key_values`` before;
* GPT-2's attention scale: an attribute ``scaling`` only from 5.x releases after 5.0, so it is
  derived here from the config (1/sqrt(d), and 1/(layer + 1) with ``scale_attn_by_inverse_layer_idx``).

Families are found by ``config.model_type``; anything else is an :class:`UnsupportedModelError`
naming the class and the supported families. N:M pruning works on any model's ``nn.Linear``
layers (it does not need a family); the SpAtten runtimes and the simulators' model shapes do.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from .kernels.nm_linear import linear_cols, linear_rows


class UnsupportedModelError(ValueError):
    """A model (or config) of a family sparsetx does not know."""


@dataclass
class EncoderBlock:
    """Where one post-LayerNorm encoder block (BERT) keeps its attention and FFN."""

    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    ln_attn: nn.Module
    ffn_in: nn.Module
    act: nn.Module
    ffn_out: nn.Module
    ln_ffn: nn.Module


class Family:
    """What every family states. ``decoder``: causal with a KV cache; ``gated_ffn``: gate and up
    projections (SwiGLU); ``positions``: "absolute" (learned, added to the embeddings; BERT and
    GPT-2) or "rope" (rotary, applied to Q and K inside attention; Llama)."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    decoder: bool = False
    gated_ffn: bool = False
    positions: str = "absolute"
    blocks: str = ""                       # dotted path, from the base model, of the block list

    def base(self, model: nn.Module) -> nn.Module:
        """The body (BertModel, LlamaModel, GPT2Model) of a model with or without its task head."""
        return getattr(model, "base_model", model)

    def block_list(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """(name in ``model``, module) of the list of Transformer blocks."""
        base = self.base(model)
        prefix = next((n for n, m in model.named_modules() if m is base), "")
        name = f"{prefix}.{self.blocks}" if prefix else self.blocks
        return name, model.get_submodule(name)

    def __repr__(self) -> str:
        return f"<family {self.name}>"


class BertFamily(Family):
    name, model_types, blocks = "bert", ("bert",), "encoder.layer"

    def encoder_blocks(self, model: nn.Module) -> list[EncoderBlock]:
        return [EncoderBlock(b.attention.self.query, b.attention.self.key, b.attention.self.value,
                             b.attention.output.dense, b.attention.output.LayerNorm, b.intermediate.dense,
                             b.intermediate.intermediate_act_fn, b.output.dense, b.output.LayerNorm)
                for b in self.block_list(model)[1]]

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The self-attention modules (what transformers passes to an attention function)."""
        return [b.attention.self for b in self.block_list(model)[1]]

    def embed(self, base: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Word + absolute position + token type embeddings, LayerNorm: (1, L) -> (1, L, hidden)."""
        return base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)


# Cache keyword names, newest first: 5.24 renamed past_key_values to cache.
CACHE_KWARGS = ("cache", "past_key_values")


class DecoderFamily(Family):
    """A causal LM whose attention sparsetx computes itself, over the model's own weights and a
    transformers ``DynamicCache`` that it reads, cuts and writes."""

    decoder = True
    attention: str = ""                    # attribute of a block holding its attention module

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(block, self.attention) for block in self.block_list(model)[1]]

    # --- heads and projections ----------------------------------------------------------------
    def heads(self, module: nn.Module) -> tuple[int, int, int]:
        """(query heads, KV heads, head dim)."""
        raise NotImplementedError

    def scaling(self, module: nn.Module) -> float:
        raise NotImplementedError

    def qkv(self, module, hidden, position_embeddings, q_rows, kv_rows):
        """Q, K, V of the kept heads, (1, heads, T, d) each, positions applied. ``q_rows`` /
        ``kv_rows``: output rows of the kept heads (None: every head, the modules' own weights)."""
        raise NotImplementedError

    def output(self, module, ctx, q_rows):
        """The output projection of the kept heads' context (1, T, kept heads x d)."""
        raise NotImplementedError

    # --- the KV cache ---------------------------------------------------------------------------
    def cache_kwargs(self, model: nn.Module, cache) -> dict:
        """``{keyword: cache}`` for calling ``model`` with a cache under this transformers' name."""
        params = inspect.signature(self.base(model).forward).parameters
        return {next((k for k in CACHE_KWARGS if k in params), CACHE_KWARGS[-1]): cache}

    @staticmethod
    def cache_of(kwargs: dict):
        """The cache passed to a forward under whichever keyword this transformers uses."""
        for key in CACHE_KWARGS:
            if kwargs.get(key) is not None:
                return kwargs[key]
        return None

    @staticmethod
    def check_cache(cache) -> None:
        layers = getattr(cache, "layers", None)
        if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            raise ValueError(f"the SpAtten decoder runtime prunes a transformers DynamicCache; got "
                             f"{type(cache).__name__} (do not pass cache_implementation= to generate())")

    @staticmethod
    def cache_length(cache, layer_idx: int) -> int:
        layers = cache.layers
        if layer_idx >= len(layers) or getattr(layers[layer_idx], "keys", None) is None:
            return 0
        return int(layers[layer_idx].keys.shape[-2])

    @staticmethod
    def cut_cache(cache, layer_idx: int, index: torch.Tensor, dim: int) -> None:
        """Keep only ``index`` along ``dim`` (-2: tokens, 1: KV heads) of one layer's K and V."""
        layer = cache.layers[layer_idx]
        layer.keys = layer.keys.index_select(dim, index)
        layer.values = layer.values.index_select(dim, index)

    @staticmethod
    def update_cache(cache, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' K and V; returns the layer's whole K and V."""
        return cache.update(k, v, layer_idx)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1) for the halves x1, x2 of a head."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class LlamaFamily(DecoderFamily):
    """Llama (SmolLM2): separate q/k/v/o projections, grouped-query attention, RoPE, SwiGLU FFN."""

    name, model_types, blocks, attention = "llama", ("llama",), "layers", "self_attn"
    gated_ffn, positions = True, "rope"

    def heads(self, module):
        cfg = module.config
        return cfg.num_attention_heads, cfg.num_key_value_heads, module.head_dim

    def scaling(self, module):
        return float(module.scaling)

    def qkv(self, module, hidden, position_embeddings, q_rows, kv_rows):
        b, t, _ = hidden.shape
        d = module.head_dim

        def proj(lin, rows):
            y = lin(hidden) if rows is None else linear_rows(lin, hidden, rows)
            return y.view(b, t, -1, d).transpose(1, 2)

        q, k, v = proj(module.q_proj, q_rows), proj(module.k_proj, kv_rows), proj(module.v_proj, kv_rows)
        cos, sin = (x.unsqueeze(1) for x in position_embeddings)   # RoPE at the positions the model was given
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, module, ctx, q_rows):
        return module.o_proj(ctx) if q_rows is None else linear_cols(module.o_proj, ctx, q_rows)


class GPT2Family(DecoderFamily):
    """GPT-2: one fused c_attn (Conv1D, weight (in, out)), learned positions, c_proj output."""

    name, model_types, blocks, attention = "gpt2", ("gpt2",), "h", "attn"

    def heads(self, module):
        return module.num_heads, module.num_heads, module.head_dim

    def scaling(self, module):
        cfg = module.config
        scale = 1 / math.sqrt(module.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(module.layer_idx + 1)
        return scale

    def qkv(self, module, hidden, position_embeddings, q_rows, kv_rows):
        b, t, _ = hidden.shape
        e = module.split_size
        if q_rows is None:
            q, k, v = module.c_attn(hidden).split(e, dim=2)
        else:
            cols = torch.cat([q_rows, kv_rows + e, kv_rows + 2 * e])
            q, k, v = (hidden @ module.c_attn.weight[:, cols] + module.c_attn.bias[cols]).split(
                [len(q_rows), len(kv_rows), len(kv_rows)], dim=2)
        return tuple(x.reshape(b, t, -1, module.head_dim).transpose(1, 2) for x in (q, k, v))

    def output(self, module, ctx, q_rows):
        if q_rows is None:
            return module.resid_dropout(module.c_proj(ctx))
        return module.resid_dropout(ctx @ module.c_proj.weight[q_rows] + module.c_proj.bias)


FAMILIES: tuple[Family, ...] = (BertFamily(), LlamaFamily(), GPT2Family())

# Encoders the simulators take by shape alone (config fields; no runtime of ours runs them).
SHAPE_ONLY = {"vit": False, "deit": False}


def supported() -> str:
    return ", ".join(f"{f.name} ({'decoder' if f.decoder else 'encoder'})" for f in FAMILIES)


def _model_type(obj) -> tuple[str, str]:
    config = getattr(obj, "config", obj)
    return str(getattr(config, "model_type", "") or ""), type(obj).__name__


def find_family(obj) -> Family | None:
    """The family of a model or config, or None."""
    model_type, _ = _model_type(obj)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_of(obj, decoder: bool | None = None) -> Family:
    """The family of ``obj`` (a model or its config); ``decoder`` asks for one kind. Raises
    :class:`UnsupportedModelError` naming the class and what is supported."""
    family = find_family(obj)
    model_type, cls = _model_type(obj)
    if family is None:
        raise UnsupportedModelError(f"sparsetx has no adapter for {cls} (model_type {model_type!r}); "
                                    f"supported families: {supported()}")
    if decoder is not None and family.decoder != decoder:
        want = "a decoder (causal LM with a KV cache)" if decoder else "an encoder"
        names = ", ".join(f.name for f in FAMILIES if f.decoder == decoder)
        raise UnsupportedModelError(f"{cls} is a {family.name} {'decoder' if family.decoder else 'encoder'}; this "
                                    f"needs {want}: {names}")
    return family


def config_is_decoder(config) -> bool:
    """A config's kind, for the simulators' shapes: from its family, or the config's own flag."""
    family = find_family(config)
    if family is not None:
        return family.decoder
    return SHAPE_ONLY.get(_model_type(config)[0], bool(getattr(config, "is_decoder", False)))


def config_gated_ffn(config) -> bool:
    family = find_family(config)
    return family is not None and family.gated_ffn


def model_task(model: nn.Module) -> str:
    """"classifier" (a sequence classification head), "causal-lm" or "encoder" (a bare body)."""
    archs = " ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    if "SequenceClassification" in archs:
        return "classifier"
    if "CausalLM" in archs or "LMHeadModel" in archs:
        return "causal-lm"
    return "encoder"
