"""Energy per action, one documented table per study (never mixed silently).

Logic and SRAM: Horowitz, "Computing's energy problem", ISSCC 2014, 45 nm, 0.9 V:
  8-bit int add 0.03 pJ, 32-bit int add 0.1 pJ, 8-bit int mult 0.2 pJ, 32-bit int mult 3.1 pJ,
  16-bit FP add 0.4 pJ, 16-bit FP mult 1.1 pJ, SRAM 64-bit access 10 pJ (8 KB), 20 pJ (32 KB),
  100 pJ (1 MB), i.e. about 10 pJ x sqrt(size / 8 KB).
Scaling to other widths (ours): a multiplier's energy grows with bits^2 (array multiplier area), an
adder's with bits, both anchored at the 8-bit figures: 12-bit mult 0.45 pJ, 16-bit 0.8 pJ (Horowitz's
32-bit figure 3.1 pJ against 0.2 x 16 = 3.2 pJ from the rule).
Softmax exp: SpAtten evaluates exp by a 5th-order Taylor series in floating point: 5 FP16 mults and
5 FP16 adds = 7.5 pJ an element (ours, from the table), plus one FP16 add for the running sum.
DRAM per bit: HBM2 3.9 pJ (O'Connor et al., MICRO 2017; 6.25 pJ in another source is the
sensitivity bound), LPDDR4 8 pJ, DDR4 20 pJ (the low end of Horowitz's 20-40 pJ for DDR3/DDR4).
Operand selection (ours, from the same table): a static CMOS 2:1 multiplexer bit is 12 transistors
against a 28-transistor mirror full adder (Weste & Harris, CMOS VLSI Design, 4th ed., ch. 11), so a
mux bit is taken as 12/28 of Horowitz's adder bit (0.03 pJ / 8): 1.6 fJ. An M:1 multiplexer over
b-bit operands is a tree of (M - 1) 2:1 muxes per bit whose inputs all toggle when the activations
change; decoding a ceil(log2 M)-bit index into M select lines is taken as M mux-bit equivalents.
Control and static power have no figure in the sources above: they are settings of the architecture
(STAArch.control_fraction, STAArch.static_watts), assumed, with the sensitivity stated where used.
Both simulators use 45 nm numbers: SpAtten was taped out at 40 nm and STA is an FPGA, so absolute
energies are estimates; ratios between configurations are what the table is for.
"""
from __future__ import annotations

import math

SOURCE = "Horowitz ISSCC 2014 (45 nm, 0.9 V); DRAM: O'Connor MICRO 2017 (HBM2), Horowitz (DDR)"

DRAM_PJ_PER_BIT = {"hbm2": 3.9, "lpddr4": 8.0, "ddr4": 20.0}


def mult_pj(bits: int) -> float:
    """Integer multiplier, bits x bits: 0.2 pJ at 8 bits, scaled by bits^2."""
    return 0.2 * (bits / 8) ** 2


def add_pj(bits: int) -> float:
    """Integer adder: 0.03 pJ at 8 bits, scaled by bits."""
    return 0.03 * bits / 8


def mac_pj(bits: int) -> float:
    """One multiply-accumulate: a bits x bits multiply into a 2*bits accumulator."""
    return mult_pj(bits) + add_pj(2 * bits)


MUX2_PJ_PER_BIT = 0.03 / 8 * 12 / 28   # a 2:1 mux bit: 12/28 of an adder bit (see the module docstring)


def mux_pj(inputs: int, bits: int) -> float:
    """One selection by an ``inputs``:1 multiplexer of ``bits``-bit operands: (inputs - 1) 2:1 muxes a bit."""
    return max(inputs - 1, 0) * bits * MUX2_PJ_PER_BIT


def index_decode_pj(m: int) -> float:
    """Decoding one kept weight's in-group index into M select lines (M gate equivalents)."""
    return m * MUX2_PJ_PER_BIT if m > 1 else 0.0


EXP_PJ = 5 * 1.1 + 5 * 0.4 + 0.4  # 5th-order Taylor exp in FP16, plus the running-sum add


def sram_pj_per_byte(size_bytes: int) -> float:
    """SRAM access energy per byte (64-bit access: 10 pJ x sqrt(size / 8 KB), floor at 8 KB)."""
    kib = max(size_bytes / 1024, 8.0)
    return 10.0 * math.sqrt(kib / 8.0) / 8.0


def dram_pj_per_byte(kind: str) -> float:
    if kind not in DRAM_PJ_PER_BIT:
        raise ValueError(f"unknown DRAM kind {kind!r}; known: {', '.join(DRAM_PJ_PER_BIT)}")
    return 8 * DRAM_PJ_PER_BIT[kind]
