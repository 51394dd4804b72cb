"""SR-STE: the gradient against a hand-computed case; mask refresh and IDP inheritance."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetx.nm.pattern import NMPattern
from sparsetx.nm.srste import SRSTELinear, SparseRefinedSTE, attach_srste, detach_srste, refresh_masks


def test_srste_gradient_hand_computed():
    # W = [1, -2, 3, 0.5], 2:4 keeps |3| and |-2|: E = [0, 1, 1, 0]; y = (W*E) . x with x = 1
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5]], requires_grad=True)
    mask = torch.tensor([[False, True, True, False]])
    y = (SparseRefinedSTE.apply(w, mask, 0.1) @ torch.ones(4, 1)).sum()
    assert y.item() == 1.0
    y.backward()
    # dL/d(W*E) = x = 1 everywhere, passed straight through; + lambda_w * (1 - E) * W on pruned ones
    want = torch.tensor([[1.0 + 0.1 * 1.0, 1.0, 1.0, 1.0 + 0.1 * 0.5]])
    torch.testing.assert_close(w.grad, want, atol=0, rtol=1e-7)  # fp32 rounding of 0.1 only


def test_plain_ste_when_lambda_zero():
    w = torch.randn(3, 8, requires_grad=True)
    mask = torch.rand(3, 8) > 0.5
    (SparseRefinedSTE.apply(w, mask, 0.0) * 2).sum().backward()
    assert torch.equal(w.grad, torch.full((3, 8), 2.0))


def test_srste_linear_matches_masked_dense_and_refreshes():
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    layer = SRSTELinear(lin, NMPattern(2, 4), lambda_w=2e-4)
    assert layer.weight is lin.weight  # parameters are shared, optimizers stay valid
    x = torch.randn(5, 16)
    want = torch.nn.functional.linear(x, layer.masked_weight(), lin.bias)
    assert torch.allclose(layer(x), want, atol=0, rtol=0)
    with torch.no_grad():  # make a pruned weight the largest of its group: the mask must follow
        j = int((~layer.mask[0, :4]).nonzero()[0])
        layer.weight[0, j] = 100.0
    assert layer.refresh_mask() == 2  # one position in, one out
    assert bool(layer.mask[0, j])


def test_inherit_nests_and_unnested_does_not_have_to():
    torch.manual_seed(0)
    layer = SRSTELinear(nn.Linear(64, 8), NMPattern(4, 8))
    parent = layer.mask.clone()
    assert layer.inherit(NMPattern(2, 8), nested=True) == 1.0
    assert (layer.mask <= parent).all()
    with torch.no_grad():
        layer.weight.mul_(torch.where(layer.parent, 0.01, 100.0))  # make the outsiders much larger
    layer.refresh_mask()
    assert (layer.mask <= parent).all()  # still inside: the parent constrains the dynamic mask
    free = SRSTELinear(nn.Linear(64, 8), NMPattern(4, 8))
    with torch.no_grad():
        free.weight.copy_(layer.weight)
        free.mask.copy_(parent)
    free.inherit(NMPattern(2, 8), nested=False)
    assert not (free.mask <= parent).all()


def test_attach_and_detach_on_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    layers = attach_srste(model, {"0": NMPattern(1, 4), "2": NMPattern(2, 4)})
    assert isinstance(model[0], SRSTELinear) and set(layers) == {"0", "2"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        refresh_masks(model)
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    refresh_masks(model)
    x = torch.randn(3, 8)
    before = model(x)
    masks = detach_srste(model)
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], SRSTELinear)
    assert torch.equal(model(x), before)
    assert ((model[0].weight != 0) <= masks["0"]).all()
    with pytest.raises(ValueError, match="not nn.Linear"):
        attach_srste(model, {"1": NMPattern(2, 4)})
