"""Workloads from model configs alone (no weights): the operations of one forward pass with their
shapes, multiply-accumulates and bytes, under N:M weight sparsity and a token keep schedule."""
from __future__ import annotations

from dataclasses import dataclass

from ..adapters import config_gated_ffn, config_is_decoder
from ..nm.pattern import NMPattern

# Hugging Face config fields of the models the simulators must express, written out so that no
# hub download is needed (values from the models' published configs).
PRESETS = {
    "bert-base": dict(layers=12, hidden=768, heads=12, ffn=3072, decoder=False),
    "bert-large": dict(layers=24, hidden=1024, heads=16, ffn=4096, decoder=False),
    "gpt2": dict(layers=12, hidden=768, heads=12, ffn=3072, decoder=True),
    "gpt2-medium": dict(layers=24, hidden=1024, heads=16, ffn=4096, decoder=True),
    "vit-base": dict(layers=12, hidden=768, heads=12, ffn=3072, decoder=False),
    "deit-small": dict(layers=12, hidden=384, heads=6, ffn=1536, decoder=False),
    "minilm": dict(layers=6, hidden=384, heads=12, ffn=1536, decoder=False),
}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    ffn: int
    decoder: bool = False
    kv_heads: int | None = None    # grouped-query attention (Llama): K and V have fewer heads
    gated_ffn: bool = False        # Llama's SwiGLU: gate and up projections, then down

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return (self.kv_heads or self.heads) * self.head_dim

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers config (BERT, GPT-2, ViT, Llama field names) or a preset name."""
        if isinstance(config, str):
            if config not in PRESETS:
                raise ValueError(f"unknown model preset {config!r}; known: {', '.join(PRESETS)}")
            return cls(**PRESETS[config])
        get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), None)  # noqa: E731
        hidden = get("hidden_size", "n_embd")
        layers = get("num_hidden_layers", "n_layer")
        heads = get("num_attention_heads", "n_head")
        ffn = get("intermediate_size", "n_inner") or (4 * hidden if hidden else None)
        if not all((hidden, layers, heads, ffn)):
            raise ValueError(f"{type(config).__name__} lacks hidden size / layers / heads / FFN size")
        kv = getattr(config, "num_key_value_heads", None)
        return cls(layers, hidden, heads, ffn, config_is_decoder(config), kv if kv and kv != heads else None,
                   config_gated_ffn(config))


@dataclass(frozen=True)
class Op:
    """One matrix product (or softmax) of a layer. MACs count multiply-accumulates actually needed
    (N/M of the dense count for N:M weights); bytes are DRAM-side operand sizes."""

    layer: int
    name: str          # q, k, v, o, ffn_in, ffn_out, qk, softmax, pv
    kind: str          # "sparse_dense" (N:M weight x activations), "dense_dense", "softmax"
    m: int             # rows of the left operand (tokens)
    k: int             # reduction size
    n: int             # output columns
    pattern: str | None = None
    count: int = 1     # independent instances (heads)

    @property
    def macs(self) -> int:
        dense = self.m * self.k * self.n * self.count
        if self.pattern is None:
            return dense
        p = NMPattern.parse(self.pattern)
        return dense * p.n // p.m


def layer_ops(shape: ModelShape, layer: int, tokens: int, pattern: str | None = None) -> list[Op]:
    """One Transformer layer at ``tokens`` tokens: QKV/O projections, FFN, Q K^T, softmax, P V."""
    h, d, f, kv = shape.hidden, shape.head_dim, shape.ffn, shape.kv_dim
    ffn_in = [Op(layer, "ffn_gate", "sparse_dense", tokens, h, f, pattern)] if shape.gated_ffn else []
    return [
        Op(layer, "q", "sparse_dense", tokens, h, h, pattern),
        Op(layer, "k", "sparse_dense", tokens, h, kv, pattern),
        Op(layer, "v", "sparse_dense", tokens, h, kv, pattern),
        Op(layer, "qk", "dense_dense", tokens, d, tokens, None, shape.heads),
        Op(layer, "softmax", "softmax", tokens, tokens, 1, None, shape.heads),
        Op(layer, "pv", "dense_dense", tokens, tokens, d, None, shape.heads),
        Op(layer, "o", "sparse_dense", tokens, h, h, pattern),
        *ffn_in,
        Op(layer, "ffn_in", "sparse_dense", tokens, h, f, pattern),
        Op(layer, "ffn_out", "sparse_dense", tokens, f, h, pattern),
    ]


def model_ops(shape: ModelShape, tokens: int, pattern: str | None = None,
              token_keep: list[float] | None = None) -> list[Op]:
    """All layers; ``token_keep`` (one ratio per layer) shrinks the tokens each layer sees."""
    keep = token_keep or [1.0] * shape.layers
    if len(keep) != shape.layers:
        raise ValueError(f"token_keep has {len(keep)} ratios for {shape.layers} layers")
    if pattern is not None:
        p = NMPattern.parse(pattern)
        for size in (shape.hidden, shape.ffn):
            if size % p.m:
                raise ValueError(f"pattern {pattern}: input size {size} is not divisible by M={p.m}")
    ops = []
    for i, r in enumerate(keep):
        ops += layer_ops(shape, i, max(1, int(tokens * r)), pattern)
    return ops


def weight_bytes(shape: ModelShape, pattern: str | None = None, value_bits: int = 16) -> int:
    """Bytes of the block weights (QKVO + FFN) per layer stack, packed N:M with per-value indices."""
    from ..formats.packed import packed_bytes

    mats = [(shape.hidden, shape.hidden)] * 2 + [(shape.kv_dim, shape.hidden)] * 2 \
        + [(shape.ffn, shape.hidden)] * (2 if shape.gated_ffn else 1) + [(shape.hidden, shape.ffn)]
    if pattern is None:
        return shape.layers * sum(o * i for o, i in mats) * value_bits // 8
    p = NMPattern.parse(pattern)
    return shape.layers * sum(packed_bytes((o, i), p, value_bits) for o, i in mats)
