"""N:M masks: exact properties for random shapes and patterns, and errors at the door."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetx.nm.mask import activation_scores, apply_mask, group_nonzeros, is_nm, nm_mask
from sparsetx.nm.pattern import NMPattern, parse_series


@st.composite
def weights_and_patterns(draw):
    m = draw(st.integers(2, 32))
    n = draw(st.integers(1, m - 1))
    out = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    w = torch.randn(out, groups * m, generator=torch.Generator().manual_seed(seed))
    return w, NMPattern(n, m)


@settings(max_examples=150, deadline=None)
@given(weights_and_patterns())
def test_mask_keeps_exactly_n_largest_per_group(case):
    w, p = case
    mask = nm_mask(w.abs(), p)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    groups = mask.reshape(w.shape[0], -1, p.m)
    assert (groups.sum(-1) == p.n).all()
    scores = w.abs().reshape(w.shape[0], -1, p.m)
    kept_min = torch.where(groups, scores, torch.inf).amin(-1)
    dropped_max = torch.where(groups, -torch.inf, scores).amax(-1)
    assert (kept_min >= dropped_max).all()  # the N largest, nothing smaller kept over a larger
    pruned = apply_mask(w, mask)
    assert is_nm(pruned, p)
    assert (group_nonzeros(pruned, p) <= p.n).all()
    assert not torch.signbit(pruned[~mask]).any()  # pruned entries are +0.0


@settings(max_examples=100, deadline=None)
@given(weights_and_patterns(), st.data())
def test_nested_mask_is_subset_of_parent(case, data):
    w, parent_p = case
    child_n = data.draw(st.integers(1, parent_p.n))
    parent = nm_mask(w.abs(), parent_p)
    # perturb the weights: the child is chosen on new scores but must stay inside the parent
    w2 = w + 0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    child = nm_mask(w2.abs(), NMPattern(child_n, parent_p.m), within=parent)
    assert (child <= parent).all()
    assert (child.reshape(w.shape[0], -1, parent_p.m).sum(-1) == child_n).all()


def test_nesting_across_m():
    """A 2:4 mask is a 4:8 mask; 1:8 chosen inside a 2:4 mask stays inside it."""
    w = torch.randn(16, 64)
    m24 = nm_mask(w.abs(), NMPattern(2, 4))
    assert is_nm(m24, NMPattern(4, 8))
    m18 = nm_mask(torch.randn(16, 64).abs(), NMPattern(1, 8), within=m24)
    assert (m18 <= m24).all()


def test_activation_scores_change_the_choice():
    w = torch.tensor([[1.0, 0.9, 0.1, 0.2]])
    norms = torch.tensor([0.1, 1.0, 1.0, 10.0])
    assert nm_mask(w.abs(), NMPattern(2, 4)).tolist() == [[True, True, False, False]]
    assert nm_mask(activation_scores(w, norms), NMPattern(2, 4)).tolist() == [[False, True, False, True]]
    with pytest.raises(ValueError, match="does not match"):
        activation_scores(w, torch.ones(3))


@pytest.mark.parametrize("text, message", [
    ("3:2", "N must be smaller than M"), ("4:4", "N must be smaller than M"), ("0:4", "N must be >= 1"),
    ("2:64", "M must be in"), ("2-4", "cannot parse"), ("two:four", "cannot parse"), ("", "cannot parse"),
])
def test_bad_patterns(text, message):
    with pytest.raises(ValueError, match=message):
        NMPattern.parse(text)


def test_pattern_parse_and_series():
    assert NMPattern.parse(" 2 : 8 ") == NMPattern(2, 8)
    assert str(NMPattern(1, 16)) == "1:16"
    assert parse_series("4:8,2:8,1:8") == [NMPattern(4, 8), NMPattern(2, 8), NMPattern(1, 8)]
    with pytest.raises(ValueError, match="denser"):
        parse_series("2:8,4:8")


def test_input_not_divisible_by_m():
    with pytest.raises(ValueError, match="input size 10 is not divisible by M=4"):
        nm_mask(torch.rand(3, 10), NMPattern(2, 4))
