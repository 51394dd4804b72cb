"""``nm_linear(x, weight)``: x W^T (+ bias) straight from a packed N:M weight, and ``SparseLinear``,
the drop-in module that holds one. The C kernel runs where it builds; PyTorch otherwise."""
from __future__ import annotations

import os
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..formats.packed import PackedNM
from ..nm.pattern import NMPattern
from .loader import backend_library, library, ptr

VTYPES = {torch.float32: 0, torch.float16: 1, torch.int8: 2}   # value type codes of nm_linear_tokens
ACTIVATIONS = {None: 0, "gelu": 1}   # output activation codes of nm_linear_pairs (GELU: the erf form)
PAIR_UNIT = 64   # a pair offset is its index in the block's list x 64 (nm_cpu.c scales it to bytes)
ROW_GROUP = 3  # rows interleaved in the many-token layout (ROWG in nm_cpu.c): 3 x 4 vectors = 12 FMA chains
# Offsets are stored as uint16 (block-relative column x the 32-token tile stride): a K block holds
# at most 2**16 / 32 = 2048 columns, including the doubled block of sparse patterns.
MAX_K_BLOCK = 2 ** 16 // 32
# The PyTorch fallback gathers at most this many inputs at once (16 MiB), or one output row's
# worth when that is more (never more than the input itself).
FALLBACK_ELEMENTS = 1 << 22


def check_activation_bits(bits: int) -> int:
    """``bits`` if it is an activation width the integer kernels take (8 or 16), else a ValueError."""
    if bits not in (8, 16):
        raise ValueError(f"activation_bits {bits!r}: expected 8 or 16")
    return bits


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


class KernelWeight:
    """A packed N:M weight ready for the kernels.

    ``values`` and ``indices`` ((out, kn) each, kn = in / M * N; values fp32, fp16, or int8 with
    per-row ``scales``, and absolute int32 input indices, ascending per row) are the canonical form
    the PyTorch fallback uses; the C
    kernels read two layouts made from it, in the order they read them (see nm_cpu.c): groups of 3
    rows by K blocks for many tokens, octets of rows in SIMD lanes for one token. :meth:`compact`
    makes the many-token layout the only stored form (values in the packed dtype where the kernel
    reads it: fp16 and int8 stay so) and drops the canonical tensors, which are then rebuilt from the
    layout on the rare paths that need them (gradients, no C kernel, :meth:`dense`)."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, in_features: int,
                 pattern: NMPattern | None, half: bool = False, scales: torch.Tensor | None = None) -> None:
        if (values.dtype == torch.int8) != (scales is not None):
            raise ValueError("int8 values need per-row scales (and only they take them)")
        self.in_features = in_features
        self.pattern = pattern   # None: dense (N = M)
        self.half = half         # the values are exact in fp16: the kernels may read them as fp16
        self.scales = None if scales is None else scales.float().contiguous()   # (out,): int8 values only
        self.out_features = values.shape[0]
        self._canonical: tuple[torch.Tensor, torch.Tensor] | None = (values, indices)

    @classmethod
    def from_packed(cls, packed: PackedNM, compact: bool = False) -> KernelWeight:
        """``compact``: keep only the many-token layout (see :meth:`compact`)."""
        out, inp = packed.shape
        m = packed.pattern.m
        base = (torch.arange(inp // m, dtype=torch.int32) * m).view(1, -1, 1)
        absolute = (packed.positions().to(torch.int32) + base).reshape(out, -1)
        half = packed.values.dtype == torch.float16
        keep = half or packed.scales is not None   # fp16 and int8 values stay in their dtype
        kw = cls(packed.values if keep else packed.values.float(), absolute, inp, packed.pattern, half=half,
                 scales=packed.scales)
        return kw.compact() if compact else kw

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> KernelWeight:
        """A dense (out, in) weight as N = M: every input index present (STA's dense x dense mode)."""
        out, inp = weight.shape
        idx = torch.arange(inp, dtype=torch.int32).expand(out, inp).contiguous()
        return cls(weight.detach().float().contiguous(), idx, inp, None)

    def compact(self, activation_bits: int = 16) -> KernelWeight:
        """Build the many-token layout now and keep it as the only stored form (when the C kernel
        is there to read it; otherwise the canonical form stays). int8 values: the select layout
        for ``activation_bits`` 8 where the CPU runs the select kernel, else the pair layout.
        Returns self."""
        if library() is not None and self._canonical is not None:
            if not self.uses_select(activation_bits) and self.pair_layout is None:   # int8: pairs; the rest: row groups
                self.group_layout  # noqa: B018 - built from the canonical form, then that is dropped
            self._canonical = None
        return self

    def uses_select(self, activation_bits: int) -> bool:
        """Whether the select kernel computes this weight at ``activation_bits``: 8 bits, int8 values
        whose groups fit its blocks, and a CPU it was built for (AVX2, or AVX-512 VBMI + VNNI)."""
        lib = library()
        return activation_bits == 8 and lib is not None and bool(lib.has_select()) and self.select_layout is not None

    def canonical(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values as stored, int32 absolute indices), each (out, kn): kept, or rebuilt from the
        layout (once a call: callers that need both take them from here)."""
        return self._canonical if self._canonical is not None else self._from_layout()

    @property
    def values(self) -> torch.Tensor:
        """(out, kn) values as stored (fp32, fp16 where ``half``, int8 with ``scales``)."""
        return self.canonical()[0]

    @property
    def indices(self) -> torch.Tensor:
        """(out, kn) int32 absolute input indices."""
        return self.canonical()[1]

    def float_values(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """(out, kn) fp32 values (int8 ones times their row's scale); ``values``: the stored
        values when the caller has them already."""
        v = (self.values if values is None else values).float()
        return v * self.scales.view(-1, 1) if self.scales is not None else v

    def _from_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of :attr:`select_layout`, :attr:`pair_layout` or :attr:`group_layout`,
        whichever was kept."""
        if self.__dict__.get("select_layout") is not None:
            return self._from_select()
        if self.__dict__.get("pair_layout") is not None:
            return self._from_pairs()
        vals, offs = self.group_layout
        p, kn = vals.shape[0], vals.shape[1]
        n, m = self.nm
        kb = self.k_block
        v = vals.permute(0, 2, 1).reshape(p * ROW_GROUP, kn)[:self.out_features]
        codes = torch.from_numpy(offs[:-4].numpy().astype(np.int32)).view(p, kn, ROW_GROUP)
        codes = codes.permute(0, 2, 1).reshape(p * ROW_GROUP, kn)[:self.out_features]
        block = torch.arange(kn, dtype=torch.int32) // (kb // m * n)
        return v, (block * kb + codes // 32).contiguous()

    def _from_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of :attr:`pair_layout`: int8 values and absolute indices, row by row."""
        w, off, cols, starts = (t.numpy() for t in self.pair_layout)
        o = -(-self.out_features // ROW_GROUP) * ROW_GROUP
        values, indices, at = [], [], 0
        for b, (c0, _, kept) in enumerate(self._blocks(self.pair_block)):
            npb = (kept + 1) // 2
            wb = w[at:at + o * npb].reshape(o // ROW_GROUP, npb, ROW_GROUP).transpose(0, 2, 1).reshape(o, npb)
            ob = off[at:at + o * npb].reshape(o // ROW_GROUP, npb, ROW_GROUP).transpose(0, 2, 1).reshape(o, npb)
            at += o * npb
            pairs = cols.reshape(-1, 2)[starts[b] + ob.astype(np.int64) // PAIR_UNIT]   # (o, npb, 2) columns
            vals = np.stack([(wb << 16) >> 16, wb >> 16], axis=2)                    # the two int16 halves
            values.append(vals.reshape(o, -1)[:, :kept])
            indices.append(pairs.reshape(o, -1)[:, :kept].astype(np.int32) + c0)
        v = torch.from_numpy(np.concatenate(values, axis=1).astype(np.int8))[:self.out_features]
        return v.contiguous(), torch.from_numpy(np.concatenate(indices, axis=1))[:self.out_features].contiguous()

    def _from_select(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of :attr:`select_layout`: int8 values and absolute indices, row by row."""
        idx, w, starts, _ = (t.numpy() for t in self.select_layout)
        g, width = self.select_geometry
        lanes = -(-self.out_features // g)
        def rows(a):   # (L, Q, G, 4) -> (rows, 4 Q)
            return a.reshape(lanes, -1, g, 4).transpose(0, 2, 1, 3).reshape(g * lanes, -1)
        w_rows, idx_rows = rows(w), rows(idx)
        values, indices = [], []
        for b, (c0, _, kept) in enumerate(self._blocks(width)):
            at = 4 * int(starts[b])
            values.append(w_rows[:, at:at + kept])
            indices.append(idx_rows[:, at:at + kept].astype(np.int32) + c0)
        v = torch.from_numpy(np.concatenate(values, axis=1))[:self.out_features]
        return v.contiguous(), torch.from_numpy(np.concatenate(indices, axis=1))[:self.out_features].contiguous()

    @property
    def nm(self) -> tuple[int, int]:
        """(N, M) as the kernels see it; dense weights run as 8:8 (1:1 when in % 8 != 0)."""
        if self.pattern is not None:
            return self.pattern.n, self.pattern.m
        return (8, 8) if self.in_features % 8 == 0 else (1, 1)

    @property
    def nbytes(self) -> int:
        """Bytes this weight holds now (canonical form and whichever layouts are built)."""
        held = list(self._canonical or ()) + ([] if self.scales is None else [self.scales])
        for name in ("group_layout", "pair_layout", "select_layout", "lane_layout", "group_scales", "select_scales",
                     "lane_scales", "mask_layout"):
            got = self.__dict__.get(name)
            held += [t for t in (got if isinstance(got, tuple) else (got,)) if t is not None]
        seen, total = set(), 0
        for t in held:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def dense(self) -> torch.Tensor:
        values, indices = self.canonical()
        w = torch.zeros(self.out_features, self.in_features)
        return w.scatter_(1, indices.long(), self.float_values(values))

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
        The x 32 is the kernel's tile stride (32 tokens per column), so a code is a ready offset.
        Values as packed for fp16 and int8 (the kernel converts them once a call), else fp32."""
        kb = self.k_block
        values, indices = self.canonical()
        keep = self.half or self.scales is not None
        vals = _pad_rows(values if keep else values.float(), ROW_GROUP)
        cols = _pad_rows(indices, ROW_GROUP)
        p, kn = vals.shape[0] // ROW_GROUP, vals.shape[1]
        order = (p, ROW_GROUP, kn)
        v = vals.view(order).permute(0, 2, 1).contiguous()
        c = ((cols.view(order).permute(0, 2, 1) % kb) * 32).to(torch.int32).contiguous().numpy().astype(np.uint16)
        # < 2**16 since kb <= MAX_K_BLOCK; 4 codes of padding: the kernel reads a group's 3 codes as one 64-bit word
        return v, torch.from_numpy(np.concatenate([c.reshape(-1), np.zeros(4, np.uint16)]))

    def _blocks(self, width: int) -> list[tuple[int, int, int]]:
        """K blocks of ``width`` columns (a multiple of M): (first column, first kept slot, kept
        inputs a row), for the pair layout (``pair_block``) and the select layout (64)."""
        n, m = self.nm
        return [(c0, c0 // m * n, min(width, self.in_features - c0) // m * n) for c0 in range(0, self.in_features, width)]

    @property
    def pair_block(self) -> int:
        """Columns per K block of the pair layout, a multiple of M: 64, so a block's distinct pairs
        (at most 28 a group of 8 for 2:8, 64 for two groups for 1:8) in a 32-token pair buffer (128
        bytes a pair) take about L1's size (32 and 48 measured slower: more partial-sum traffic)."""
        n, m = self.nm
        return max(1, 64 // m) * m

    @cached_property
    def pair_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(int32 weight pairs, uint16 pair offsets, uint16 pair columns, int32 block starts) of
        the integer many-token kernel (nm_cpu.c ``nm_linear_pairs``, where the layout is drawn), or
        None where it does not apply: values not int8, or a block with 1024 or more distinct pairs
        (offsets are 16-bit). Each K block's kept inputs of a row are paired in order; the block's
        distinct pairs are listed once (``np.unique``) and a row's pair is an index into that list."""
        if self.scales is None:
            return None
        kb = self.pair_block
        values, indices = self.canonical()
        vals = _pad_rows(values, ROW_GROUP).numpy()
        cols = _pad_rows(indices, ROW_GROUP).numpy().copy()
        cols[self.out_features:] = cols[0]   # padding rows (zero values) read row 0's pairs: no new ones
        o = vals.shape[0]
        blocks = self._blocks(self.pair_block)
        total = sum((kept + 1) // 2 for _, _, kept in blocks)
        # written block by block into the final arrays (a layer's transient memory stays one block's)
        w = np.empty(o * total, np.int32)
        off = np.zeros(o * total + 4, np.uint16)     # 4 of padding: the kernel reads 3 offsets as 64 bits
        table, starts, at = [], [0], 0
        for c0, j0, kept in blocks:
            v, c = vals[:, j0:j0 + kept].astype(np.int32), cols[:, j0:j0 + kept] - c0
            if kept % 2:   # an odd count: the last kept input pairs with itself at weight 0
                v = np.concatenate([v, np.zeros((o, 1), np.int32)], axis=1)
                c = np.concatenate([c, c[:, -1:]], axis=1)
            uniq, which = np.unique(c[:, 0::2] * kb + c[:, 1::2], return_inverse=True)
            if len(uniq) * PAIR_UNIT >= 2 ** 16:   # 1024 pairs: the offsets are 16-bit
                return None
            table.append(np.stack([uniq // kb, uniq % kb], axis=1).reshape(-1).astype(np.uint16))
            starts.append(starts[-1] + len(uniq))
            npb = v.shape[1] // 2
            # block b, group p, pair j, row r at (pairs before b) * o + p * 3 * npb + 3 * j + r
            w[at:at + o * npb] = ((v[:, 0::2] & 0xFFFF) | (v[:, 1::2] << 16)).reshape(
                o // ROW_GROUP, ROW_GROUP, npb).transpose(0, 2, 1).reshape(-1)
            off[at:at + o * npb] = (which.reshape(o, npb) * PAIR_UNIT).reshape(
                o // ROW_GROUP, ROW_GROUP, npb).transpose(0, 2, 1).reshape(-1)
            at += o * npb
        return (torch.from_numpy(w), torch.from_numpy(off), torch.from_numpy(np.concatenate(table)),
                torch.tensor(starts, dtype=torch.int32))

    @cached_property
    def select_geometry(self) -> tuple[int, int] | None:
        """(G rows a lane group, W columns a K block) of the select layout, as this library's select
        kernel reads it (nm_cpu.c section 5): (16, 64) with AVX-512 VBMI + VNNI (and where there is
        no select kernel: the scalar one reads any geometry); on AVX2 (8, 16), or (8, 32) for
        patterns that keep fewer than 3 inputs of 16 (1:8 keeps 4 of 32). None where M does not
        divide W (a block must hold whole groups). Cached: the library, so the geometry, is fixed
        for the process, and the per-call path reads it beside the cached layout."""
        lib = library()
        n, m = self.nm
        if lib is not None and lib.has_select() == 8:
            width = 16 if 16 % m == 0 and 16 * n >= 3 * m else 32
            return (8, width) if width % m == 0 else None
        return (16, 64) if 64 % m == 0 else None

    @cached_property
    def select_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(uint8 indices, int8 weights, int32 quad starts, int32 128 x row sums) of the select
        kernel (nm_cpu.c ``nm_linear_select``, where the layout is drawn), or None where it does not
        apply: values not int8, or no :attr:`select_geometry`. Each W-column block's kept inputs of
        a row are taken four at a time (a quad; the last one padded with weight 0), rows in lane
        groups of G."""
        geometry = self.select_geometry
        if self.scales is None or geometry is None:
            return None
        g, width = geometry
        values, indices = self.canonical()
        og = -(-self.out_features // g) * g
        vals, cols = _pad_rows(values, g).numpy(), _pad_rows(indices, g).numpy()
        lanes = og // g
        blocks = self._blocks(width)
        starts = np.cumsum([0] + [-(-kept // 4) for _, _, kept in blocks])
        v = np.zeros((og, 4 * int(starts[-1])), np.int8)   # row by row: quads of block b at starts[b]..
        c = np.zeros((og, 4 * int(starts[-1])), np.uint8)
        for b, (c0, j0, kept) in enumerate(blocks):
            v[:, 4 * starts[b]:4 * starts[b] + kept] = vals[:, j0:j0 + kept]
            c[:, 4 * starts[b]:4 * starts[b] + kept] = cols[:, j0:j0 + kept] - c0
        # lane group l, quad q, lane r, input i at 4 G (Q l + q) + 4 r + i
        def lane_major(a):
            return torch.from_numpy(a.reshape(lanes, g, -1, 4).transpose(0, 2, 1, 3).reshape(-1).copy())
        wsum = 128 * vals.astype(np.int32).sum(1)
        return (lane_major(c), lane_major(v), torch.from_numpy(starts.astype(np.int32)),
                torch.from_numpy(wsum.astype(np.int32)))

    @cached_property
    def select_scales(self) -> torch.Tensor | None:
        """int8 values: the row scales padded to a multiple of 16 (whole lane groups of either G)."""
        return None if self.scales is None else _pad_rows(self.scales.view(-1, 1), 16).view(-1).contiguous()

    @cached_property
    def pair_args(self) -> tuple:
        """(weights, offsets, columns, block starts pointers, K block, qmax) for the pair kernel.
        qmax: the activations' int16 range, so that no row's int32 sum can overflow (a pair adds at
        most 2 x qmax x 128)."""
        w, off, cols, starts = self.pair_layout
        pairs = w.numel() // (-(-self.out_features // ROW_GROUP) * ROW_GROUP)
        qmax = min(32767, (2 ** 31 - 1) // (256 * max(pairs, 1)))
        return ptr(w), ptr(off), ptr(cols), ptr(starts), self.pair_block, qmax

    def qmax(self, activation_bits: int = 16) -> int:
        """The activations' integer range in the integer kernels: 127 for 8 bits (the select kernel's,
        and the pair kernel's when it stands in for it), else the pair kernel's int16 range."""
        return 127 if activation_bits == 8 else self.pair_args[-1]

    @cached_property
    def group_scales(self) -> torch.Tensor | None:
        """int8 values: the row scales padded to whole row groups (what the kernel indexes)."""
        return None if self.scales is None else _pad_rows(self.scales.view(-1, 1), ROW_GROUP).view(-1).contiguous()

    @cached_property
    def lane_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, uint8 in-group positions), octet q / group g / slot s / lane at ((q*G+g)*N+s)*8+lane.
        Values int8 for int8 weights (a quarter of the bytes of that memory-bound pass; the row
        scales are applied to the sums), fp16 when ``half`` and F16C built (exact, half), else fp32."""
        n, m = self.nm
        lib = library()
        fp16 = self.half and lib is not None and bool(lib.has_f16c())
        values, indices = self.canonical()
        if self.scales is None:
            values = self.float_values(values).half() if fp16 else self.float_values(values)
        vals, cols = _pad_rows(values, 8), _pad_rows(indices, 8)
        q, g = vals.shape[0] // 8, self.in_features // m
        group_start = torch.arange(g, dtype=torch.int32).repeat_interleave(n) * m
        pos = (cols - group_start).to(torch.uint8)
        v = vals.view(q, 8, g, n).permute(0, 2, 3, 1).contiguous()
        return v, pos.view(q, 8, g, n).permute(0, 2, 3, 1).contiguous()

    @cached_property
    def mask_layout(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int8 values, uint8 masks) for the one-token mask kernel (nm_cpu.c ``mask_linear``), or None
        where it does not apply (values not int8, M not dividing 8, inputs not a multiple of 8). N:M
        reads as N8 = 8N/M kept of every 8 inputs: per row, the kept values in order (N8 a group)
        with 16 bytes of padding at the end, and one byte a group of 8 whose bit p marks input p kept."""
        n, m = self.nm
        if self.scales is None or 8 % m or self.in_features % 8:
            return None
        values, indices = self.canonical()
        idx = indices.long()
        bits = torch.ones_like(idx).bitwise_left_shift_(idx % 8)
        masks = torch.zeros(self.out_features, self.in_features // 8, dtype=torch.long).scatter_add_(1, idx // 8, bits)
        vals = torch.cat([values.reshape(-1), torch.zeros(16, dtype=torch.int8)])
        return vals, masks.to(torch.uint8)

    @property
    def mask_n(self) -> int:
        """Kept values per group of 8 inputs in the mask layout."""
        n, m = self.nm
        return 8 * n // m

    @cached_property
    def lane_scales(self) -> torch.Tensor | None:
        """int8 values: the row scales padded to whole octets (what the one-token kernel reads)."""
        return None if self.scales is None else _pad_rows(self.scales.view(-1, 1), 8).view(-1).contiguous()

    @cached_property
    def lane_args(self) -> tuple:
        """(values pointer, positions pointer, padded rows, value type, scales pointer) for the
        one-token kernel."""
        vals, pos = self.lane_layout
        return ptr(vals), ptr(pos), vals.shape[0] * 8, VTYPES[vals.dtype], ptr(self.lane_scales)


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[0] % multiple
    return t if extra == 0 else torch.cat([t, torch.zeros(extra, t.shape[1], dtype=t.dtype)])


def nm_linear(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None = None,
              threads: int | None = None, backend: str = "auto", activation: str | None = None,
              activation_bits: int = 16) -> torch.Tensor:
    """x: (..., in) fp32 -> (..., out). backend: "auto" (C kernel if it built), "c", "torch".
    activation: None, or "gelu" (erf form) applied to the result (inside the integer kernels'
    output pass for int8 weights; after the product elsewhere). activation_bits (int8 weights, many
    tokens, C kernel): the activations are rounded per token to int16 (16) or int8 (8: STA's
    fixed-point datapath; the select kernel where the CPU has AVX2)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: expected one of {sorted(map(str, ACTIVATIONS))}")
    check_activation_bits(activation_bits)
    y, applied = _nm_linear(x, weight, bias, threads, backend, activation, activation_bits)
    return y if activation is None or applied else F.gelu(y)


def _nm_linear(x, weight, bias, threads, backend, activation, activation_bits=16) -> tuple[torch.Tensor, bool]:
    """(x W^T + bias, whether the kernel applied ``activation`` too)."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {weight.in_features}")
    lib = backend_library(backend, "c")
    lead = x.shape[:-1]
    k, o = weight.in_features, weight.out_features
    x2 = x.reshape(-1, k).float()
    if lib is None or x.requires_grad or x2.shape[0] == 0:
        y = _gather_linear(x2, weight)
        return (y + bias if bias is not None else y).reshape(*lead, o), False
    threads = threads or torch.get_num_threads()
    t = x2.shape[0]
    n, m = weight.nm
    b = bias if bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()) else bias.float().contiguous()
    if t == 1:  # decoding: per-call Python work kept small, it is the same order as the kernel here
        vals, pos, o8, vtype, scales = weight.lane_args
        y = torch.empty(o8)
        xc = x2.contiguous()  # held in a name: a temporary's memory could be freed before the C call reads it
        lib.nm_linear_vector(ptr(xc), vals, pos, o, o8, k, n, m, ptr(b), ptr(y), vtype, scales, threads)
        return (y if o8 == o else y[:o]).view(*lead, o), False
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.uses_select(activation_bits):
        y = _select(lib, x2, weight.select_layout, weight.select_geometry, weight.select_scales, b, o, threads,
                    ACTIVATIONS[activation])
        return y.view(*lead, o), True
    if weight.pair_layout is not None:   # int8 values: the integer kernel
        w, off, cols, starts, kb, _ = weight.pair_args
        args = (w, off, cols, starts, kb, weight.qmax(activation_bits))
        y = _pairs(lib, x2, args, weight.group_scales, b, o, n, m, threads, ACTIVATIONS[activation])
        return y.view(*lead, o), True
    vals, offs = weight.group_layout
    y = _tokens(lib, x2, vals, offs, weight.group_scales, b, o, n, m, weight.k_block, threads)
    return y.view(*lead, o), False


def _tokens(lib, x2: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor | None,
            bias: torch.Tensor | None, out_features: int, n: int, m: int, k_block: int, threads: int) -> torch.Tensor:
    """The many-token kernel (nm_cpu.c nm_linear_tokens) on x2 (T, K), rows unit-stride, and a group
    layout: (T, out) fp32. Value type from the layout's dtype (fp32, fp16, int8 with ``scales``)."""
    y = torch.empty(x2.shape[0], out_features)
    if x2.shape[0]:
        lib.nm_linear_tokens(ptr(x2), x2.stride(0), x2.shape[0], x2.shape[1], ptr(values), ptr(offsets), out_features,
                             values.shape[1], n, m, k_block, ptr(bias), ptr(y), VTYPES[values.dtype], ptr(scales), threads)
    return y


def _pairs(lib, x2: torch.Tensor, args: tuple, scales: torch.Tensor, bias: torch.Tensor | None, out_features: int,
           n: int, m: int, threads: int, act: int = 0) -> torch.Tensor:
    """The integer many-token kernel (nm_cpu.c nm_linear_pairs) on x2 (T, K), rows unit-stride:
    (T, out) fp32. ``args``: KernelWeight.pair_args (or the same built from tensors); ``act``: an
    ACTIVATIONS code the kernel applies to its output."""
    w, off, cols, starts, kb, qmax = args
    y = torch.empty(x2.shape[0], out_features)
    if x2.shape[0]:
        lib.nm_linear_pairs(ptr(x2), x2.stride(0), x2.shape[0], x2.shape[1], w, off, cols, starts, out_features,
                            n, m, kb, ptr(scales), ptr(bias), ptr(y), qmax, act, threads)
    return y


def _select(lib, x2: torch.Tensor, layout: tuple, geometry: tuple[int, int], scales: torch.Tensor,
            bias: torch.Tensor | None, out_features: int, threads: int, act: int = 0) -> torch.Tensor:
    """The int8 x int8 many-token kernel (nm_cpu.c nm_linear_select) on x2 (T, K), rows unit-stride,
    and a KernelWeight.select_layout of ``geometry`` (G, W): (T, out) fp32."""
    idx, w, starts, wsum = layout
    y = torch.empty(x2.shape[0], out_features)
    if x2.shape[0]:
        lib.nm_linear_select(ptr(x2), x2.stride(0), x2.shape[0], x2.shape[1], ptr(idx), ptr(w), ptr(starts), ptr(wsum),
                             out_features, *geometry, ptr(scales), ptr(bias), ptr(y), act, threads)
    return y


def pair_error_bound(weight: KernelWeight, x: torch.Tensor, activation_bits: int = 16) -> torch.Tensor:
    """(T, out): how far the integer kernels' output may be from x W^T for int8 weights. Each token
    is rounded to integer steps of max|x_t| / qmax (KernelWeight.qmax), at most half a step an
    input, so a row's sum moves by at most ||w_o||_1 x max|x_t| / (2 qmax) (fp32 rounding of the
    result aside)."""
    x2 = x.reshape(-1, weight.in_features).float()
    l1 = weight.float_values().abs().sum(1)
    return x2.abs().amax(1, keepdim=True) * l1 / (2 * weight.qmax(activation_bits))


def _gather_linear(x2: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """The PyTorch path: gather each row's kept inputs and reduce (the kernels' arithmetic, no
    dense weight), a block of output rows at a time so the gathered inputs stay within
    FALLBACK_ELEMENTS rather than tokens x out x kept."""
    stored, indices = weight.canonical()
    values = weight.float_values(stored)
    t, kn = x2.shape[0], indices.shape[1]
    rows = max(1, FALLBACK_ELEMENTS // max(t * kn, 1))
    parts = [torch.einsum("tok,ok->to", x2[:, indices[r:r + rows].long()], values[r:r + rows])
             for r in range(0, weight.out_features, rows)]
    return torch.cat(parts, dim=1) if parts else x2.new_zeros(t, 0)


@torch.library.custom_op("sparsetx::nm_linear", mutates_args=())
def _nm_linear_op(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor | None,
                  bias: torch.Tensor | None, out_features: int, n: int, m: int, k_block: int) -> torch.Tensor:
    """The many-token kernel on a layout passed as tensors (what torch.compile calls)."""
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    y = _tokens(library(), x2, values, offsets, scales, bias, out_features, n, m, k_block, torch.get_num_threads())
    return y.view(*x.shape[:-1], out_features)


@_nm_linear_op.register_fake
def _(x, values, offsets, scales, bias, out_features, n, m, k_block):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("sparsetx::nm_linear_pairs", mutates_args=())
def _nm_linear_pairs_op(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor, columns: torch.Tensor,
                        starts: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                        n: int, m: int, k_block: int, qmax: int, act: int) -> torch.Tensor:
    """The integer many-token kernel on a pair layout passed as tensors (what torch.compile calls)."""
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    args = (ptr(weights), ptr(offsets), ptr(columns), ptr(starts), k_block, qmax)
    y = _pairs(library(), x2, args, scales, bias, out_features, n, m, torch.get_num_threads(), act)
    return y.view(*x.shape[:-1], out_features)


@_nm_linear_pairs_op.register_fake
def _(x, weights, offsets, columns, starts, scales, bias, out_features, n, m, k_block, qmax, act):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("sparsetx::nm_linear_select", mutates_args=())
def _nm_linear_select_op(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, starts: torch.Tensor,
                         sums: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                         lanes: int, width: int, act: int) -> torch.Tensor:
    """The int8 x int8 many-token kernel on a select layout passed as tensors (what torch.compile calls)."""
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    y = _select(library(), x2, (indices, weights, starts, sums), (lanes, width), scales, bias, out_features,
                torch.get_num_threads(), act)
    return y.view(*x.shape[:-1], out_features)


@_nm_linear_select_op.register_fake
def _(x, indices, weights, starts, sums, scales, bias, out_features, lanes, width, act):
    return x.new_empty(*x.shape[:-1], out_features)


class SparseLinear(nn.Module):
    """Drop-in nn.Linear replacement holding a packed N:M weight (inference)."""

    def __init__(self, weight: KernelWeight, bias: torch.Tensor | None = None, activation_bits: int = 16) -> None:
        """activation_bits: how the integer kernels round activations for int8 weights (see
        :func:`nm_linear`); 8 stores the select layout where the CPU runs that kernel."""
        super().__init__()
        self.activation_bits = check_activation_bits(activation_bits)
        self.weight_nm = weight.compact(activation_bits)   # inference: the kernel's layout is the stored form
        self.in_features, self.out_features = weight.in_features, weight.out_features
        # the layout as buffers too, so torch.compile passes them to the operator as tensors
        native = library() is not None
        select = weight.select_layout if weight.uses_select(activation_bits) else None
        for name, t in zip(("select_indices", "select_weights", "select_starts", "select_sums"), select or (None,) * 4):
            self.register_buffer(name, t, persistent=False)
        self.register_buffer("select_scales", weight.select_scales if select else None, persistent=False)
        self.select_geometry = weight.select_geometry if select else (0, 0)   # plain ints, as pair_qmax
        pairs = weight.pair_layout if native and select is None else None
        layout = weight.group_layout if native and pairs is None and select is None else (None, None)
        self.register_buffer("layout_values", layout[0], persistent=False)
        self.register_buffer("layout_offsets", layout[1], persistent=False)
        for name, t in zip(("pair_weights", "pair_offsets", "pair_columns", "pair_starts"), pairs or (None,) * 4):
            self.register_buffer(name, t, persistent=False)
        # plain ints for the traced call (a cached_property takes a lock torch.compile cannot trace)
        self.pair_qmax = weight.qmax(activation_bits) if pairs is not None else 0
        self.register_buffer("layout_scales", weight.group_scales, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.activation: str | None = None   # "gelu": the layer applies it (fuse_activations)

    @classmethod
    def from_packed(cls, packed: PackedNM, bias: torch.Tensor | None = None, activation_bits: int = 16) -> SparseLinear:
        return cls(KernelWeight.from_packed(packed), bias, activation_bits)   # __init__ compacts it

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: NMPattern | str) -> SparseLinear:
        from ..formats.packed import pack_nm

        return cls.from_packed(pack_nm(linear.weight.detach(), NMPattern.parse(pattern), torch.float32), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and (self.layout_values is not None or self.pair_weights is not None
                                              or self.select_weights is not None):
            # torch.compile sees the kernel as one opaque operator with a known output shape
            w = self.weight_nm
            n, m = w.nm
            if self.select_weights is not None:
                return torch.ops.sparsetx.nm_linear_select(x, self.select_indices, self.select_weights, self.select_starts,
                                                           self.select_sums, self.select_scales, self.bias, w.out_features,
                                                           *self.select_geometry, ACTIVATIONS[self.activation])
            if self.pair_weights is not None:
                return torch.ops.sparsetx.nm_linear_pairs(x, self.pair_weights, self.pair_offsets, self.pair_columns,
                                                          self.pair_starts, self.layout_scales, self.bias, w.out_features,
                                                          n, m, w.pair_block, self.pair_qmax, ACTIVATIONS[self.activation])
            y = torch.ops.sparsetx.nm_linear(x, self.layout_values, self.layout_offsets, self.layout_scales,
                                             self.bias, w.out_features, n, m, w.k_block)
            return y if self.activation is None else F.gelu(y)
        return nm_linear(x, self.weight_nm, self.bias, activation=self.activation, activation_bits=self.activation_bits)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        act += ", int8 activations" if self.activation_bits == 8 else ""
        return f"{self.in_features}, {self.out_features}, pattern={self.weight_nm.pattern}{act}"


def fuse_activations(model: nn.Module) -> int:
    """Move each erf-GELU that directly follows a SparseLinear into it (the pair kernel applies it in
    its output pass): a module with a ``dense`` SparseLinear and an ``intermediate_act_fn`` that is
    transformers' exact GELU (BERT's intermediate block) gets ``dense.activation = "gelu"`` and an
    identity in its place. Returns the number fused."""
    from transformers.activations import GELUActivation

    fused = 0
    for module in model.modules():
        dense, act = getattr(module, "dense", None), getattr(module, "intermediate_act_fn", None)
        if isinstance(dense, SparseLinear) and dense.activation is None and type(act) is GELUActivation \
                and act.act is F.gelu:
            dense.activation, module.intermediate_act_fn = "gelu", nn.Identity()
            fused += 1
    return fused


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
