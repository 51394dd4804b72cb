"""Fused attention for the SpAtten runtime: softmax(Q K^T * scale) V over the kept tokens and heads
with an online softmax (a running max and sum per query row, updated one key block at a time), so no
queries x keys score matrix is materialised; only one (heads, queries, block) strip at a time.

SpAtten's cascade token pruning also needs, per key, the attention probability it receives summed
over heads and queries. Those need each row's final normaliser, so they come from a second pass over
the key blocks that recomputes Q K^T and reads the stored log-sum-exp (the scores never leave the
block, as on the accelerator, where the top-k engine consumes them on chip).

Grouped-query attention folds each KV head's query heads into its query rows, so K and V are never
repeated. Causality (and a pruned, non-contiguous KV cache) is given by positions: query i may attend
key j when ``key_pos[j] <= query_pos[i]``.
"""
from __future__ import annotations

import torch

KEY_BLOCK = 128
STRIP = 1 << 16  # score elements (heads x rows x keys) small enough to take in one block: a decode step


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    query_pos: torch.Tensor | None = None, key_pos: torch.Tensor | None = None,
                    importance: bool = False, block: int = KEY_BLOCK):
    """q: (Hq, Lq, d); k, v: (Hkv, Lk, d) with Hq a multiple of Hkv. Returns (out (Hq, Lq, d),
    received (Lk,) float64 or None): ``received[j] = sum_h sum_i P[h, i, j]`` when ``importance``.
    Positions (1-D int tensors) give a causal mask; None means every query sees every key."""
    hq, lq, d = q.shape
    hkv, lk, _ = k.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not divide into {hkv} KV heads")
    if (query_pos is None) != (key_pos is None):
        raise ValueError("give both query_pos and key_pos, or neither")
    group = hq // hkv
    qg = q.reshape(hkv, group * lq, d)                   # query heads folded into rows
    if query_pos is not None and key_pos.numel() and int(key_pos.max()) <= int(query_pos.min()):
        query_pos = key_pos = None                       # every key precedes every query: no mask needed
    qp = None if query_pos is None else query_pos.repeat(group)
    if hq * lq * lk <= STRIP:
        # One block holds every score (a decoding step's single row per head): the online softmax
        # is the plain one, and the received probabilities need no second pass.
        p = torch.softmax(_scores(qg, k, scale, qp, key_pos, 0, lk), dim=-1)
        out = (p @ v).reshape(hq, lq, d)
        return out, (p.sum(dim=(0, 1)).double() if importance else None)
    m = torch.full((hkv, group * lq, 1), -torch.inf, dtype=q.dtype)   # running max
    s = torch.zeros(hkv, group * lq, 1, dtype=q.dtype)                # running sum of exp
    acc = torch.zeros(hkv, group * lq, d, dtype=q.dtype)
    for j0 in range(0, lk, block):
        scores = _scores(qg, k[:, j0:j0 + block], scale, qp, key_pos, j0, block)
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with no key yet
        p = torch.exp(scores - m_safe)
        corr = torch.exp(m - m_safe)
        s = s * corr + p.sum(dim=-1, keepdim=True)
        acc = acc * corr + p @ v[:, j0:j0 + block]
        m = m_new
    out = (acc / s).reshape(hq, lq, d)
    if not importance:
        return out, None
    lse = m + torch.log(s)                              # log of each row's normaliser
    received = torch.empty(lk, dtype=torch.float64)
    for j0 in range(0, lk, block):
        p = torch.exp(_scores(qg, k[:, j0:j0 + block], scale, qp, key_pos, j0, block) - lse)
        received[j0:j0 + block] = p.sum(dim=(0, 1)).double()
    return out, received


def _scores(qg, kb, scale, qp, key_pos, j0, block):
    scores = (qg @ kb.transpose(-1, -2)) * scale
    if qp is not None:
        allowed = key_pos[j0:j0 + block][None, :] <= qp[:, None]
        scores = scores.masked_fill(~allowed, -torch.inf)
    return scores


def reference_attention(q, k, v, scale, query_pos=None, key_pos=None):
    """The materialised softmax attention the fused one must equal (tests, benchmarks)."""
    group = q.shape[0] // k.shape[0]
    kk, vv = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = q @ kk.transpose(-1, -2) * scale
    if query_pos is not None:
        scores = scores.masked_fill(~(key_pos[None, :] <= query_pos[:, None]), -torch.inf)
    probs = torch.softmax(scores, dim=-1)
    return probs @ vv, probs.sum(dim=(0, 1)).double()
