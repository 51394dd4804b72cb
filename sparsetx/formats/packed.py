"""Packed N:M storage: kept values plus position codes at the minimum bit width.

Layout of one (out, in) weight with pattern N:M (G = out * in / M groups, row-major: row 0's groups
first, each group's M positions consecutive along ``in``):

* ``values``: (out, in / M * N) in the value dtype (fp32, fp16, bf16 or int8). Group g's N kept
  values, in ascending position order, occupy columns [g_in_row * N, g_in_row * N + N).
* ``scales`` (int8 values only): (out,) fp32, one per row. A kept weight is ``values[r, j] *
  scales[r]``; ``scales[r] = max |w[r, :]| / 127`` (symmetric, per output row, as STA's
  fixed-point datapath scales a row), values rounded to nearest and clamped to [-127, 127]; a row of
  zeros has scale 0.
* ``indices``: a little-endian bitstream in uint8 bytes. Code number c occupies bits
  [c * b, (c + 1) * b) of the stream, where bit k of the stream is bit (k % 8) of byte k // 8
  (least significant first); the tail of the last byte is zero.
  - encoding ``"index"`` (default, what STA's operand multiplexers consume): one code per kept value,
    its position inside its group, b = ceil(log2 M) bits; G * N codes in the order of ``values``.
  - encoding ``"rank"``: one code per group, the combinatorial rank sum_i C(c_i, i + 1) of its sorted
    positions c_0 < ... < c_{N-1}, b = ceil(log2 C(M, N)) bits; G codes.
Pruned positions unpack to +0.0. A group with fewer than N non-zeros stores explicit zeros at the
lowest free positions, so every group holds exactly N codes.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..nm.mask import check_groupable
from ..nm.pattern import NMPattern

ENCODINGS = ("index", "rank")
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
INT8_MAX = 127


class PackedFormatError(ValueError):
    """A packed tensor or file is inconsistent: truncated, corrupted, or not what its header says."""


def index_bits(pattern: NMPattern, encoding: str = "index") -> int:
    """Bits per code: ceil(log2 M) per kept value, or ceil(log2 C(M, N)) per group."""
    if encoding == "index":
        return max(1, math.ceil(math.log2(pattern.m)))
    if encoding == "rank":
        return max(1, math.ceil(math.log2(math.comb(pattern.m, pattern.n))))
    raise ValueError(f"unknown index encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bitstream of ``bits``-bit codes -> uint8 bytes."""
    codes = np.ascontiguousarray(codes, dtype=np.uint64).reshape(-1)
    shifts = np.arange(bits, dtype=np.uint64)
    stream = ((codes[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(stream.reshape(-1), bitorder="little")


UNPACK_CODES = 1 << 16   # codes decoded at a time (a multiple of 8: every chunk starts on a byte)


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes of ``bits`` bits, decoded a chunk at a time
    (the bit-per-byte intermediate of a whole layer would be 8 x bits bytes a code)."""
    need = (count * bits + 7) // 8
    if data.size != need:
        raise PackedFormatError(f"index stream has {data.size} bytes, expected {need} for {count} codes of {bits} bits")
    data = np.asarray(data, dtype=np.uint8)
    dtype = np.uint8 if bits <= 8 else (np.uint32 if bits <= 32 else np.uint64)
    weights = (np.uint64(1) << np.arange(bits, dtype=np.uint64)).astype(dtype)
    out = np.empty(count, dtype=np.uint64)
    for c0 in range(0, count, UNPACK_CODES):
        c1 = min(count, c0 + UNPACK_CODES)
        chunk = data[c0 * bits // 8:(c1 * bits + 7) // 8]
        stream = np.unpackbits(chunk, bitorder="little", count=(c1 - c0) * bits).reshape(c1 - c0, bits)
        out[c0:c1] = (stream.astype(dtype) * weights).sum(axis=1, dtype=np.uint64)
    return out


def _binom_table(m: int, n: int) -> np.ndarray:
    """table[k, c] = C(c, k) for k in 0..n, c in 0..m-1."""
    return np.array([[math.comb(c, k) for c in range(m)] for k in range(n + 1)], dtype=np.uint64)


def rank_encode(positions: np.ndarray, m: int) -> np.ndarray:
    """Sorted positions (G, N) -> combinatorial ranks (G,)."""
    n = positions.shape[1]
    table = _binom_table(m, n)
    return sum(table[i + 1][positions[:, i]] for i in range(n)).astype(np.uint64)


def rank_decode(ranks: np.ndarray, m: int, n: int) -> np.ndarray:
    """Combinatorial ranks (G,) -> sorted positions (G, N); raises on a rank >= C(M, N)."""
    if ranks.size and ranks.max() >= math.comb(m, n):
        raise PackedFormatError(f"rank code {int(ranks.max())} out of range for {n}:{m} (< {math.comb(m, n)})")
    table = _binom_table(m, n)
    rest = ranks.astype(np.uint64).copy()
    positions = np.empty((ranks.size, n), dtype=np.int64)
    for i in range(n - 1, -1, -1):  # largest position first (greedy combinadic)
        c = np.searchsorted(table[i + 1], rest, side="right") - 1
        positions[:, i] = c
        rest -= table[i + 1][c]
    return positions


@dataclass
class PackedNM:
    """One N:M weight in packed form (see the module docstring for the byte layout)."""

    pattern: NMPattern
    shape: tuple[int, int]
    values: torch.Tensor  # (out, in // m * n)
    indices: torch.Tensor  # uint8 bitstream
    encoding: str = "index"
    scales: torch.Tensor | None = None  # (out,) fp32, int8 values only

    @property
    def nbytes(self) -> int:
        extra = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.values.numel() * self.values.element_size() + self.indices.numel() + extra

    def float_values(self) -> torch.Tensor:
        """The kept values as fp32 (int8 ones times their row's scale)."""
        if self.values.dtype == torch.int8:
            return self.values.float() * self.scales.view(-1, 1)
        return self.values.float()

    @property
    def groups(self) -> int:
        return self.shape[0] * self.shape[1] // self.pattern.m

    def positions(self) -> torch.Tensor:
        """In-group positions of the kept values: (out, in // m, n), int64, validated."""
        return torch.from_numpy(_decode_positions(self))

    def validate(self, name: str = "weight") -> None:
        out, inp = self.shape
        expect = (out, inp // self.pattern.m * self.pattern.n)
        if tuple(self.values.shape) != expect:
            raise PackedFormatError(f"{name}: values of shape {tuple(self.values.shape)}, expected {expect} for {out}x{inp} {self.pattern}")
        if self.indices.dtype != torch.uint8 or self.indices.dim() != 1:
            raise PackedFormatError(f"{name}: indices must be a 1-D uint8 stream")
        if (self.values.dtype == torch.int8) != (self.scales is not None):
            raise PackedFormatError(f"{name}: int8 values need per-row scales, and only they have them")
        if self.scales is not None:
            if self.scales.dtype != torch.float32 or tuple(self.scales.shape) != (out,):
                raise PackedFormatError(f"{name}: scales must be ({out},) float32, got {tuple(self.scales.shape)} {self.scales.dtype}")
            if not bool(torch.isfinite(self.scales).all()) or bool((self.scales < 0).any()):
                raise PackedFormatError(f"{name}: scales must be finite and non-negative")
            if bool((self.values == -128).any()):
                raise PackedFormatError(f"{name}: int8 value -128 is outside the symmetric range [-127, 127]")
        _decode_positions(self, name)


def _decode_positions(p: PackedNM, name: str = "weight") -> np.ndarray:
    n, m = p.pattern.n, p.pattern.m
    bits = index_bits(p.pattern, p.encoding)
    raw = p.indices.numpy()
    try:
        if p.encoding == "index":
            pos = unpack_bits(raw, bits, p.groups * n).astype(np.int64).reshape(p.groups, n)
        else:
            pos = rank_decode(unpack_bits(raw, bits, p.groups), m, n)
    except PackedFormatError as err:
        raise PackedFormatError(f"{name}: {err}") from None
    if pos.size and (pos.max() >= m or (n > 1 and (np.diff(pos, axis=1) <= 0).any())):
        raise PackedFormatError(f"{name}: index codes are not strictly increasing positions below M={m}: corrupted indices")
    return pos.reshape(p.shape[0], p.shape[1] // m, n)


def check_values(weight: torch.Tensor, dtype: torch.dtype, name: str = "weight", clamp: bool = False) -> torch.Tensor:
    """``weight`` in ``dtype``, refusing what would silently change: NaN or infinite weights, and
    finite weights beyond the dtype's range (they would become inf), unless ``clamp`` (then they
    are clamped to the largest finite value and counted in a warning). Weights too small for the
    dtype round to zero like any rounding (their error is below the dtype's resolution; fp16: 6e-8,
    far less than its rounding of ordinary weights): counted in the same warning, not refused."""
    w = weight.detach()
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name}: {bad} NaN or infinite weight(s); refusing to prune or pack a diverged model")
    if not w.is_floating_point() or dtype == w.dtype:
        return w.to(dtype)
    limit = torch.finfo(dtype).max
    over = w.abs() > limit
    notes = []
    if bool(over.any()):
        if not clamp:
            raise ValueError(f"{name}: {int(over.sum())} weight(s) beyond the {str(dtype).removeprefix('torch.')} range "
                             f"(|w| up to {float(w.abs().max()):.3g} > {limit:.5g}); pick a wider value dtype "
                             "(float32, bfloat16) or clamp them (clamp=True, CLI --clamp-values)")
        w = w.clamp(-limit, limit)
        notes.append(f"{int(over.sum())} clamped to +-{limit:.5g}")
    out = w.to(dtype)
    flushed = int(((out == 0) & (w != 0)).sum())
    if flushed:
        notes.append(f"{flushed} too small for {str(dtype).removeprefix('torch.')} became 0")
    if notes:
        warnings.warn(f"{name}: " + "; ".join(notes), stacklevel=3)
    return out


def pack_nm(weight: torch.Tensor, pattern: NMPattern | str, dtype: torch.dtype | None = None,
            encoding: str = "index", name: str = "weight", clamp: bool = False) -> PackedNM:
    """Pack an N:M-sparse dense weight (out, in). Raises if any group has more than N non-zeros,
    or on weights the value dtype cannot hold (see :func:`check_values`)."""
    pattern = NMPattern.parse(pattern)
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown index encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    check_groupable(tuple(weight.shape), pattern, name)
    quantize = dtype == torch.int8
    w = check_values(weight.cpu(), torch.float32 if quantize else (dtype or weight.dtype), name, clamp)
    if w.dtype not in VALUE_DTYPES.values():
        raise ValueError(f"{name}: value dtype {w.dtype} not supported; valid: {', '.join(VALUE_DTYPES)}")
    out, inp = w.shape
    n, m = pattern.n, pattern.m
    groups = w.reshape(out, inp // m, m)
    nonzero = groups != 0
    counts = nonzero.sum(-1)
    if counts.max() > n:
        r, g = divmod(int(counts.flatten().argmax()), inp // m)
        raise ValueError(f"{name} is not {pattern}: row {r}, group {g} has {int(counts[r, g])} non-zeros")
    # Non-zeros first, then the lowest free positions; kept positions in ascending order.
    arange = torch.arange(m)
    order_key = torch.where(nonzero, arange, arange + m)
    chosen = order_key.topk(n, dim=-1, largest=False).values % m
    positions = chosen.sort(dim=-1).values
    values = groups.gather(-1, positions).reshape(out, inp // m * n).contiguous()
    scales = None
    if quantize:
        values, scales = quantize_rows(values)
    pos_np = positions.reshape(-1, n).numpy()
    if encoding == "index":
        codes = pos_np.reshape(-1)
    else:
        codes = rank_encode(pos_np, m)
    indices = torch.from_numpy(pack_bits(codes, index_bits(pattern, encoding)))
    return PackedNM(pattern, (out, inp), values, indices, encoding, scales)


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (round(v / s) clamped to [-127, 127], s = max |v| / 127 per row)."""
    v = values.float()
    scales = v.abs().amax(dim=1) / INT8_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(v / safe.view(-1, 1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def unpack_nm(packed: PackedNM) -> torch.Tensor:
    """Dense (out, in) weight in the value dtype (fp32 for int8: values times scales); pruned
    positions are +0.0."""
    out, inp = packed.shape
    m, n = packed.pattern.m, packed.pattern.n
    positions = packed.positions()
    values = packed.float_values() if packed.scales is not None else packed.values
    dense = torch.zeros(out, inp // m, m, dtype=values.dtype)
    dense.scatter_(-1, positions, values.reshape(out, inp // m, n))
    return dense.reshape(out, inp)


def packed_bytes(shape: tuple[int, int], pattern: NMPattern, value_bits: int = 16, encoding: str = "index") -> int:
    """Bytes of a packed (out, in) weight, computed from the layout (no tensor needed; a packed
    file's int8 values add 4 bytes of scale a row, which this hardware-side count leaves out)."""
    out, inp = shape
    groups = out * inp // pattern.m
    codes = groups * pattern.n if encoding == "index" else groups
    return groups * pattern.n * value_bits // 8 + (codes * index_bits(pattern, encoding) + 7) // 8
