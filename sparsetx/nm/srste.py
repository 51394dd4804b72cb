"""Dynamic N:M pruning with the sparse-refined straight-through estimator (SR-STE).

Dense shadow weights W are kept; the forward uses W * E with the mask E recomputed from |W|
(every step or every k steps); the backward passes the gradient straight through to W and adds
the sparse-refined decay lambda_w * (1 - E) * W on the pruned positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mask import apply_mask, magnitude_scores, nm_mask
from .pattern import NMPattern


class SparseRefinedSTE(torch.autograd.Function):
    """forward: W * E;  backward: g_W = dL/d(W*E) + lambda_w * (1 - E) * W."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, lambda_w: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.lambda_w = lambda_w
        return apply_mask(weight, mask)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        return grad + ctx.lambda_w * (~mask).to(weight.dtype) * weight, None, None


class SRSTELinear(nn.Module):
    """A Linear with a dynamic N:M mask; shares the original layer's weight and bias Parameters.

    ``parent`` is the inherited mask (IDP): the dynamic mask is always chosen inside it where it
    can be. All-True means no constraint.
    """

    def __init__(self, linear: nn.Linear, pattern: NMPattern, lambda_w: float = 2e-4) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.pattern = NMPattern.parse(pattern)
        self.lambda_w = float(lambda_w)
        self.register_buffer("parent", torch.ones_like(self.weight, dtype=torch.bool))
        self.register_buffer("mask", nm_mask(magnitude_scores(self.weight), self.pattern))

    @torch.no_grad()
    def refresh_mask(self) -> int:
        """Recompute E from the current |W| (inside ``parent``); returns how many positions flipped."""
        new = nm_mask(magnitude_scores(self.weight), self.pattern, within=self.parent)
        flips = int((new != self.mask).sum())
        self.mask.copy_(new)
        return flips

    @torch.no_grad()
    def inherit(self, pattern: NMPattern, nested: bool = True) -> float:
        """Move to a sparser pattern (IDP): the current mask becomes the parent of the next.

        Returns the fraction of the new mask that lies inside the old one (1.0: fully nested).
        """
        old = self.mask.clone()
        self.parent.copy_(old if nested else torch.ones_like(old))
        self.pattern = NMPattern.parse(pattern)
        self.refresh_mask()
        return float((self.mask & old).sum() / self.mask.sum())

    def masked_weight(self) -> torch.Tensor:
        return apply_mask(self.weight.detach(), self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, SparseRefinedSTE.apply(self.weight, self.mask, self.lambda_w), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, pattern={self.pattern}, lambda_w={self.lambda_w}"


def attach_srste(model: nn.Module, patterns: dict[str, NMPattern], lambda_w: float = 2e-4) -> dict[str, SRSTELinear]:
    """Swap each named Linear for an SRSTELinear sharing its Parameters (optimizers stay valid)."""
    layers = {}
    for name, pattern in patterns.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"layer {name} is {type(linear).__name__}, not nn.Linear")
        layers[name] = SRSTELinear(linear, pattern, lambda_w)
        model.set_submodule(name, layers[name])
    return layers


def srste_layers(model: nn.Module) -> dict[str, SRSTELinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SRSTELinear)}


def refresh_masks(model: nn.Module) -> int:
    """Recompute every dynamic mask; returns the total number of flipped positions."""
    return sum(layer.refresh_mask() for layer in srste_layers(model).values())


@torch.no_grad()
def detach_srste(model: nn.Module) -> dict[str, torch.Tensor]:
    """Replace each SRSTELinear by a plain nn.Linear holding W * E; returns the masks."""
    masks = {}
    for name, layer in srste_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.weight.dtype)
        linear.weight.copy_(layer.masked_weight())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        model.set_submodule(name, linear)
        masks[name] = layer.mask.clone()
    return masks
