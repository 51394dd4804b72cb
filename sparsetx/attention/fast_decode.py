"""The one-token step of the SpAtten decoder runtime without transformers' per-layer machinery.

A decoding step of a Llama-family model spent more time around its matrix products than in them:
transformers' DynamicCache copies every layer's whole K and V to append one token (``torch.cat``),
the cut after the step copies them again (``index_select``, once per layer), and the modules'
calls, masks and hooks add tens of microseconds a layer. :class:`FastStep` runs the same step
as the runtime's attention would, when the step is the plain case:

* every layer's K and V live in one buffer ``(layers, KV heads, capacity, head dim)``
  (:class:`StackedKV`); a new token is one row written per layer, and attention reads a layer's
  first ``length`` rows in place (the C kernel takes the capacity as the KV heads' stride);
* every layer holds the same tokens (one KV budget, a policy whose scores do not depend on the
  layer, evicting after the forward), so one cut serves all layers: the rows of the dropped tokens
  are refilled from the end of the buffer (a few rows, not the whole cache). The cache's order of
  tokens is then no longer their order in the text; attention does not depend on it, and
  positions are tracked per slot;
* the transformers cache's layers hold views of the buffer, so the model, ``generate()`` and the
  runtime's slow path see the lengths they expect; a forward that is not the plain case (a prompt,
  head pruning, quantization, a per-layer policy) takes the runtime's full path, and the next plain
  step rebuilds the buffer from the cache.

The layers of the step run in one C call (nm_cpu.c ``llama_step``: RMSNorm, the seven
projections, RoPE, the K/V rows written into the buffer, fused attention with the received
probabilities, the SiLU-gated MLP, residuals) when every projection is one it reads (nn.Linear
fp32, Int8Linear, SparseLinear; :meth:`FastStep.plan`); int8 N:M weights keeping at least half
of their inputs read the mask layout there (values plus one byte a group of 8). Otherwise a
Python loop over the layers does the same with the modules.

The numbers are the runtime's: the same token importance, eviction and positions (tested against
the full path to fp32 rounding).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..adapters import apply_rope
from ..kernels.int8_linear import Int8Linear
from ..kernels.loader import library, ptr
from ..kernels.nm_linear import SparseLinear

GROW = 64      # rows added to the buffer's capacity beyond the tokens it holds when it fills
NF = 11        # int64 fields a linear takes in llama_step's table (nm_cpu.c: F_KIND .. F_VT)
MASK_MIN_N8 = 4   # the mask layout for patterns keeping at least 4 of 8 (sparser: the lane layout reads as
                  # few bytes and computes only the kept weights)


def _linear_fields(lin: nn.Module) -> tuple[list[int], list[torch.Tensor]] | None:
    """One linear's row of llama_step's table (kind, weight, aux, scales, bias, out, out padded, in,
    N, M, value type) and the tensors made here that the row points into (the module's buffers and
    the layouts cached on its weight live as long as it), or None for a module the C step does not read.
    Kinds: 0 dense fp32 (nn.Linear), 1 dense int8 (Int8Linear), 2 N:M mask layout (int8 values at
    least 4 of 8 kept), 3 N:M lane layout (the one-token kernel nm_linear's own)."""
    if lin._forward_hooks or lin._forward_pre_hooks:
        return None
    bias = getattr(lin, "bias", None)
    if bias is not None:
        bias = bias.detach().float().contiguous()
    keep = [] if bias is None else [bias]
    b = 0 if bias is None else bias.data_ptr()
    if type(lin) is nn.Linear:
        if lin.weight.dtype != torch.float32:
            return None
        w = lin.weight.detach().contiguous()
        o, k = w.shape
        return [0, w.data_ptr(), 0, 0, b, o, o, k, k, k, 0], keep + [w]
    if isinstance(lin, Int8Linear):
        o, k = lin.qweight.shape
        return [1, lin.qweight.data_ptr(), 0, lin.scales.data_ptr(), b, o, o, k, k, k, 2], keep
    if isinstance(lin, SparseLinear):
        kw = lin.weight_nm
        o, k = kw.out_features, kw.in_features
        n, m = kw.nm
        if kw.mask_n >= MASK_MIN_N8 and kw.mask_layout is not None:     # None: not int8, or M does not divide 8
            vals, masks = kw.mask_layout
            return [2, vals.data_ptr(), masks.data_ptr(), kw.scales.data_ptr(), b, o, o, k, kw.mask_n, 8, 2], keep
        vals, pos, o8, vtype, scales = kw.lane_args      # nm_linear's own one-token arguments (the weight holds them)
        return [3, vals.value, pos.value, scales.value if scales is not None else 0, b, o, o8, k, n, m, vtype], keep
    return None


class StackedKV:
    """Every layer's K and V in one buffer; ``length`` rows of each are the cache."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        layers, (_, n_kv, length, d) = len(keys), keys[0].shape
        self.capacity = length + GROW
        self.k = torch.empty(layers, n_kv, self.capacity, d)
        self.v = torch.empty_like(self.k)
        for i, (k, v) in enumerate(zip(keys, values)):
            self.k[i, :, :length] = k[0]
            self.v[i, :, :length] = v[0]
        self.length = length

    def grow(self) -> None:
        """Room for at least one more row (the buffer doubles)."""
        if self.length < self.capacity:
            return
        layers, n_kv, cap, d = self.k.shape
        k, v = self.k.new_empty(layers, n_kv, 2 * cap, d), self.v.new_empty(layers, n_kv, 2 * cap, d)
        k[:, :, :self.length], v[:, :, :self.length] = self.k[:, :, :self.length], self.v[:, :, :self.length]
        self.k, self.v, self.capacity = k, v, 2 * cap

    def drop(self, keep: torch.Tensor) -> torch.Tensor:
        """Keep the slots ``keep`` (bool, one per row held) in every layer; the kept rows beyond the
        new length move into the dropped rows below it. Returns the old slot of each new row."""
        n, kept = self.length, int(keep.sum())
        order = torch.arange(n)
        holes = torch.nonzero(~keep[:kept]).squeeze(1)            # dropped rows inside the new length
        movers = kept + torch.nonzero(keep[kept:]).squeeze(1)     # kept rows beyond it: as many
        if holes.numel():
            self.k[:, :, holes] = self.k[:, :, movers]
            self.v[:, :, holes] = self.v[:, :, movers]
            order[holes] = movers
        self.length = kept
        return order[:kept]

    def views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, KV heads, length, d) views of one layer, the shape a transformers cache layer holds."""
        return self.k[layer:layer + 1, :, :self.length], self.v[layer:layer + 1, :, :self.length]


class FastStep:
    """The plain one-token step for the Llama family (see the module docstring); ``forward`` takes
    the base model's place inside :func:`~sparsetx.attention.decoder.spatten_decoder`."""

    use_c = True      # every layer in one C call (nm_cpu.c llama_step) where the model allows it (plan())

    def __init__(self, runtime) -> None:
        self.rt = runtime
        cfg = runtime.config
        self.plain = (cfg.k_bits is None and cfg.value_topk is None and not runtime._head_pruning
                      and cfg.evict_after == "forward" and not runtime.policy.layer_scores)
        self.base = runtime.base
        self.original = type(self.base).forward.__get__(self.base)
        self.layers = list(self.base.layers[: self.base.config.num_hidden_layers])
        self.lib = library()
        self.kv: StackedKV | None = None
        self._plan: tuple | None | bool = False   # llama_step's table, built at the first step (None: not possible)
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stepped = False      # the last forward was a fast step (its cut is this class's)

    @staticmethod
    def supports(runtime) -> bool:
        """The module layout this step reads: a Llama base model (embed_tokens, rotary_emb, layers
        with input/post-attention norms, q/k/v/o projections and an MLP, a final norm)."""
        base = runtime.base
        need = ("embed_tokens", "rotary_emb", "layers", "norm")
        if runtime.family.name != "llama" or not all(hasattr(base, a) for a in need):
            return False
        layer = base.layers[0]
        return all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")) \
            and all(hasattr(layer.self_attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))

    # --- when the fast step applies --------------------------------------------------------------
    def _eligible(self, args: tuple, kwargs: dict):
        """The cache when this forward is a plain one-token step, else None."""
        rt = self.rt
        if not self.plain or args or torch.is_grad_enabled() or self.lib is None:
            return None
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return None
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None or x.shape[:2] != (1, 1) or (embeds is not None and embeds.dtype != torch.float32):
            return None
        cache = rt.family.cache_of(kwargs)
        if cache is None or rt._q_pos is None or self.base.embed_tokens.weight.dtype != torch.float32:
            return None
        if not rt.uniform_budget:   # the step cuts every layer's cache to one length
            return None
        return cache if self._stack(cache) else None

    def _stack(self, cache) -> bool:
        """Make (or keep) the stacked buffer of ``cache``; False when its layers differ."""
        rt, layers = self.rt, cache.layers
        if self.kv is not None and len(self._views) == len(layers) and all(
                layer.keys is k and layer.values is v for layer, (k, v) in zip(layers, self._views)):
            return True
        self.kv = None
        pos0 = rt.positions[0]
        if pos0.numel() == 0 or any(not torch.equal(p, pos0) for p in rt.positions[1:]):
            return False
        if len(layers) != len(self.layers) or any(getattr(layer, "keys", None) is None or layer.keys.dtype != torch.float32
                                                  or layer.keys.shape[-2] != pos0.numel() for layer in layers):
            return False
        self.kv = StackedKV([layer.keys for layer in layers], [layer.values for layer in layers])
        rt.positions = [pos0] * len(self.layers)
        self._publish(cache)
        return True

    def _publish(self, cache) -> None:
        """Point the transformers cache's layers at the buffer's current rows."""
        self._views = [self.kv.views(i) for i in range(len(self.layers))]
        for layer, (k, v) in zip(cache.layers, self._views):
            layer.keys, layer.values = k, v

    # --- the whole step in C ----------------------------------------------------------------------
    def plan(self):
        """(table, kept tensors, eps, scale, intermediate size) for nm_cpu.c ``llama_step``, built
        once; None when a layer is not what it reads: RMSNorms, a SiLU-gated MLP, projections of the
        config's shapes that are nn.Linear (fp32), Int8Linear or SparseLinear without hooks, and
        one epsilon, attention scale and head layout for every layer. The table points into the
        weights: a model changed after the first step (weights replaced, moved) needs a new runtime."""
        if self._plan is False:
            self._plan = None
            if getattr(self.base.config, "hidden_act", None) in ("silu", "swish") and self.lib is not None:
                rows = [self._layer_row(layer) for layer in self.layers]
                if all(rows) and len({r[2:] for r in rows}) == 1:
                    table = torch.tensor([r[0] for r in rows], dtype=torch.int64)
                    eps, scale, _, inter = rows[0][2:]
                    self._plan = (table, [t for r in rows for t in r[1]], eps, scale, inter)
        return self._plan

    def _layer_row(self, layer) -> tuple | None:
        """(table row, tensors it points into, eps, scale, heads, intermediate size) of one layer."""
        attn, mlp, hidden = layer.self_attn, layer.mlp, self.base.config.hidden_size
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all("RMSNorm" in type(nm).__name__ and hasattr(nm, "variance_epsilon") for nm in norms) \
                or len({nm.variance_epsilon for nm in norms}) != 1 or any(nm.weight.numel() != hidden for nm in norms) \
                or not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            return None
        n_q, n_kv, d = self.rt.family.heads(attn)
        inter = mlp.gate_proj.out_features
        # in the order llama_step reads them, with the (in, out) it sizes its buffers by
        shapes = {attn.q_proj: (hidden, n_q * d), attn.k_proj: (hidden, n_kv * d), attn.v_proj: (hidden, n_kv * d),
                  attn.o_proj: (n_q * d, hidden), mlp.gate_proj: (hidden, inter), mlp.up_proj: (hidden, inter),
                  mlp.down_proj: (inter, hidden)}
        weights = [nm.weight.detach().float().contiguous() for nm in norms]
        row, keep = [w.data_ptr() for w in weights], list(weights)
        for lin, io in shapes.items():
            got = _linear_fields(lin) if (lin.in_features, lin.out_features) == io else None
            if got is None:
                return None
            row += got[0]
            keep += got[1]
        assert len(row) == 2 + 7 * NF, "a table row is two norm weights and NF fields for each of 7 projections"
        return row, keep, float(norms[0].variance_epsilon), float(attn.scaling), (n_q, n_kv, d), inter

    # --- the step -------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self.stepped = False
        cache = self._eligible(args, kwargs)
        if cache is None:
            self.kv = None
            return self.original(*args, **kwargs)
        hidden = self._layers(kwargs, cache)
        self.stepped = True
        field = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{field: cache})   # transformers >= 5.? renamed it

    @torch.no_grad()
    def _layers(self, kwargs: dict, cache) -> torch.Tensor:
        rt, kv, base = self.rt, self.kv, self.base
        ids, h = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        h = base.embed_tokens(ids) if h is None else h
        cos, sin = base.rotary_emb(h, position_ids=kwargs["position_ids"])
        cos, sin = cos.reshape(1, 1, -1), sin.reshape(1, 1, -1)
        kv.grow()
        n = kv.length + 1                          # keys this step attends to: the cache and itself
        n_q, n_kv, d = rt.family.heads(self.layers[0].self_attn)
        received = torch.zeros(len(self.layers), n, dtype=torch.float64)
        threads = torch.get_num_threads()
        plan = self.plan() if self.use_c and cos.numel() == d else None   # rotary over the whole head
        if plan is not None:
            h = self._c_layers(plan, h, cos, sin, n, received, (n_q, n_kv, d), threads)
        else:
            h = self._python_layers(h, cos, sin, n, received, (n_q, n_kv, d), threads)
        kv.length = n
        self._account(received, n_kv, n_q, d)
        self._publish(cache)
        return base.norm(h)

    def _c_layers(self, plan, h, cos, sin, n, received, heads, threads) -> torch.Tensor:
        """Every layer in one call of nm_cpu.c ``llama_step`` (the same arithmetic as
        :meth:`_python_layers`, in C: no Python per layer)."""
        table, _, eps, scale, inter = plan
        n_q, n_kv, d = heads
        h = h.reshape(-1).float().clone()
        cos, sin = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()
        kv = self.kv
        self.lib.llama_step(ptr(table), len(self.layers), h.numel(), n_q, n_kv, d, inter, eps, scale,
                            ptr(kv.k), ptr(kv.v), kv.capacity, n, ptr(cos), ptr(sin), ptr(h), ptr(received), threads)
        return h.view(1, 1, -1)

    def _python_layers(self, h, cos, sin, n, received, heads, threads) -> torch.Tensor:
        """The layers one by one through their modules, attention by the C kernel over the buffer."""
        kv, (n_q, n_kv, d) = self.kv, heads
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(n_q, 1, d)
            k = attn.k_proj(x).view(n_kv, 1, d)
            q = apply_rope(q, cos, sin)
            kv.k[i, :, n - 1] = apply_rope(k, cos, sin)[:, 0]
            kv.v[i, :, n - 1] = attn.v_proj(x).view(n_kv, d)
            ctx = torch.empty(n_q, 1, d)
            # softmax(q K^T * scale) V over the layer's rows in place, and the probability each
            # key receives (SpAtten's token importance), added into its row of ``received``
            self.lib.attention_fused(ptr(q), ptr(kv.k[i]), ptr(kv.v[i]), n_q, n_kv, 1, n, kv.capacity, d,
                                     float(attn.scaling), None, None, ptr(ctx), ptr(received[i]), threads)
            h = h + attn.o_proj(ctx.view(1, 1, n_q * d))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h

    def _account(self, received: torch.Tensor, n_kv: int, n_q: int, d: int) -> None:
        """The runtime's state after the step, as its attention would have left it: positions,
        importance (s[t] += sum_h P[h, t], over every layer), queries seen, per-layer stats."""
        rt = self.rt
        pos = torch.cat([rt.positions[0], rt._q_pos])
        rt.positions = [pos] * len(self.layers)
        layers = len(self.layers)
        state = rt._state    # rows: importance, query counts, then per layer importance and query counts
        state[0, pos] += received.sum(0)
        state[1, pos] += layers
        state[2:2 + layers, pos] += received
        state[2 + layers:2 + 2 * layers, pos] += 1
        n = pos.numel()
        # the full path's per-layer statistics (the same for every layer but its number)
        stat = rt._layer_stat(0, n, 1, n_kv, n_q, d, [], n * n_q, None)
        stat["tokens_after"] = n
        rt.stats[-1].extend({**stat, "layer": i, "kv_head_ids": list(range(n_kv))} for i in range(layers))

    # --- the cut after the step -----------------------------------------------------------------
    def evict(self, cache) -> None:
        """The runtime's cut of layer 0, applied to every layer at once (they hold the same tokens,
        with the same budget and scores, so the cascade keeps the same set in each)."""
        rt = self.rt
        keep = rt._keep_mask(0, rt._q_pos)
        if keep is not None:
            order = self.kv.drop(keep)
            pos = rt.positions[0][order]
            rt.positions = [pos] * len(self.layers)
            self._publish(cache)
        for stat in rt.stats[-1]:
            stat["tokens_after"] = self.kv.length


def fast_step(runtime) -> FastStep | None:
    """The fast step for ``runtime``'s model, or None when its layout is not the one it reads."""
    return FastStep(runtime) if FastStep.supports(runtime) else None


