"""``nm_linear(x, weight)``: x W^T (+ bias) straight from a packed N:M weight, and ``SparseLinear``,
the drop-in module that holds one. The C kernel runs where it builds; PyTorch otherwise."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from ..formats.packed import PackedNM
from ..nm.pattern import NMPattern
from .loader import library


@dataclass
class KernelWeight:
    """A packed N:M weight in the kernel's layout: fp32 values and absolute int32 input indices,
    (out, kn) each, kn = in / M * N, row-major in the order the kernel reads them."""

    values: torch.Tensor
    indices: torch.Tensor
    in_features: int
    pattern: NMPattern | None  # None: dense (N = M)

    @classmethod
    def from_packed(cls, packed: PackedNM) -> KernelWeight:
        out, inp = packed.shape
        m = packed.pattern.m
        base = (torch.arange(inp // m) * m).view(1, -1, 1)
        absolute = (packed.positions() + base).reshape(out, -1).to(torch.int32).contiguous()
        return cls(packed.values.float().contiguous(), absolute, inp, packed.pattern)

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> KernelWeight:
        """A dense (out, in) weight as N = M: every input index present (STA's dense x dense mode)."""
        out, inp = weight.shape
        idx = torch.arange(inp, dtype=torch.int32).expand(out, inp).contiguous()
        return cls(weight.detach().float().contiguous(), idx, inp, None)

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    def dense(self) -> torch.Tensor:
        w = torch.zeros(self.out_features, self.in_features)
        return w.scatter_(1, self.indices.long(), self.values)


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def nm_linear(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None = None,
              threads: int | None = None, backend: str = "auto") -> torch.Tensor:
    """x: (..., in) fp32 -> (..., out). backend: "auto" (C kernel if it built), "c", "torch"."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {weight.in_features}")
    lib = library() if backend in ("auto", "c") else None
    if backend == "c" and lib is None:
        raise RuntimeError("the C kernel is not available on this machine (no gcc, or the build failed)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features).float()
    if lib is None or x.requires_grad:
        # Fallback: gather each row's kept inputs and reduce (same arithmetic, no dense weight).
        y = torch.einsum("tok,ok->to", x2[:, weight.indices.long()], weight.values)
        return (y + bias if bias is not None else y).reshape(*lead, -1)
    threads = threads or torch.get_num_threads()
    t, o, kn = x2.shape[0], weight.out_features, weight.values.shape[1]
    b = None if bias is None else bias.detach().float().contiguous()
    if t == 1:
        xv = x2.reshape(-1).contiguous()
        y = torch.empty(o)
        lib.nm_linear_vector(_ptr(xv), _ptr(weight.values), _ptr(weight.indices), o, kn, _ptr(b), _ptr(y), threads)
        return y.reshape(*lead, o)
    xT = x2.t().contiguous()
    yT = torch.empty(o, t)
    lib.nm_linear_tokens(_ptr(xT), t, _ptr(weight.values), _ptr(weight.indices), o, kn, _ptr(b), _ptr(yT), threads)
    return yT.t().reshape(*lead, o)


class SparseLinear(nn.Module):
    """Drop-in nn.Linear replacement holding a packed N:M weight (inference)."""

    def __init__(self, weight: KernelWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight_nm = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("nm_values", weight.values, persistent=False)
        self.register_buffer("nm_indices", weight.indices, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_packed(cls, packed: PackedNM, bias: torch.Tensor | None = None) -> SparseLinear:
        return cls(KernelWeight.from_packed(packed), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: NMPattern | str) -> SparseLinear:
        from ..formats.packed import pack_nm

        return cls.from_packed(pack_nm(linear.weight.detach(), NMPattern.parse(pattern), torch.float32), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nm_linear(x, self.weight_nm, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, pattern={self.weight_nm.pattern}"
