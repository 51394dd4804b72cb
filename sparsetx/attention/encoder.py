"""SpAtten for encoders (BERT family): cascade token pruning, cascade head pruning and local value
pruning, computed by sparsetx's own attention forward over the model's weights.

    with spatten(model, SpAttenConfig(token_keep=0.5, head_keep=0.75)) as rt:
        logits = model(**batch).logits
    rt.stats  # per sequence, per layer: tokens and heads kept, top-k calls

Each sequence of a batch is processed on its own, at its real (unpadded) length, so padding never
changes a result. Dropped tokens leave the hidden states (later layers compute on fewer rows) and
never come back; dropped heads are not computed in later layers. Position 0 ([CLS]) and the last
real token ([SEP]) are never dropped.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from ..adapters import family_of
from ..kernels.attention import fused_attention
from ..kernels.nm_linear import linear_cols, linear_rows
from .importance import (check_ratios, head_importance, keep_count, keep_schedule, local_value_mask,
                         select_kept, token_importance)

TOKEN_POLICIES = ("cascade", "local", "random", "first")


@dataclass
class SpAttenConfig:
    """token_keep / head_keep: fraction kept at the last layer (linear ramp after the start layer)
    or one ratio per layer. value_topk: fraction (0, 1] of a row's kept keys whose V rows enter
    P V (None: all). token_policy: "cascade" (SpAtten), or a baseline with the same budget:
    "local" (current layer's scores only), "random", "first" (first-k tokens)."""

    token_keep: float | list[float] = 1.0
    head_keep: float | list[float] = 1.0
    value_topk: float | None = None
    token_start: float = 0.15      # no token pruning in the first 15 % of layers (SpAtten)
    head_start: float = 0.30       # no head pruning in the first 30 % of layers
    token_policy: str = "cascade"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.token_policy not in TOKEN_POLICIES:
            raise ValueError(f"unknown token policy {self.token_policy!r}; valid: {', '.join(TOKEN_POLICIES)}")
        for name in ("token_keep", "head_keep", "value_topk"):
            check_ratios(name, getattr(self, name))


@dataclass
class SpAttenEncoderOutput(BaseModelOutputWithPoolingAndCrossAttentions):
    """last_hidden_state holds the kept tokens only, left-aligned; attention_mask marks them and
    kept_positions gives their original positions (-1 for padding)."""

    attention_mask: torch.Tensor | None = None
    kept_positions: torch.Tensor | None = None


class SpAttenEncoder:
    def __init__(self, model: nn.Module, config: SpAttenConfig) -> None:
        self.family = family_of(model, decoder=False)
        self.base = self.family.base(model)
        self.config = config
        self.blocks = self.family.encoder_blocks(model)
        cfg = self.base.config
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.heads
        n = len(self.blocks)
        self.token_sched = keep_schedule(config.token_keep, n, math.ceil(config.token_start * n))
        self.head_sched = keep_schedule(config.head_keep, n, math.ceil(config.head_start * n))
        self.stats: list[list[dict]] = []
        self._gen = torch.Generator().manual_seed(config.seed)

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        """One unpadded sequence (L,) -> (hidden of kept tokens (K, H), their positions (K,), stats)."""
        cfg = self.config
        length = input_ids.shape[0]
        tt = None if token_type_ids is None else token_type_ids[None]
        h = self.family.embed(self.base, input_ids[None], tt)[0]
        pos = torch.arange(length)
        heads = torch.arange(self.heads)
        tok_scores = torch.zeros(length, dtype=torch.float64)
        head_scores = torch.zeros(self.heads, dtype=torch.float64)
        d = self.head_dim
        stats = []
        for i, blk in enumerate(self.blocks):
            # Token and head pruning for this layer, from the importance accumulated so far.
            k_tok = keep_count(length, self.token_sched[i], minimum=min(2, length))
            topk_calls = []
            if k_tok < h.shape[0]:
                scores = self._policy_scores(tok_scores, pos)
                protected = (pos == 0) | (pos == length - 1)
                keep = select_kept(scores, k_tok, protected)
                topk_calls.append({"unit": "token", "n": int(h.shape[0]), "k": k_tok})
                h, pos, tok_scores = h[keep], pos[keep], tok_scores[keep]
            k_head = keep_count(self.heads, self.head_sched[i])
            if k_head < heads.shape[0]:
                keep = select_kept(head_scores[heads], k_head)
                topk_calls.append({"unit": "head", "n": int(heads.shape[0]), "k": k_head})
                heads = heads[keep]
            tokens = h.shape[0]
            full = len(heads) == self.heads  # every head kept: use the modules, no weight copies
            rows = (heads[:, None] * d + torch.arange(d)).reshape(-1)

            def proj(lin):
                y = lin(h) if full else linear_rows(lin, h, rows)
                return y.view(tokens, -1, d).transpose(0, 1)

            q, k, v = proj(blk.q), proj(blk.k), proj(blk.v)
            values_fetched = tokens * tokens * len(heads)
            if cfg.value_topk is not None and cfg.value_topk < 1.0:
                probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)  # (heads, T, T)
                kv = max(1, math.ceil(cfg.value_topk * tokens))
                values_fetched = kv * tokens * len(heads)
                topk_calls.append({"unit": "value", "n": tokens, "k": kv, "calls": tokens * len(heads)})
                ctx = (probs * local_value_mask(probs, kv)) @ v  # (heads, T, d)
                layer_scores = token_importance(probs).double()
            else:  # online softmax over key blocks; the received probabilities from a second pass
                ctx, layer_scores = fused_attention(q, k, v, 1 / math.sqrt(d), importance=True)
            # SpAtten's cumulative importance: s[j] += sum_h sum_i P[h, i, j]; s_h += sum |E_h|
            tok_scores = layer_scores if cfg.token_policy == "local" else tok_scores + layer_scores
            head_scores[heads] += head_importance(ctx).double()
            merged = ctx.transpose(0, 1).reshape(tokens, -1)
            attn = blk.o(merged) if full else linear_cols(blk.o, merged, rows)
            h = blk.ln_attn(attn + h)
            h = blk.ln_ffn(blk.ffn_out(blk.act(blk.ffn_in(h))) + h)
            stats.append({"layer": i, "tokens": tokens, "heads": int(len(heads)), "keys_fetched": tokens * len(heads),
                          "values_fetched_rows": values_fetched, "topk": topk_calls})
        return h, pos, stats

    def model_shape(self) -> dict:
        return {"layers": len(self.blocks), "heads": self.heads, "head_dim": self.head_dim,
                "family": self.family.name}

    def stats_document(self) -> dict:
        """The run's statistics in the versioned trace schema (see :mod:`sparsetx.attention.trace`)."""
        from .trace import stats_document

        return stats_document(self.model_shape(), asdict(self.config), sequences=self.stats)

    def _policy_scores(self, cumulative: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        policy = self.config.token_policy
        if policy == "random":
            return torch.rand(pos.shape[0], generator=self._gen, dtype=torch.float64)
        if policy == "first":
            return -pos.double()
        return cumulative

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **kwargs) -> SpAttenEncoderOutput:
        if input_ids is None:
            raise ValueError("the SpAtten encoder runtime needs input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outs, positions, batch_stats = [], [], []
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].bool()
            tt = token_type_ids[b][real] if token_type_ids is not None else None
            h, pos, stats = self.encode(input_ids[b][real], tt)
            outs.append(h)
            positions.append(pos)
            batch_stats.append(stats)
        self.stats.extend(batch_stats)
        width = max(o.shape[0] for o in outs)
        hidden = torch.zeros(len(outs), width, outs[0].shape[-1], dtype=outs[0].dtype)
        mask = torch.zeros(len(outs), width, dtype=torch.long)
        kept = torch.full((len(outs), width), -1, dtype=torch.long)
        for b, (o, p) in enumerate(zip(outs, positions)):
            hidden[b, :o.shape[0]], mask[b, :o.shape[0]], kept[b, :o.shape[0]] = o, 1, p
        pooled = self.base.pooler(hidden) if getattr(self.base, "pooler", None) is not None else None
        return SpAttenEncoderOutput(last_hidden_state=hidden, pooler_output=pooled, attention_mask=mask,
                                    kept_positions=kept)


@contextmanager
def spatten(model: nn.Module, config: SpAttenConfig | None = None):
    """Run ``model`` with SpAtten inside the block; the model is unchanged afterwards."""
    runtime = SpAttenEncoder(model, config or SpAttenConfig())
    base = runtime.base
    before = vars(base).get("forward")   # a forward of the instance's own (the one-call encoder's), or None
    base.forward = runtime.forward  # instance attribute shadows the class's forward
    try:
        yield runtime
    finally:
        if before is None:
            del base.forward
        else:
            base.forward = before
