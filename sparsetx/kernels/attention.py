"""Attention for the SpAtten runtime: softmax(Q K^T * scale) V over the kept tokens and heads, plus
what SpAtten's cascade token pruning needs, the probability each key receives summed over heads and
queries, without ever holding a queries x keys score matrix.

Two routes, the same numbers (tested against :func:`reference_attention`):

* ``"c"``: a fused kernel (nm_cpu.c, ``attention_fused``) with an online softmax: one query row at
  a time, keys in blocks of 64, a running max and sum per row and the output rescaled when the max
  grows; the row's raw scores stay in a one-row buffer, from which the received probabilities are
  added at the end (one row, never the matrix). Fastest when there are few query rows (a decoding
  step: 4-5x the PyTorch route at 512 cached keys).
* ``"torch"``: query chunks of ``rows`` rows against all keys with PyTorch's BLAS matmuls and an
  exact softmax per chunk (a rows x keys strip): faster than the row kernel for prompts and
  encoders, where Q K^T is a real matrix product.

``"auto"`` takes the C kernel for up to ``C_MAX_ROWS`` query rows per KV head, the strips beyond;
inputs that are not fp32 (a float64 model) always take the strips, in their own dtype.
Grouped-query attention folds each KV head's query heads into its rows, so K and V are never
repeated. Causality (and a pruned, gapped KV cache) is by positions: query i may attend key j when
``key_pos[j] <= query_pos[i]``.
"""
from __future__ import annotations

import torch

from .loader import backend_library, ptr

C_MAX_ROWS = 16        # query rows per KV head up to which the row kernel is the faster route
QUERY_ROWS = 128       # rows per strip on the PyTorch route


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
    if use_c and not (q.requires_grad or k.requires_grad or v.requires_grad):
        return _fused_c(lib, q, k, v, scale, query_pos, key_pos, importance)
    qg = q.reshape(hkv, group * lq, d)                   # query heads folded into rows
    qp = None if query_pos is None else query_pos.repeat(group)
    out = torch.empty(hkv, group * lq, d, dtype=q.dtype)
    received = torch.zeros(lk, dtype=torch.float64) if importance else None
    for r0 in range(0, group * lq, rows):                # one strip of rows x all keys at a time
        scores = (qg[:, r0:r0 + rows] @ k.transpose(-1, -2)) * scale
        if qp is not None:
            scores = scores.masked_fill(~(key_pos[None, :] <= qp[r0:r0 + rows, None]), -torch.inf)
        p = torch.softmax(scores, dim=-1)
        out[:, r0:r0 + rows] = p @ v
        if importance:
            received += p.sum(dim=(0, 1)).double()
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
    lib.attention_fused(ptr(q), ptr(k), ptr(v), hq, hkv, lq, lk, d, float(scale), ptr(qp), ptr(kp), ptr(out),
                        ptr(received), torch.get_num_threads())
    return out, received


def reference_attention(q, k, v, scale, query_pos=None, key_pos=None):
    """The materialised softmax attention the fused one must equal (tests, benchmarks)."""
    group = q.shape[0] // k.shape[0]
    kk, vv = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = q @ kk.transpose(-1, -2) * scale
    if query_pos is not None:
        scores = scores.masked_fill(~(key_pos[None, :] <= query_pos[:, None]), -torch.inf)
    probs = torch.softmax(scores, dim=-1)
    return probs @ vv, probs.sum(dim=(0, 1)).double()
