"""SpAtten for decoders with a KV cache (Llama family with grouped-query attention, and GPT-2).

    with spatten_decoder(model, DecoderConfig(kv_budget=256)) as rt:
        out = model.generate(**inputs, max_new_tokens=32)
    rt.stats  # per forward, per layer: tokens in the cache, K/V bytes fetched, rows refetched

sparsetx computes attention itself (projections, RoPE and o_proj read from the model's modules,
through the family adapter in :mod:`sparsetx.adapters`), so whatever ``attn_implementation`` the
model was loaded with, the pruned path is the same code.

* Positions: every token keeps its true position in the sequence however many tokens were
  evicted. A forward pre-hook on the base model passes ``position_ids`` (the runtime counts the
  sequence's tokens), so RoPE (Llama) and learned positions (GPT-2) see 10, 11, ... after 10
  tokens even when the cache holds 8; causality is decided by positions, not cache slots. A new
  cache object (each ``generate()`` makes one) starts a new sequence.

* Token importance (cascade): after every layer's attention, s[t] += sum over query heads and
  queries of P[h, q, t], one score per original position, shared by all layers and accumulated
  over generation steps. Grouped-query attention: the query heads that share a KV head each add
  their probabilities (the sum runs over all query heads), since the token is fetched once per KV
  head but read by each of its query heads.
* Eviction: after a layer's attention (or, with ``evict_after="forward"``, after the whole
  forward) its cache keeps at most ``budget`` tokens (a KV budget, one per layer if a list, or a
  ratio of the tokens seen), chosen by the policy (:mod:`sparsetx.attention.policies`). The
  cascade also removes from layer i every token layer i-1 no longer holds, so a token dropped at
  layer i is absent from every later layer and never returns. The newest token(s) are never
  dropped; the prompt is attended in full (SpAtten's summarization stage prunes nothing during
  the prompt, only afterwards).
* Baselines with the same budget: "window" (the most recent tokens), "sink" (StreamingLLM: the
  first ``sink_tokens`` plus the most recent), "h2o" (attention accumulated per layer over steps,
  no cascade across layers).
* Head pruning (cascade): each KV head's importance is the summed output magnitude of the query
  heads that share it, accumulated by head index over layers and steps; a dropped KV head takes its
  query heads with it, is removed from the cache, and is not computed in later layers.
* Local value pruning: per query row only the top ``value_topk`` fraction of keys' V rows enter P V.
* Progressive quantization: K quantized to ``k_bits`` = MSB + ``lsb_bits``, V to ``v_bits``. Each
  query row is computed from the MSB part of K; rows whose max probability is below
  ``requant_threshold`` are recomputed with MSB + LSB. The stats count the bytes a memory system
  would fetch with and without quantization.
"""
from __future__ import annotations

import functools
import math
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..adapters import family_of
from ..kernels.attention import fused_attention
from .fast_decode import fast_step
from .importance import (check_ratios, head_importance, join_msb_lsb, keep_count, keep_schedule,
                         local_value_mask, msb_value, quantize, select_kept, split_msb_lsb)
from .policies import POLICIES, Policy, resolve_policy

DECODER_POLICIES = tuple(POLICIES)
EVICT_AFTER = ("layer", "forward")
QUERY_CHUNK = 128


@dataclass
class DecoderConfig:
    """kv_budget: max cached tokens per layer, one number or one per layer (None: no absolute
    budget). token_keep: fraction of the tokens seen kept per layer (a single ratio ramps after
    ``token_start`` as for encoders). policy: a name or a :mod:`~sparsetx.attention.policies`
    object. evict_after: "forward" (default) cuts every layer's cache after the whole forward,
    ranking by the importance of all its layers; "layer" cuts each layer's cache right after its
    attention, by the importance gathered so far (in a prompt, layer 0 then decides alone). Quantization is off when k_bits is None; the
    default split follows SpAtten's GPT-2 medium trace: K 8 + 4 bits, V 8 bits, threshold 0.1."""

    kv_budget: int | list[int] | None = None
    token_keep: float | list[float] = 1.0
    token_start: float = 0.15
    head_keep: float | list[float] = 1.0   # fraction of KV heads kept (cascade, by accumulated output magnitude)
    head_start: float = 0.30
    value_topk: float | None = None        # local value pruning: fraction of a row's keys whose V rows are read
    policy: str | Policy = "cascade"
    sink_tokens: int = 4                   # StreamingLLM's sinks when policy is the name "sink"
    evict_after: str = "forward"
    k_bits: int | None = None
    lsb_bits: int = 4
    v_bits: int = 8
    requant_threshold: float = 0.1
    fast_step: bool = True                 # one-token steps of the plain case without transformers' layers (fast_decode.py)

    def __post_init__(self) -> None:
        resolve_policy(self.policy, self.sink_tokens)
        budgets = self.kv_budget if isinstance(self.kv_budget, (list, tuple)) else [self.kv_budget]
        for b in budgets:
            if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 2):
                raise ValueError(f"kv_budget {b!r} must be an integer >= 2 tokens")
        if self.evict_after not in EVICT_AFTER:
            raise ValueError(f"evict_after {self.evict_after!r}; valid: {', '.join(EVICT_AFTER)}")
        for name in ("token_keep", "head_keep", "value_topk"):
            check_ratios(name, getattr(self, name))
        if self.k_bits is not None and not 0 < self.lsb_bits < self.k_bits:
            raise ValueError(f"lsb_bits {self.lsb_bits} must be in (0, k_bits={self.k_bits})")
        if not 0.0 <= self.requant_threshold <= 1.0:
            raise ValueError(f"requant_threshold {self.requant_threshold} is outside [0, 1]")

    @classmethod
    def quantized(cls, **kw) -> DecoderConfig:
        return cls(**{"k_bits": 12, "lsb_bits": 4, "v_bits": 8, **kw})


class SpAttenDecoder:
    """The runtime behind :func:`spatten_decoder`: per-sequence state (true positions, cumulative
    importance, kept heads) and the attention forward that replaces the model's."""

    def __init__(self, model: nn.Module, config: DecoderConfig) -> None:
        self.config = config
        self.family = family_of(model, decoder=True)
        self.base = self.family.base(model)
        self.attn = self.family.attention_modules(model)
        self._layer = {id(m): i for i, m in enumerate(self.attn)}
        n = len(self.attn)
        self.policy = resolve_policy(config.policy, config.sink_tokens)
        if isinstance(config.kv_budget, (list, tuple)) and len(config.kv_budget) != n:
            raise ValueError(f"kv_budget has {len(config.kv_budget)} budgets for a model with {n} layers")
        self.schedule = keep_schedule(config.token_keep, n, math.ceil(config.token_start * n))
        self.head_schedule = keep_schedule(config.head_keep, n, math.ceil(config.head_start * n))
        self._head_pruning = any(r < 1.0 for r in self.head_schedule)
        # one budget for every layer at every length: one keep ratio and one KV budget throughout
        budgets = config.kv_budget if isinstance(config.kv_budget, (list, tuple)) else [config.kv_budget]
        self.uniform_budget = len(set(self.schedule)) == 1 and len(set(budgets)) == 1
        self.reset()
        self.fast = fast_step(self) if config.fast_step else None

    def reset(self) -> None:
        """Forget the importance and positions (a new sequence)."""
        n = len(self.attn)
        self.seen = 0                                    # next position: tokens of the sequence so far
        self.importance = torch.zeros(0, dtype=torch.float64)
        self.layer_importance = [torch.zeros(0, dtype=torch.float64) for _ in range(n)]  # h2o
        self.query_count = torch.zeros(0, dtype=torch.float64)   # queries that saw each token, over layers
        self.layer_query_count = [torch.zeros(0, dtype=torch.float64) for _ in range(n)]
        self._state: torch.Tensor | None = None  # the state above: views of its rows, in that order (_grow)
        # per layer, the true position of each cached slot (text order, except after fast steps: fast_decode.py)
        self.positions: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long) for _ in range(n)]
        n_kv = self.family.heads(self.attn[0])[1]
        self.head_scores = torch.zeros(n_kv, dtype=torch.float64)   # accumulated per KV-head index
        self.alive: list[torch.Tensor] = [torch.arange(n_kv) for _ in range(n)]
        self.stats: list[list[dict]] = []
        self.query_positions: list[torch.Tensor] = []   # per forward: the true positions of its new tokens
        self._cache_ref = None                          # weak reference to this sequence's cache
        self._q_pos: torch.Tensor | None = None
        self.evicting = True   # False: attend to the (already cut) cache without cutting it further

    def budget(self, layer: int, seen: int) -> int:
        k = keep_count(seen, self.schedule[layer])
        b = self.config.kv_budget
        if isinstance(b, (list, tuple)):
            b = b[layer]
        return k if b is None else min(k, b)

    # --- before each model forward: the sequence, and its true positions -----------------------
    def before_forward(self, base: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook of the base model. Starts a new sequence when the cache is new, and
        passes the new tokens' true positions (``position_ids``): without them transformers counts
        positions from the cache length, which eviction shortens."""
        x = kwargs.get("input_ids")
        if x is None:
            x = args[0] if args else kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("the SpAtten decoder runtime needs input_ids or inputs_embeds")
        if x.shape[0] != 1:
            raise ValueError("the SpAtten decoder runtime prunes one sequence at a time (batch size 1)")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.bool().all()):
            raise ValueError("the SpAtten decoder runtime takes one unpadded sequence; the attention_mask has padding")
        new = x.shape[1]
        self._begin(self.family.cache_of(kwargs))
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(self.seen, self.seen + new).unsqueeze(0)
            kwargs["position_ids"] = pos
        elif pos.numel() != new:
            raise ValueError(f"position_ids hold {pos.numel()} positions for {new} new tokens")
        q_pos = pos.reshape(-1).long().clone()
        if new > 1 and not bool((q_pos[1:] > q_pos[:-1]).all()):
            raise ValueError("position_ids must increase along the sequence")
        if new and int(q_pos.min()) < self.seen:
            raise ValueError(f"position {int(q_pos.min())} was already seen in this sequence (next is {self.seen}); "
                             "start a new cache for a new sequence")
        self._q_pos = q_pos
        self.query_positions.append(q_pos)
        self.seen = int(q_pos.max()) + 1 if new else self.seen
        self._grow(self.seen)
        self.stats.append([])
        return args, kwargs

    def _grow(self, length: int) -> None:
        """Per-position state (importance, query counts) long enough for ``length`` positions: views
        of buffers that double when full (a decoding step adds one position; padding every tensor
        each step cost a millisecond a step on a 30-layer model)."""
        if length <= self.importance.numel():
            return
        if self._state is None or length > self._state.shape[1]:
            state = [self.importance, self.query_count, *self.layer_importance, *self.layer_query_count]
            capacity = max(length, 2 * state[0].numel(), 64)
            self._state = torch.zeros(len(state), capacity, dtype=torch.float64)
            for row, t in zip(self._state, state):
                row[:t.numel()] = t
        n = len(self.attn)
        views = list(self._state[:, :length].unbind(0))
        self.importance, self.query_count = views[0], views[1]
        self.layer_importance, self.layer_query_count = views[2:2 + n], views[2 + n:]

    def after_forward(self, base: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Forward hook of the base model: with ``evict_after="forward"``, every layer's cache is cut
        now, in layer order (the cascade needs layer i - 1's cut first), by the importance of the
        whole forward."""
        if self.config.evict_after == "forward" and self._cache_ref is not None and self._cache_ref() is not None:
            cache = self._cache_ref()
            if self.fast is not None and self.fast.stepped:   # every layer holds the same tokens: one cut
                self.fast.evict(cache)
                self._q_pos = None
                return
            for layer, module in enumerate(self.attn):
                self._evict(layer, cache, module.layer_idx, self._q_pos)
                if layer < len(self.stats[-1]):
                    self.stats[-1][layer]["tokens_after"] = int(self.positions[layer].numel())
        self._q_pos = None

    def _begin(self, cache) -> None:
        """A forward without a cache (the model makes one) or with a cache this runtime has not seen
        is a new sequence: the state is reset, never matched by ``id()``, which Python reuses."""
        if cache is not None and self._cache_ref is not None and self._cache_ref() is cache:
            return
        self.reset()
        if cache is None:
            return
        self.family.check_cache(cache)
        self._cache_ref = weakref.ref(cache)
        lengths = {self.family.cache_length(cache, m.layer_idx) for m in self.attn}
        if lengths == {0}:
            return
        if len(lengths) != 1:
            raise ValueError("this KV cache holds different numbers of tokens per layer (pruned elsewhere); "
                             "start a new cache under the SpAtten runtime")
        filled = lengths.pop()   # a cache filled without the runtime: its tokens sit at 0 .. filled-1
        self.seen = filled
        self.positions = [torch.arange(filled) for _ in self.attn]
        self._grow(filled)

    # --- the attention forward ----------------------------------------------------------------
    def attention(self, module, hidden_states, *args, **kwargs):
        """Replaces ``module.forward``; takes whatever keywords this transformers passes."""
        if self._q_pos is None:
            raise RuntimeError("the SpAtten decoder runtime runs inside the model's forward; call the model")
        cache = self.family.cache_of(kwargs)
        if cache is None:
            raise ValueError("the SpAtten decoder runtime needs the model's KV cache (use_cache=True)")
        if self._cache_ref is None:          # the model made this sequence's cache
            self.family.check_cache(cache)
            self._cache_ref = weakref.ref(cache)
        layer, idx = self._layer[id(module)], module.layer_idx
        position_embeddings = kwargs.get("position_embeddings")
        if self.family.positions == "rope" and position_embeddings is None:
            raise ValueError(f"{type(module).__name__} was called without position_embeddings")
        cfg = self.config
        n_q, n_kv, d = self.family.heads(module)
        group = n_q // n_kv
        if self._head_pruning:
            self._prune_heads(layer, cache, idx, n_kv)
        alive = self.alive[layer]
        full = len(alive) == n_kv
        q_rows = kv_rows = None                      # every head kept: the modules' own weights
        if not full:
            kv_rows = (alive[:, None] * d + torch.arange(d)).reshape(-1)
            q_heads = (alive[:, None] * group + torch.arange(group)).reshape(-1)
            q_rows = (q_heads[:, None] * d + torch.arange(d)).reshape(-1)
        q, k, v = self.family.qkv(module, hidden_states, position_embeddings, q_rows, kv_rows)
        new = q.shape[2]
        q_pos = self._q_pos
        keys, values = self.family.update_cache(cache, idx, k, v)
        n_kv, n_q = len(alive), len(alive) * group
        self.positions[layer] = torch.cat([self.positions[layer], q_pos])
        pos = self.positions[layer]

        self._scaling = self.family.scaling(module)
        kv_top = max(1, math.ceil(cfg.value_topk * pos.numel())) if cfg.value_topk and cfg.value_topk < 1.0 else None
        flat_heads = torch.zeros(n_q, dtype=torch.bool)
        refetched = 0
        if cfg.k_bits is None and kv_top is None:
            # Fused attention (no score matrix), with the probability each key receives
            work = torch.float64 if q.dtype == torch.float64 else torch.float32   # fp16/bf16 caches: fp32 maths
            out, contrib = fused_attention(q[0].to(work), keys[0].to(work), values[0].to(work), self._scaling,
                                           q_pos, pos, importance=True)
            ctx_heads = out[None].to(values.dtype)
        else:
            causal = pos[None, :] <= q_pos[:, None]                  # (new, T)
            ctx_heads, contrib, refetched, flat_heads = self._chunked(q, keys, values, causal, group, kv_top)
        stat = self._layer_stat(layer, int(pos.numel()), new, n_kv, n_q, d, alive.tolist(),
                                (kv_top or pos.numel()) * new * n_q, flat_heads.view(n_kv, group).any(dim=-1))
        if cfg.k_bits is not None:
            q_ids = (alive[:, None] * group + torch.arange(group)).reshape(-1)
            stat.update(rows_refetched=refetched, rows=new * n_q, requant_heads=q_ids[flat_heads].tolist())
        if self._head_pruning:  # head importance, pooled over the query heads sharing a KV head: s_h += sum |E|
            self.head_scores[alive] += head_importance(ctx_heads[0]).double().view(n_kv, group).sum(-1)
        ctx = ctx_heads.transpose(1, 2).reshape(1, new, n_q * d)
        out = self.family.output(module, ctx, q_rows)
        self.importance[pos] += contrib
        self.layer_importance[layer][pos] += contrib  # per layer: H2O's scores (no cascade across layers)
        seen_by = (new - torch.searchsorted(q_pos, pos)).double()   # queries of this forward at or after each key
        self.query_count[pos] += seen_by
        self.layer_query_count[layer][pos] += seen_by
        if self.config.evict_after == "layer":
            self._evict(layer, cache, idx, q_pos)
        stat["tokens_after"] = int(self.positions[layer].numel())
        self.stats[-1].append(stat)
        return out, None

    def _chunked(self, q, keys, values, causal, group, kv_top):
        """Materialised softmax per query chunk: progressive quantization needs each row's max
        probability before the LSB refetch, local value pruning each row's top-k."""
        cfg = self.config
        n_q, new = q.shape[1], q.shape[2]
        kk = keys.repeat_interleave(group, dim=1)                    # (1, n_q, T, d)
        vv = values.repeat_interleave(group, dim=1)
        if cfg.k_bits is not None:  # K as MSB and LSB planes, V at v_bits (progressive quantization)
            kq, kscale = quantize(kk.float(), cfg.k_bits)
            msb, lsb = split_msb_lsb(kq, cfg.k_bits, cfg.lsb_bits)
            coarse = msb_value(msb, cfg.lsb_bits).float() * kscale
            fine = join_msb_lsb(msb, lsb, cfg.lsb_bits).float() * kscale
            vq, vs = quantize(vv.float(), cfg.v_bits)
            vv = (vq.float() * vs).to(vv.dtype)
        contrib = torch.zeros(kk.shape[2], dtype=torch.float64)
        flat_heads = torch.zeros(n_q, dtype=torch.bool)
        refetched, parts = 0, []
        # Query chunks keep the probabilities small enough to stay in cache (a 1024-token prompt would
        # otherwise materialise heads x 1024 x 1024 floats per layer).
        for s0 in range(0, new, QUERY_CHUNK):
            qc, cc = q[:, :, s0:s0 + QUERY_CHUNK], causal[s0:s0 + QUERY_CHUNK]
            if cfg.k_bits is not None:
                probs = self._probs(qc.float(), coarse, cc)
                flat = probs.amax(dim=-1) < cfg.requant_threshold      # (1, n_q, chunk)
                if flat.any():
                    probs = torch.where(flat[..., None], self._probs(qc.float(), fine, cc), probs)
                refetched += int(flat.sum())
                flat_heads |= flat[0].any(dim=-1)
            else:
                probs = self._probs(qc, kk, cc)
            # SpAtten cumulative token importance: s[t] += sum_h sum_q P[h, q, t]
            contrib += probs[0].sum(dim=(0, 1)).double()
            if kv_top is not None:  # local value pruning, per query row
                probs = probs * local_value_mask(probs, kv_top)
            parts.append(probs.to(vv.dtype) @ vv)
        return torch.cat(parts, dim=2), contrib, refetched, flat_heads

    def _probs(self, q, kk, causal):
        scores = (q @ kk.transpose(-1, -2)).float() * self._scaling  # 1/sqrt(d) (GPT-2 may add 1/layer)
        return torch.softmax(scores.masked_fill(~causal, -torch.inf), dim=-1)

    def _layer_stat(self, layer: int, tokens: int, queries: int, n_kv: int, n_q: int, d: int, kv_head_ids: list,
                    values_rows: int, flat_kv) -> dict:
        """One layer's statistics for one forward, byte counts included (the fast step writes the
        same ones); ``tokens_after`` is added once the layer's cut is known."""
        stat = {"layer": layer, "tokens": tokens, "queries": queries, "kv_heads": n_kv, "head_dim": d,
                "kv_head_ids": kv_head_ids, "values_fetched_rows": values_rows, "heads": n_q}
        self._fetch_stats(stat, tokens, n_kv, d, flat_kv)
        return stat

    def _fetch_stats(self, stat, tokens, n_kv, d, flat_kv):
        """Bytes a memory system reads for this layer's K and V (fp16 baseline: 2 bytes a value).
        flat_kv: (kv heads,) True where a query row of the head refetched its LSBs."""
        cfg = self.config
        per_head = tokens * d
        stat["kv_bytes_fp16"] = 2 * 2 * n_kv * per_head
        if cfg.k_bits is None:
            return
        msb_bits = cfg.k_bits - cfg.lsb_bits
        # LSBs are fetched per KV head when any of its query rows is flat (the hardware refetches keys only)
        stat["k_bytes_msb"] = n_kv * per_head * msb_bits / 8
        stat["k_bytes_lsb_refetch"] = int(flat_kv.sum()) * per_head * cfg.lsb_bits / 8
        stat["v_bytes"] = n_kv * per_head * cfg.v_bits / 8
        stat["kv_bytes_quantized"] = stat["k_bytes_msb"] + stat["k_bytes_lsb_refetch"] + stat["v_bytes"]

    def _prune_heads(self, layer: int, cache, idx: int, n_kv: int) -> None:
        """Keep the KV heads with the largest accumulated output magnitude; cascade across layers."""
        alive = self.alive[layer]
        if layer > 0:
            alive = alive[torch.isin(alive, self.alive[layer - 1])]
        k = keep_count(n_kv, self.head_schedule[layer])
        if len(alive) > k:
            alive = alive[select_kept(self.head_scores[alive], k)]
        if len(alive) < len(self.alive[layer]):
            if self.family.cache_length(cache, idx):  # the cached K/V of dropped heads go too
                keep = torch.nonzero(torch.isin(self.alive[layer], alive)).squeeze(1)
                self.family.cut_cache(cache, idx, keep, dim=1)
            self.alive[layer] = alive

    def _evict(self, layer: int, cache, idx: int, q_pos: torch.Tensor) -> None:
        """Cut layer ``layer``'s cache to its budget by the policy; the new tokens stay."""
        keep_mask = self._keep_mask(layer, q_pos)
        if keep_mask is not None:
            keep = keep_mask.nonzero().squeeze(1)
            self.family.cut_cache(cache, idx, keep, dim=-2)
            self.positions[layer] = self.positions[layer][keep]

    def _keep_mask(self, layer: int, q_pos: torch.Tensor) -> torch.Tensor | None:
        """Which of layer ``layer``'s cached tokens its budget and the policy keep (bool, one per
        token), or None when it keeps them all."""
        if not self.evicting:
            return None
        policy = self.policy
        pos = self.positions[layer]
        keep_mask = torch.ones(pos.numel(), dtype=torch.bool)
        if policy.cascade and layer > 0:   # the cascade: S_i is a subset of S_{i-1}
            keep_mask &= torch.isin(pos, self.positions[layer - 1])
        budget = self.budget(layer, self.seen)
        candidates = keep_mask.nonzero().squeeze(1)
        if candidates.numel() > budget:
            cand_pos = pos[candidates]
            protected = torch.isin(cand_pos, q_pos)           # this forward's tokens, when they fit
            if int(protected.sum()) > budget:
                protected = torch.zeros_like(protected)
            if policy.recent:                                  # and the recent window, when it fits too
                both = protected | (cand_pos >= self.seen - policy.recent)
                if int(both.sum()) <= budget:
                    protected = both
            kept = candidates[select_kept(policy.scores(self, layer, cand_pos), budget, protected)]
            keep_mask = torch.zeros_like(keep_mask)
            keep_mask[kept] = True
        return None if keep_mask.all() else keep_mask

    def stats_document(self) -> dict:
        """The run's statistics in the versioned trace schema (see :mod:`sparsetx.attention.trace`)."""
        from .trace import stats_document

        n_q, n_kv, d = self.family.heads(self.attn[0])
        shape = {"layers": len(self.attn), "heads": n_q, "kv_heads": n_kv, "head_dim": d, "family": self.family.name}
        return stats_document(shape, asdict(self.config), steps=self.stats)


@contextmanager
def spatten_decoder(model: nn.Module, config: DecoderConfig | None = None):
    """Run a decoder with SpAtten's KV-cache pruning inside the block; the model is unchanged after."""
    runtime = SpAttenDecoder(model, config or DecoderConfig())
    hooks = [runtime.base.register_forward_pre_hook(runtime.before_forward, with_kwargs=True),
             runtime.base.register_forward_hook(runtime.after_forward, with_kwargs=True)]
    for module in runtime.attn:
        module.forward = functools.partial(runtime.attention, module)
    if runtime.fast is not None:
        runtime.base.forward = runtime.fast.forward
    try:
        yield runtime
    finally:
        for hook in hooks:
            hook.remove()
        for module in runtime.attn:
            del module.forward
        if runtime.fast is not None:
            del runtime.base.forward
