"""Attention for the SpAtten runtime: softmax(Q K^T * scale) V over the kept tokens and heads, plus
what SpAtten's cascade token pruning needs, the probability each key receives summed over heads and
queries, without ever holding a queries x keys score matrix.

Two routes, the same numbers (tested against :func:`reference_attention`):

* ``"c"``: a fused kernel (nm_cpu.c, ``attention_fused``) with an online softmax: one query row at
  a time, keys in blocks of 64, a running max and sum per row and the output rescaled when the max
  grows; the row's raw scores stay in a one-row buffer, from which the received probabilities are
  added at the end (one row, never the matrix). Fastest when there are few query rows (a decoding
  step: 4-5x the PyTorch route at 512 cached keys).
* ``"torch"``: query chunks of ``rows`` rows with PyTorch's BLAS matmuls and an exact softmax per
  chunk (a rows x keys strip), each chunk stopping at the last key its queries may see (a causal
  prompt computes about half the score matrix): faster than the row kernel for prompts and
  encoders, where Q K^T is a real matrix product. 1024 causal tokens, 9 query heads over 3 KV
  heads: 46 ms a layer here, against 88 ms for full strips and 20 ms for PyTorch's SDPA (which
  returns no received probabilities).

``"auto"`` takes the C kernel for up to ``C_MAX_ROWS`` query rows per KV head, the strips beyond;
inputs that are not fp32 (a float64 model) always take the strips, in their own dtype.
Grouped-query attention folds each KV head's query heads into its rows, so K and V are never
repeated. Causality (and a pruned, gapped KV cache) is by positions: query i may attend key j when
``key_pos[j] <= query_pos[i]``.
"""
from __future__ import annotations

import torch

from .loader import backend_library, library, ptr

C_MAX_ROWS = 16        # query rows per KV head up to which the row kernel is the faster route
QUERY_ROWS = 256       # rows per strip on the PyTorch route (measured: 256-512 best at 1024 tokens)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    query_pos: torch.Tensor | None = None, key_pos: torch.Tensor | None = None,
                    importance: bool = False, backend: str = "auto", rows: int = QUERY_ROWS):
    """q: (Hq, Lq, d); k, v: (Hkv, Lk, d) with Hq a multiple of Hkv. Returns (out (Hq, Lq, d),
    received (Lk,) float64 or None): ``received[j] = sum_h sum_i P[h, i, j]`` when ``importance``.
    Positions (1-D int tensors) give a causal mask; None means every query sees every key."""
    hq, lq, d = q.shape
    hkv, lk, _ = k.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not divide into {hkv} KV heads")
    if (query_pos is None) != (key_pos is None):
        raise ValueError("give both query_pos and key_pos, or neither")
    lib = backend_library(backend, "c")
    if query_pos is not None and key_pos.numel() and int(key_pos.max()) <= int(query_pos.min()):
        query_pos = key_pos = None                       # every key precedes every query: no mask needed
    group = hq // hkv
    use_c = lib is not None and q.dtype == torch.float32 and (backend == "c" or group * lq <= C_MAX_ROWS)
    grad = q.requires_grad or k.requires_grad or v.requires_grad
    if use_c and not grad:
        return _fused_c(lib, q, k, v, scale, query_pos, key_pos, importance)
    if query_pos is None and lib is not None and not grad and backend != "torch":   # many rows, no mask: blocked
        got = encoder_attention(q[None], k[None], v[None], scale, importance=importance)
        if got is not None:
            return got[0][0].transpose(0, 1), got[1]
    return _strips(q, k, v, scale, query_pos, key_pos, importance, rows)


def _strips(q, k, v, scale, query_pos, key_pos, importance, rows):
    """The PyTorch route: strips of ``rows`` query rows (a KV head's query heads folded in, position
    by position) against the keys they may see. With positions, keys sorted by position (a cache
    is) and queries in order, a strip stops at the last key its last query may see, so a prompt's
    causal attention computes about half the score matrix, and only strips that cross the diagonal
    are masked."""
    hq, lq, d = q.shape
    hkv, lk, _ = k.shape
    group = hq // hkv
    # rows i * group + g: query position i of query head g of the KV head, so a strip spans
    # consecutive positions of every head in the group
    qg = q if group == 1 else q.reshape(hkv, group, lq, d).transpose(1, 2).reshape(hkv, lq * group, d)
    out = torch.empty(hkv, lq * group, d, dtype=q.dtype)
    received = torch.zeros(lk, dtype=torch.float64) if importance else None
    ordered = query_pos is not None and bool((key_pos[1:] >= key_pos[:-1]).all()) \
        and bool((query_pos[1:] >= query_pos[:-1]).all())
    step = max(group, rows - rows % group)
    for r0 in range(0, lq * group, step):
        r1 = min(r0 + step, lq * group)
        kend = lk
        if ordered:   # keys beyond the strip's last query are masked anyway: leave them out
            kend = int(torch.searchsorted(key_pos, query_pos[(r1 - 1) // group], right=True))
        if kend == 0:
            out[:, r0:r1] = 0
            continue
        scores = torch.matmul(qg[:, r0:r1], k[:, :kend].transpose(-1, -2)).mul_(scale)
        if query_pos is not None and int(key_pos[kend - 1]) > int(query_pos[r0 // group]):
            qp = query_pos[torch.arange(r0, r1) // group]
            scores.masked_fill_(key_pos[None, :kend] > qp[:, None], -torch.inf)
        p = torch.softmax(scores, dim=-1)
        out[:, r0:r1] = p @ v[:, :kend]
        if importance:
            received[:kend] += p.sum(dim=(0, 1)).double()
    if group > 1:
        out = out.reshape(hkv, lq, group, d).transpose(1, 2)
    return out.reshape(hq, lq, d), received


def _fused_c(lib, q, k, v, scale, query_pos, key_pos, importance):
    """The C kernel (nm_cpu.c, attention_fused): one query row at a time, online softmax over key
    blocks of 64, the row's scores kept in a row buffer for the received probabilities."""
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    hq, lq, d = q.shape
    hkv, lk, _ = k.shape
    out = torch.empty(hq, lq, d)
    received = torch.zeros(lk, dtype=torch.float64) if importance else None
    qp = None if query_pos is None else query_pos.to(torch.int64).contiguous()
    kp = None if key_pos is None else key_pos.to(torch.int64).contiguous()
    lib.attention_fused(ptr(q), ptr(k), ptr(v), hq, hkv, lq, lk, lk, d, float(scale), ptr(qp), ptr(kp), ptr(out),
                        ptr(received), torch.get_num_threads())
    return out, received


def _encoder_kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether attention_encoder's kernel computes inputs of these shapes and types: fp32 (a float64
    model keeps its precision), d a multiple of 8, KV heads dividing the query heads, some keys.
    (Whether the kernel built is asked apart: library() cannot be traced by torch.compile.)"""
    return (q.shape[-1] % 8 == 0 and q.shape[1] % k.shape[1] == 0 and k.shape[2] > 0
            and all(t.dtype == torch.float32 for t in (q, k, v)))


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      key_bias: torch.Tensor | None = None, importance: bool = False, bits: int = 32):
    """Attention without a causal mask through the blocked C kernel (nm_cpu.c attention_encoder).
    q: (B, H, Lq, d), k, v: (B, Hkv, Lk, d), any strides (HF's transposed views are read in place);
    key_bias: (B, Lk) added to every query's scores (-inf: a padding key). Returns (out (B, Lq, H,
    d) contiguous: HF's layout after attention, received (Lk,) float64 or None: the probabilities
    each key receives summed over heads and queries, B = 1 only), or None when the C kernel is not
    there or the inputs are not its own (not fp32, d not a multiple of 8, Hkv not dividing H).
    bits: 32 computes in fp32; 8 quantises Q and K per row and V per channel to int8 and the
    probabilities to 14 bits, with integer products (nm_cpu.c, "int8 attention")."""
    check_attention_bits(bits)
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    lib = library()
    if lib is None or not _encoder_kernel_takes(q, k, v) or (importance and b != 1):
        return None
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(b, lq, h, d)
    received = torch.zeros(lk, dtype=torch.float64) if importance else None
    bias = None if key_bias is None else key_bias.float().contiguous()
    lib.attention_encoder(ptr(q), ptr(k), ptr(v), b, h, h // hkv, lq, lk, d, *q.stride()[:3], *k.stride()[:3],
                          *v.stride()[:3], float(scale), ptr(bias), ptr(out), out.stride(0), out.stride(2), out.stride(1),
                          ptr(received), bits, torch.get_num_threads())
    return out, received


def check_attention_bits(bits: int) -> int:
    if bits not in (8, 32):
        raise ValueError(f"attention bits {bits!r}: expected 32 (fp32) or 8 (int8 Q, K, V)")
    return bits


@torch.library.custom_op("sparsetx::encoder_attention", mutates_args=())
def _encoder_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          key_bias: torch.Tensor | None, bits: int = 32) -> torch.Tensor:
    """encoder_attention's output as one operator (what torch.compile traces)."""
    return encoder_attention(q, k, v, scale, key_bias, bits=bits)[0]


@_encoder_attention_op.register_fake
def _(q, k, v, scale, key_bias, bits=32):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])


def padding_only(mask: torch.Tensor | None) -> bool:
    """Whether a transformers attention mask is only key padding: None, or (B, 1, Lq, Lk) bool with
    the same row for every query (the first and last rows are compared outside torch.compile,
    where a data-dependent test would break the graph)."""
    return mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.dtype == torch.bool and (
        torch.compiler.is_compiling() or torch.equal(mask[:, 0, 0], mask[:, 0, -1])))


def key_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A padding-only mask (see :func:`padding_only`) as the (B, Lk) fp32 bias the C attention
    kernels add to every query's scores: 0 for a key kept, -inf for padding; None for no mask."""
    if mask is None:
        return None
    keep = mask[:, 0, 0]
    return torch.zeros(keep.shape, dtype=torch.float32).masked_fill_(~keep, -torch.inf)


def hf_encoder_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """transformers' attention interface ("sparsetx"): encoder_attention where it applies (no causal
    mask, a padding mask the same for every query, inference), else transformers' SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if (causal or not padding_only(attention_mask) or (dropout and module.training)
            or not _encoder_kernel_takes(query, key, value) or torch.is_grad_enabled() and query.requires_grad):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    bias = key_bias(attention_mask)
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    bits = getattr(module, "sparsetx_attention_bits", 32)
    if torch.compiler.is_compiling():   # one opaque operator for the graph
        return torch.ops.sparsetx.encoder_attention(query, key, value, scale, bias, bits), None
    return encoder_attention(query, key, value, scale, bias, bits=bits)[0], None   # eager: no dispatcher round trip


def use_encoder_attention(model, bits: int = 32) -> bool:
    """Route an encoder model's self-attention through :func:`hf_encoder_attention` (registered
    with transformers as "sparsetx", with SDPA's mask function). Decoders are left as they are
    (their prefill is causal). Returns whether the model was switched. ``bits`` 8: the attention
    of a BERT-family model computes on int8 Q, K, V (see :func:`encoder_attention`); other
    families stay fp32."""
    from ..adapters import BertFamily, find_family

    check_attention_bits(bits)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    generates = getattr(model, "can_generate", lambda: False)()   # a causal LM (its config says is_decoder False)
    if library() is None or generates or getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", None, "sparsetx"):
        return False
    AttentionInterface.register("sparsetx", hf_encoder_attention)
    AttentionMaskInterface.register("sparsetx", sdpa_mask)
    config._attn_implementation = "sparsetx"
    family = find_family(model)
    if isinstance(family, BertFamily):
        for module in family.attention_modules(model):
            module.sparsetx_attention_bits = bits
    return True


def reference_attention(q, k, v, scale, query_pos=None, key_pos=None):
    """The materialised softmax attention the fused one must equal (tests, benchmarks)."""
    group = q.shape[0] // k.shape[0]
    kk, vv = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = q @ kk.transpose(-1, -2) * scale
    if query_pos is not None:
        scores = scores.masked_fill(~(key_pos[None, :] <= query_pos[:, None]), -torch.inf)
    probs = torch.softmax(scores, dim=-1)
    return probs @ vv, probs.sum(dim=(0, 1)).double()


def reference_int8_attention(q, k, v, scale, key_bias=None):
    """encoder_attention at bits 8, in PyTorch (tests): q (B, H, Lq, d), k, v (B, Hkv, Lk, d), key_bias
    (B, Lk) or None -> (B, H, Lq, d). Q and K int8 per row, V int8 per channel, probabilities
    round(16383 * 2^(s - max)) on base-2 scores (exact 2^x here; the kernel's polynomial is within
    0.06 of an integer step, so a probability may differ by one)."""
    def int8(x, dim):
        mx = x.abs().amax(dim, keepdim=True)
        inv = torch.where(mx > 0, 127.0 / mx, torch.zeros_like(mx))
        return torch.round(x * inv).double(), (mx / 127.0).double()

    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    (q8, sq), (k8, sk), (v8, sv) = int8(q, -1), int8(k, -1), int8(v, -2)
    log2e = 1.4426950408889634
    s = (q8 @ k8.transpose(-1, -2)) * sk.transpose(-1, -2) * scale * log2e * sq
    if key_bias is not None:
        s = s + key_bias.double()[:, None, None, :] * log2e
    m = s.amax(-1, keepdim=True)
    p = torch.round(16383 * torch.exp2((s - m).clamp(min=-32))).nan_to_num(0.0)   # a row masked everywhere: 0
    total = p.sum(-1, keepdim=True)
    out = (p @ v8) * sv / torch.where(total > 0, total, torch.ones_like(total))
    return out.float()
