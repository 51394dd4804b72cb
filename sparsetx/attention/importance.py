"""SpAtten's pure tensor functions: cumulative importance, keep schedules, top-k selection,
local value pruning and the MSB/LSB split of progressive quantization."""
from __future__ import annotations

import math

import torch

from ..kernels.topk import topk_indices


def token_importance(probs: torch.Tensor) -> torch.Tensor:
    """Attention probability each key token receives, summed over heads and queries.

    probs: (heads, queries, keys) -> (keys,). SpAtten's cascade adds this to the scores of earlier
    layers (and earlier generation steps): ``s[j] += sum_h sum_i P[h, i, j]``.
    """
    return probs.sum(dim=(0, 1))


def head_importance(context: torch.Tensor) -> torch.Tensor:
    """Magnitude of each head's attention output: (heads, queries, head_dim) -> (heads,)."""
    return context.abs().sum(dim=(1, 2))


def keep_count(length: int, ratio: float, minimum: int = 1) -> int:
    """floor(L * ratio), at least ``minimum`` (never more than L)."""
    return min(length, max(minimum, math.floor(length * ratio + 1e-9)))


def check_ratios(name: str, value: float | list[float] | None) -> None:
    """Every keep ratio (one, or one per layer) must lie in (0, 1]; None means 'off'."""
    if value is None:
        return
    for r in value if isinstance(value, (list, tuple)) else [value]:
        if not 0.0 < float(r) <= 1.0:
            raise ValueError(f"{name} ratio {r} is outside (0, 1]")


def keep_schedule(ratio: float | list[float], layers: int, start: int) -> list[float]:
    """Fraction of the original tokens (or heads) entering each layer.

    A list is taken as is (one ratio per layer). A single ratio r is the fraction kept at the last
    layer: layers before ``start`` keep everything, then the ratio falls linearly to r.
    """
    if isinstance(ratio, (list, tuple)):
        if len(ratio) != layers:
            raise ValueError(f"keep schedule has {len(ratio)} ratios for a model with {layers} layers")
        out = [float(r) for r in ratio]
    else:
        r = float(ratio)
        ramp = max(layers - start, 1)
        out = [1.0 if i < start else 1.0 - (1.0 - r) * (i - start + 1) / ramp for i in range(layers)]
    for i, r in enumerate(out):
        if not 0.0 < r <= 1.0:
            raise ValueError(f"keep ratio {r} at layer {i} is outside (0, 1]")
    return out


def select_kept(scores: torch.Tensor, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (ascending, i.e. original order) of the k highest ``scores``; protected ones always kept.

    scores: (n,); protected: bool (n,). Ties go to the earlier position (a stable choice).
    """
    n = scores.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"cannot keep {k} of {n}")
    key = scores.double().clone()
    if protected is not None:
        if int(protected.sum()) > k:
            raise ValueError(f"{int(protected.sum())} protected tokens do not fit in a budget of {k}")
        key[protected] = math.inf
    return topk_indices(key, k)  # quick-select (SpAtten's top-k engine), same as a stable sort


def local_value_mask(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Local value pruning: per head and query row, True for the keys whose probability is in the
    row's top-k (only their V rows enter P V). probs: (..., keys)."""
    k = min(k, probs.shape[-1])
    top = probs.topk(k, dim=-1).indices
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)


# --- progressive quantization -------------------------------------------------------------------

def quantize(x: torch.Tensor, bits: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric linear quantization to signed ``bits``-bit integers, one scale per row along ``dim``."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-12) / qmax
    return torch.round(x / scale).clamp(-qmax - 1, qmax).to(torch.int32), scale


def split_msb_lsb(q: torch.Tensor, total_bits: int, lsb_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split signed integers into an MSB plane (signed, total - lsb bits) and an LSB plane (unsigned).

    q = msb * 2**lsb_bits + lsb exactly, with 0 <= lsb < 2**lsb_bits (floor division).
    """
    if not 0 < lsb_bits < total_bits:
        raise ValueError(f"LSB bits {lsb_bits} must be in (0, {total_bits})")
    msb = torch.div(q, 2 ** lsb_bits, rounding_mode="floor")
    return msb, q - msb * 2 ** lsb_bits


def msb_value(msb: torch.Tensor, lsb_bits: int) -> torch.Tensor:
    """The integer that the MSB plane alone stands for: the centre of its LSB range."""
    return msb * 2 ** lsb_bits + 2 ** (lsb_bits - 1)


def join_msb_lsb(msb: torch.Tensor, lsb: torch.Tensor, lsb_bits: int) -> torch.Tensor:
    return msb * 2 ** lsb_bits + lsb
