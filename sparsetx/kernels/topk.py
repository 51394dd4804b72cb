"""Top-k for the SpAtten runtime: which k of n importance scores to keep (n = the tokens or heads
alive, a few to a few thousand). Two routes, the same answer (the k largest, ties to the earlier
index, returned in ascending index order, as :func:`sparsetx.attention.importance.select_kept`):

* ``"select"``: the C quick-select of nm_cpu.c, SpAtten's top-k engine in software (one pass of
  partitioning per round on a shrinking candidate set, no full sort);
* ``"torch"``: ``torch.topk`` for the k-th largest score, then everything above it plus the earliest
  ties (``torch.topk`` itself promises no order among ties).

``benchmarks/topk.py`` measured both against a stable sort (n = 16 ... 16384, k = n / 2, one
thread): the quick-select was 3.5-6.6x faster than the torch route at every size and 1.7-5.7x faster
than the stable sort from n = 64 (level at 16). A bare ``torch.topk`` (no tie order, not ascending,
so not a drop-in) is faster below n = 1024 only by the 5-7 us of Python and ctypes around the C
call; from n = 4096 the quick-select beats it too. ``"auto"`` uses the quick-select wherever the
kernel built.
"""
from __future__ import annotations

import torch

from .loader import backend_library, ptr


def topk_indices(scores: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """Ascending int64 indices of the k largest ``scores`` (1-D); ties go to the earlier index."""
    if scores.dim() != 1:
        raise ValueError(f"top-k takes a 1-D score vector, got shape {tuple(scores.shape)}")
    n = scores.numel()
    if not 0 < k <= n:
        raise ValueError(f"cannot keep {k} of {n}")
    lib = backend_library(backend, "select")
    if lib is not None:
        s = scores.detach().to(torch.float64).contiguous()
        work = torch.empty(2 * n, dtype=torch.float64)
        out = torch.empty(k, dtype=torch.int64)
        if lib.topk_select(ptr(s), n, k, ptr(work), ptr(out)):
            raise ValueError("top-k scores contain NaN")
        return out
    if torch.isnan(scores).any():
        raise ValueError("top-k scores contain NaN")
    # torch.topk does not promise an order among ties: rank by (score, -index) exactly instead
    s = scores.detach().to(torch.float64)
    thr = s.topk(k).values[-1]
    above = (s > thr).nonzero().squeeze(1)
    ties = (s == thr).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values
