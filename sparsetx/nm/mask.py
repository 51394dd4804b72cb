"""N:M masks as pure tensor functions (STA: keep the N largest scores in each group of M)."""
from __future__ import annotations

import torch

from .pattern import NMPattern


def check_groupable(shape: tuple[int, ...], pattern: NMPattern, name: str = "weight") -> None:
    """Raise if a (out, in) weight cannot be cut into groups of M along ``in``."""
    if len(shape) != 2:
        raise ValueError(f"{name}: N:M needs a 2-D (out, in) weight, got shape {tuple(shape)}")
    if shape[1] % pattern.m:
        raise ValueError(
            f"{name}: input size {shape[1]} is not divisible by M={pattern.m} (pattern {pattern}); "
            f"choose an M that divides {shape[1]}"
        )


def nm_mask(scores: torch.Tensor, pattern: NMPattern, within: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask keeping the N highest ``scores`` in each group of M along the last dim.

    scores: (out, in), non-negative (|W| or |W| * ||X||).
    within: optional previous mask (IDP inheritance): its survivors always outrank the others,
      so the new mask is a subset of it wherever it has at least N survivors in a group.
    Exactly N positions per group are marked.
    """
    pattern = NMPattern.parse(pattern)
    check_groupable(tuple(scores.shape), pattern)
    scores = scores.detach().float()
    if within is not None:
        # Map non-survivors into (-1, 0): below every survivor, still ordered by score.
        scores = torch.where(within, scores, -1.0 / (1.0 + scores))
    out, inp = scores.shape
    groups = scores.reshape(out, inp // pattern.m, pattern.m)
    keep = groups.topk(pattern.n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out, inp)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the magnitude criterion."""
    return weight.detach().abs().float()


def activation_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Wanda): input_norm has one entry per input feature."""
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input norm of shape {tuple(input_norm.shape)} does not match weight {tuple(weight.shape)}")
    return weight.detach().abs().float() * input_norm.float().unsqueeze(0)


def is_nm(weight_or_mask: torch.Tensor, pattern: NMPattern) -> bool:
    """True if every group of M along the last dim holds at most N non-zeros."""
    return bool(group_nonzeros(weight_or_mask, pattern).max() <= pattern.n)


def group_nonzeros(weight_or_mask: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Non-zero count of each group: (out, in // M)."""
    check_groupable(tuple(weight_or_mask.shape), pattern)
    out, inp = weight_or_mask.shape
    return (weight_or_mask != 0).reshape(out, inp // pattern.m, pattern.m).sum(-1)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W with pruned positions set to +0.0 (never -0.0, so packing round-trips bit-exactly)."""
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype))
