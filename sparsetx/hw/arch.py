"""Accelerator descriptions as data: every parameter with its source, loadable from YAML or JSON.

Defaults reproduce the published designs where the papers (or SpAtten's public RTL) state a value;
the rest are marked "assumed" with the reason, and are settings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .dram import DRAM
from .energy import DRAM_PJ_PER_BIT


@dataclass(frozen=True)
class SpAttenArch:
    """SpAtten (HPCA 2021). Sources: SEEDS.md / HW.md (public RTL and behavioural model)."""

    name: str = "spatten"
    clock_ghz: float = 1.0                # RTL CLOCK_PERIOD 1000 ps
    dram_channels: int = 16               # HBM2, as the official Ramulator2 configuration
    dram_channel_bytes_per_cycle: float = 15.1   # Ramulator2 on SpAtten's gather pattern, unlimited pending requests
    dram_latency: int = 40                # calibrated: 16 pending 32-B requests / 40 cycles = 12.8 B/cycle a
                                          # channel, the ~13 measured with the official fetcher (205 B/cycle in all)
    dram_max_inflight: int = 16           # MatrixFetcher: 16 pending 32-B requests per channel
    dram: str = "hbm2"
    qk_multipliers: int = 512             # Q x K module: 8 query-key dot products a cycle at D = 64
    pv_multipliers: int = 512             # P x V module
    topk_comparators: int = 16            # P of the top-k engine (no gain beyond 16, per the paper)
    topk_pipeline: int = 3                # cycles of pipeline per quick-select round
    softmax_latency: int = 87             # 7 + 21 + 23 + 29 + 7 pipeline stages (behavioural model)
    softmax_per_cycle: int = 0            # 0: one score a cycle per 64 Q x K multipliers (the RTL: 8 at 512)
    kv_buffer_bytes: int = 196 * 1024     # each of K and V: 1024 tokens x 64 x 12 bits, double-buffered
    datapath_bits: int = 12               # fixed-point datapath (unquantized K/V are fetched at this width)
    query_bits: int = 16
    max_context: int = 1024

    def validate(self) -> None:
        _positive(self, ("clock_ghz", "dram_channels", "dram_channel_bytes_per_cycle", "dram_latency",
                         "dram_max_inflight", "qk_multipliers", "pv_multipliers",
                         "topk_comparators", "kv_buffer_bytes", "datapath_bits", "max_context"))
        if self.softmax_per_cycle < 0:
            raise ValueError(f"{self.name}: softmax_per_cycle must be >= 0 (0: derived), got {self.softmax_per_cycle}")
        _dram(self.dram)
        one_tile = 2 * 64 * self.datapath_bits // 8  # double-buffered: at least one 64-wide key row each
        if self.kv_buffer_bytes < one_tile:
            raise ValueError(f"spatten: kv_buffer_bytes {self.kv_buffer_bytes} is smaller than one "
                             f"double-buffered key row ({one_tile} bytes)")

    @property
    def dram_model(self) -> DRAM:
        return DRAM(self.dram_channels, self.dram_channel_bytes_per_cycle, self.dram_latency, self.dram_max_inflight)

    @property
    def dram_bytes_per_cycle(self) -> float:
        """Sustained DRAM bandwidth of the transaction model (about 205 B/cycle for 16 channels)."""
        return self.dram_model.sustained_bytes_per_cycle

    @property
    def softmax_rate(self) -> int:
        """Scores the softmax takes a cycle: as set, or one per 64 Q x K multipliers (its units
        scale with the array in the RTL, so doubling the multipliers doubles it)."""
        return self.softmax_per_cycle or max(1, self.qk_multipliers // 64)

    @classmethod
    def eighth(cls) -> SpAttenArch:
        """SpAtten_1/8: 64 multipliers a module, 2 HBM channels (about 26 B/cycle; the design compared
        with A3/MNNFast)."""
        return cls(name="spatten-1/8", qk_multipliers=64, pv_multipliers=64, dram_channels=2)


@dataclass(frozen=True)
class STAArch:
    """STA (Fang, Zhou, Wang; TVLSI 2022): an FPGA design whose internals the paper text we could
    read does not give, reconstructed as SEEDS.md describes. Every value below is assumed."""

    name: str = "sta"
    clock_ghz: float = 0.2                # assumed: a typical FPGA accelerator clock (SEEDS.md's first guess)
    pe_rows: int = 16                     # assumed: PEs along the output features
    pe_cols: int = 16                     # assumed: PEs along the tokens
    lanes: int = 4                        # multipliers per PE = kept weights a PE consumes a cycle
    act_width: int = 32                   # assumed: activations a PE's M:1 multiplexers see a cycle (max M)
    value_bits: int = 16                  # SEEDS.md's first guess: 16-bit fixed point
    weight_buffer_bytes: int = 512 * 1024     # assumed (double-buffered weight tiles)
    act_buffer_bytes: int = 2 * 1024 * 1024   # assumed: holds a layer's activations at moderate lengths
    dram_bytes_per_cycle: int = 96        # assumed: DDR4-2400 x 64 bit (19.2 GB/s) at 200 MHz
    dram: str = "ddr4"
    softmax_per_cycle: int = 16           # assumed: one score per PE column a cycle
    softmax_latency: int = 32             # assumed pipeline depth (max, exp, sum, reciprocal)
    onchip_softmax: bool = True           # False: the baseline that writes scores to DRAM and reads them back
    control_fraction: float = 0.1         # assumed (no source): control, sequencing and pipeline registers as a
                                          # fraction of the datapath + SRAM dynamic energy; report 0.05-0.2
    static_watts: float = 1.0             # assumed: static power of a mid-range FPGA fabric (order of 1 W; the
                                          # part is not known), paid for the whole run

    def validate(self) -> None:
        _positive(self, ("clock_ghz", "pe_rows", "pe_cols", "lanes", "act_width", "value_bits",
                         "weight_buffer_bytes", "act_buffer_bytes", "dram_bytes_per_cycle", "softmax_per_cycle"))
        for name in ("control_fraction", "static_watts"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{self.name}: {name} must be >= 0, got {getattr(self, name)!r}")
        _dram(self.dram)

    @property
    def pes(self) -> int:
        return self.pe_rows * self.pe_cols

    def check_pattern(self, n: int, m: int) -> None:
        """The engine's multiplexers select from act_width inputs: M beyond that is unsupported."""
        if m > self.act_width:
            raise ValueError(f"sta: N:M {n}:{m} is not supported: M={m} exceeds the multiplexer width "
                             f"act_width={self.act_width}")

    def kept_per_cycle(self, n: int, m: int) -> float:
        """Kept weights one PE consumes a cycle: its multipliers, or what act_width inputs hold."""
        return min(self.lanes, self.act_width * n / m)


ARCHS = {"spatten": SpAttenArch, "sta": STAArch}


def _positive(arch, names) -> None:
    for n in names:
        v = getattr(arch, n)
        if not v > 0:
            raise ValueError(f"{arch.name}: {n} must be positive, got {v!r}")


def _dram(kind: str) -> None:
    if kind not in DRAM_PJ_PER_BIT:
        raise ValueError(f"unknown DRAM kind {kind!r}; known: {', '.join(DRAM_PJ_PER_BIT)}")


def load_arch(kind: str, path: str | Path | None = None, **overrides):
    """The default ``kind`` ("sta" or "spatten") design, updated from a YAML/JSON file and keywords."""
    if kind not in ARCHS:
        raise ValueError(f"unknown architecture {kind!r}; known: {', '.join(ARCHS)}")
    cls = ARCHS[kind]
    values = {}
    if path is not None:
        import yaml

        try:   # YAML reads JSON too
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid YAML/JSON ({str(err).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: an architecture file holds a mapping of parameters")
    values.update(overrides)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(map(str, values)) - set(known))
    if unknown:
        raise ValueError(f"{kind}: unknown parameter(s) {unknown}; known: {sorted(known)}")
    for key, value in values.items():   # the type of the default: a string where a number goes is an error
        want = type(known[key].default)
        ok = isinstance(value, want) or (want is float and isinstance(value, int))
        if not ok or isinstance(value, bool) != (want is bool):
            raise ValueError(f"{kind}: parameter {key} = {value!r} should be a {want.__name__}")
    arch = cls(**values)
    arch.validate()
    return arch


def arch_dict(arch) -> dict:
    return asdict(arch)
