"""``nm_linear(x, weight)``: x W^T (+ bias) straight from a packed N:M weight, and ``SparseLinear``,
the drop-in module that holds one. The C kernel runs where it builds; PyTorch otherwise."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..formats.packed import PackedNM
from ..nm.pattern import NMPattern
from .loader import backend_library, library, ptr

ROW_GROUP = 3  # rows interleaved in the many-token layout (ROWG in nm_cpu.c): 3 x 4 vectors = 12 FMA chains
# Offsets are stored as uint16 (block-relative column x the 32-token tile stride): a K block holds
# at most 2**16 / 32 = 2048 columns, including the doubled block of sparse patterns.
MAX_K_BLOCK = 2 ** 16 // 32
# The PyTorch fallback gathers at most this many inputs at once (16 MiB), or one output row's
# worth when that is more (never more than the input itself).
FALLBACK_ELEMENTS = 1 << 22


def _k_block_setting() -> int:
    """Columns per K block (a 32-token x tile of 16 KiB at 128); SPARSETX_K_BLOCK overrides it."""
    text = os.environ.get("SPARSETX_K_BLOCK", "128")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_K_BLOCK:
        raise ValueError(f"SPARSETX_K_BLOCK={text!r}: expected an integer in [1, {MAX_K_BLOCK}] "
                         "(16-bit offsets address at most that many columns of a K block)")
    return value


K_BLOCK = _k_block_setting()


@dataclass
class KernelWeight:
    """A packed N:M weight ready for the kernels. ``values`` and ``indices`` ((out, kn) each,
    kn = in / M * N; fp32 values and absolute int32 input indices, ascending per row) are the
    canonical form the PyTorch fallback uses; the C kernels read two layouts made from it once, on
    first use, in the order they read them (see nm_cpu.c): groups of 3 rows by K blocks for many
    tokens, octets of rows in SIMD lanes for one token."""

    values: torch.Tensor
    indices: torch.Tensor
    in_features: int
    pattern: NMPattern | None  # None: dense (N = M)
    half: bool = False         # the values are exact in fp16: the one-token kernel may read them as fp16

    @classmethod
    def from_packed(cls, packed: PackedNM) -> KernelWeight:
        out, inp = packed.shape
        m = packed.pattern.m
        base = (torch.arange(inp // m) * m).view(1, -1, 1)
        absolute = (packed.positions() + base).reshape(out, -1).to(torch.int32).contiguous()
        return cls(packed.values.float().contiguous(), absolute, inp, packed.pattern,
                   half=packed.values.dtype == torch.float16)

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> KernelWeight:
        """A dense (out, in) weight as N = M: every input index present (STA's dense x dense mode)."""
        out, inp = weight.shape
        idx = torch.arange(inp, dtype=torch.int32).expand(out, inp).contiguous()
        return cls(weight.detach().float().contiguous(), idx, inp, None)

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def nm(self) -> tuple[int, int]:
        """(N, M) as the kernels see it; dense weights run as 8:8 (1:1 when in % 8 != 0)."""
        if self.pattern is not None:
            return self.pattern.n, self.pattern.m
        return (8, 8) if self.in_features % 8 == 0 else (1, 1)

    def dense(self) -> torch.Tensor:
        w = torch.zeros(self.out_features, self.in_features)
        return w.scatter_(1, self.indices.long(), self.values)

    @property
    def k_block(self) -> int:
        """Columns per K block of the many-token kernel, a multiple of M: K_BLOCK, or twice that for
        patterns sparser than 1:4 (fewer kept weights a column; measured best on this CPU)."""
        n, m = self.nm
        target = min(K_BLOCK if 4 * n >= m else 2 * K_BLOCK, MAX_K_BLOCK)
        return max(1, target // m) * m

    @cached_property
    def group_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, uint16 block-relative column x 32), group p / kept slot j / row r at p*3*kn + 3*j + r.
        The x 32 is the kernel's tile stride (32 tokens per column), so a code is a ready offset."""
        kb = self.k_block
        vals, cols = _pad_rows(self.values, ROW_GROUP), _pad_rows(self.indices, ROW_GROUP)
        p, kn = vals.shape[0] // ROW_GROUP, vals.shape[1]
        order = (p, ROW_GROUP, kn)
        v = vals.view(order).permute(0, 2, 1).contiguous()
        c = ((cols.view(order).permute(0, 2, 1) % kb) * 32).to(torch.int32).contiguous().numpy().astype(np.uint16)
        # < 2**16 since kb <= MAX_K_BLOCK; 4 codes of padding: the kernel reads a group's 3 codes as one 64-bit word
        return v, torch.from_numpy(np.concatenate([c.reshape(-1), np.zeros(4, np.uint16)]))

    @cached_property
    def group_args(self) -> tuple:
        """(values, offsets, out, kn, N, M, K block) for the many-token kernel, pointers made once."""
        vals, offs = self.group_layout
        n, m = self.nm
        return ptr(vals), ptr(offs), self.out_features, vals.shape[1], n, m, self.k_block

    @cached_property
    def lane_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, uint8 in-group positions), octet q / group g / slot s / lane at ((q*G+g)*N+s)*8+lane."""
        n, m = self.nm
        vals, cols = _pad_rows(self.values, 8), _pad_rows(self.indices, 8)
        q, g = vals.shape[0] // 8, self.in_features // m
        group_start = torch.arange(g, dtype=torch.int32).repeat_interleave(n) * m
        pos = (cols - group_start).to(torch.uint8)
        v = vals.view(q, 8, g, n).permute(0, 2, 3, 1).contiguous()
        return v, pos.view(q, 8, g, n).permute(0, 2, 3, 1).contiguous()

    @cached_property
    def lane_values(self) -> torch.Tensor:
        """The lane layout's values as the one-token kernel reads them: fp16 (exact when ``half``,
        half the bytes of that memory-bound pass) where F16C built, else fp32."""
        vals = self.lane_layout[0]
        lib = library()
        return vals.half() if self.half and lib is not None and lib.has_f16c() else vals

    @cached_property
    def lane_args(self) -> tuple:
        """(values pointer, positions pointer, padded rows, fp16 flag) for the one-token kernel."""
        vals = self.lane_values
        return ptr(vals), ptr(self.lane_layout[1]), vals.shape[0] * 8, int(vals.dtype == torch.float16)


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[0] % multiple
    return t if extra == 0 else torch.cat([t, torch.zeros(extra, t.shape[1], dtype=t.dtype)])


def nm_linear(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None = None,
              threads: int | None = None, backend: str = "auto") -> torch.Tensor:
    """x: (..., in) fp32 -> (..., out). backend: "auto" (C kernel if it built), "c", "torch"."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {weight.in_features}")
    lib = backend_library(backend, "c")
    lead = x.shape[:-1]
    k, o = weight.in_features, weight.out_features
    x2 = x.reshape(-1, k).float()
    if lib is None or x.requires_grad or x2.shape[0] == 0:
        y = _gather_linear(x2, weight)
        return (y + bias if bias is not None else y).reshape(*lead, o)
    threads = threads or torch.get_num_threads()
    t = x2.shape[0]
    n, m = weight.nm
    b = bias if bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()) else bias.float().contiguous()
    if t == 1:  # decoding: per-call Python work kept small, it is the same order as the kernel here
        vals, pos, o8, half = weight.lane_args
        y = torch.empty(o8)
        xc = x2.contiguous()  # held in a name: a temporary's memory could be freed before the C call reads it
        lib.nm_linear_vector(ptr(xc), vals, pos, o, o8, k, n, m, ptr(b), ptr(y), half, threads)
        return (y if o8 == o else y[:o]).view(*lead, o)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(t, o)
    lib.nm_linear_tokens(ptr(x2), x2.stride(0), t, k, *weight.group_args, ptr(b), ptr(y), threads)
    return y.view(*lead, o)


def _gather_linear(x2: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """The PyTorch path: gather each row's kept inputs and reduce (the kernels' arithmetic, no
    dense weight), a block of output rows at a time so the gathered inputs stay within
    FALLBACK_ELEMENTS rather than tokens x out x kept."""
    t, kn = x2.shape[0], weight.indices.shape[1]
    rows = max(1, FALLBACK_ELEMENTS // max(t * kn, 1))
    parts = [torch.einsum("tok,ok->to", x2[:, weight.indices[r:r + rows].long()], weight.values[r:r + rows])
             for r in range(0, weight.out_features, rows)]
    return torch.cat(parts, dim=1) if parts else x2.new_zeros(t, 0)


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


def to_sparse_linear(model: nn.Module, patterns: dict[str, NMPattern]) -> nn.Module:
    """Swap each named N:M-masked nn.Linear of ``model`` for a :class:`SparseLinear` (in place)."""
    for name, pattern in patterns.items():
        model.set_submodule(name, SparseLinear.from_linear(model.get_submodule(name), pattern))
    return model


def linear_rows(lin: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The output features ``rows`` of ``lin(x)`` (pruned heads' Q/K/V). An nn.Linear computes only
    those rows; a SparseLinear computes all and keeps those (its packed rows stay packed)."""
    if isinstance(lin, nn.Linear):
        return F.linear(x, lin.weight[rows], None if lin.bias is None else lin.bias[rows])
    return lin(x)[..., rows]


def linear_cols(lin: nn.Module, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``lin`` applied to an input that is zero outside the input features ``cols`` (the output
    projection after head pruning); x holds only those features."""
    if isinstance(lin, nn.Linear):
        return F.linear(x, lin.weight[:, cols], lin.bias)
    full = x.new_zeros(*x.shape[:-1], lin.in_features)
    full[..., cols] = x
    return lin(full)
