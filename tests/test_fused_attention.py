"""Fused online-softmax attention and the runtime's top-k against their plain references."""
from __future__ import annotations

import pytest
import torch

from sparsetx.kernels.attention import fused_attention, reference_attention
from sparsetx.kernels.loader import library
from sparsetx.kernels.topk import topk_indices

# fp32 online softmax vs one softmax: differences are rounding only, |err| < 1e-5 for O(1) inputs
ATOL = 1e-5


@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("lq", [1, 7, 40])
def test_fused_equals_reference_with_pruned_cache_and_gqa(block, lq):
    g = torch.Generator().manual_seed(lq)
    hq, hkv, lk, d = 6, 2, 53, 16
    q, k, v = (torch.randn(h, n, d, generator=g) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    # a KV cache after cascade pruning: kept positions with gaps; queries are the newest positions
    key_pos = torch.sort(torch.randperm(80, generator=g)[:lk]).values
    query_pos = key_pos[-lq:]
    out, received = fused_attention(q, k, v, 0.25, query_pos, key_pos, importance=True, block=block)
    ref_out, ref_received = reference_attention(q, k, v, 0.25, query_pos, key_pos)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(received, ref_received, atol=ATOL, rtol=0)
    # every query row's probabilities sum to 1: the received mass is heads x queries
    assert received.sum().item() == pytest.approx(hq * lq, rel=1e-5)


def test_fused_without_mask_and_without_importance():
    q, k, v = torch.randn(4, 9, 8), torch.randn(4, 300, 8), torch.randn(4, 300, 8)
    out, received = fused_attention(q, k, v, 8 ** -0.5)
    assert received is None
    torch.testing.assert_close(out, reference_attention(q, k, v, 8 ** -0.5)[0], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="query heads do not divide"):
        fused_attention(torch.randn(3, 2, 8), k, v, 1.0)
    with pytest.raises(ValueError, match="both query_pos and key_pos"):
        fused_attention(q, k, v, 1.0, query_pos=torch.arange(9))


def stable_topk(scores, k):
    return torch.sort(-scores.double(), stable=True).indices[:k].sort().values


@pytest.mark.parametrize("backend", ["select", "torch"])
@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (257, 128), (1000, 999), (4096, 100)])
def test_topk_matches_a_stable_sort_including_ties(backend, n, k):
    if backend == "select" and library() is None:
        pytest.skip("C kernel could not be built here (no gcc?)")
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randint(0, max(2, n // 4), (n,), generator=g).double()  # many ties
    got = topk_indices(scores, k, backend)
    assert torch.equal(got, stable_topk(scores, k))
    cont = torch.randn(n, generator=g, dtype=torch.float64)
    assert torch.equal(topk_indices(cont, k, backend), stable_topk(cont, k))


def test_topk_errors():
    with pytest.raises(ValueError, match="cannot keep 0 of 5"):
        topk_indices(torch.ones(5), 0)
    with pytest.raises(ValueError, match="NaN"):
        topk_indices(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="1-D"):
        topk_indices(torch.ones(2, 2), 1)
