"""A dense Linear with int8 weights: the LM head of a decoder, read once per generated token.

SmolLM2's tied head (49,152 x 576) is a fifth of the model and dense: in fp32 it is 113 MB read per
token, more than the N:M block layers with int8 values together. ``Int8Linear`` keeps the weight as
int8 with a symmetric fp32 scale per row (the packed format's int8 values: ``s = max |w| / 127``,
round to nearest, clamped to [-127, 127]; formats/packed.py ``quantize_rows``), 28 MB, and computes
up to ``C_MAX_TOKENS`` token rows in C (nm_cpu.c ``int8_linear``: each row widened to fp32 in
registers); more rows (a prompt whose every logit is asked for) take the dequantised weight through
``F.linear``. A tied embedding stays fp32: only the head's product changes.

    model.lm_head = Int8Linear.from_linear(model.lm_head)      # or load_model(..., int8_head=True)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.packed import quantize_rows
from .loader import library, ptr

C_MAX_TOKENS = 8


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"Int8Linear takes a 2-D float weight; got {tuple(weight.shape)} {weight.dtype}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("Int8Linear: the weight holds NaN or infinite values")
        q, scales = quantize_rows(weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def dense(self) -> torch.Tensor:
        """The dequantised weight (fp32)."""
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expects {self.in_features} input features; got {x.shape[-1]}")
        x2 = x.reshape(-1, self.in_features)
        lib = library()
        if lib is None or x2.shape[0] > C_MAX_TOKENS or x.dtype != torch.float32 or x.requires_grad:
            return F.linear(x, self.dense().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        x2 = x2.contiguous()
        y = torch.empty(x2.shape[0], self.out_features)
        lib.int8_linear(ptr(x2), x2.shape[0], ptr(self.qweight), ptr(self.scales), ptr(self.bias), ptr(y),
                        self.out_features, self.in_features, torch.get_num_threads())
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"
