"""DRAM as transactions, not an ideal pipe: 32-byte bursts, channels, requests in flight, latency.

A fetch of ``rows`` rows of ``row_bytes`` becomes bursts (each row starts on a burst boundary, except
6-bit rows, which SpAtten packs two heads to a request so they waste nothing); the bursts are
interleaved over the channels, each of which sustains min(its streaming rate, in-flight requests x
burst / latency) bytes a cycle; the fetch occupies the DRAM for bursts x burst / rate cycles and its
last byte arrives ``latency`` cycles after that.

Calibration (SpAtten's HBM2, stated in ``SpAttenArch``): Ramulator2 on the official configuration
(HBM2_8Gb, HBM2_2Gbps, FR-FCFS, RoBaRaCoCh, 16 channels) running SpAtten's gather pattern sustains
about 15.1 B/cycle per channel with unlimited pending requests and about 13 B/cycle with the
official fetcher's 16 pending 32-B requests per channel (205-220 B/cycle in all). A 40-cycle
latency makes 16 x 32 B / 40 = 12.8 B/cycle a channel: 205 B/cycle for 16 channels, 26 for the
2 channels of SpAtten_1/8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DRAM:
    channels: int
    channel_bytes_per_cycle: float = 15.1   # streaming rate of one channel, unlimited requests in flight
    latency: int = 40                       # cycles from request to data
    max_inflight: int = 16                  # requests a channel's fetcher keeps pending
    burst_bytes: int = 32

    def __post_init__(self) -> None:
        for name in ("channels", "channel_bytes_per_cycle", "latency", "max_inflight", "burst_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"dram: {name} must be positive, got {getattr(self, name)!r}")

    @property
    def channel_rate(self) -> float:
        """Sustained bytes a cycle of one channel: its streaming rate, or what the requests in
        flight cover over one latency (Little's law), whichever is lower."""
        return min(self.channel_bytes_per_cycle, self.max_inflight * self.burst_bytes / self.latency)

    @property
    def sustained_bytes_per_cycle(self) -> float:
        return self.channels * self.channel_rate

    def bursts(self, rows: int, row_bytes: float, packed: bool = False) -> int:
        if rows <= 0 or row_bytes <= 0:
            return 0
        if packed:
            return math.ceil(rows * row_bytes / self.burst_bytes)
        return rows * math.ceil(row_bytes / self.burst_bytes)

    def fetch(self, bursts: int) -> tuple[float, float]:
        """(cycles the DRAM is occupied, latency to the last byte) of ``bursts`` bursts, interleaved
        over as many channels as there are bursts (at most all of them)."""
        if bursts <= 0:
            return 0.0, 0.0
        rate = min(self.channels, bursts) * self.channel_rate
        return bursts * self.burst_bytes / rate, float(self.latency)
