"""Timing helpers shared by the benchmarks: medians of interleaved runs after a warm-up."""
from __future__ import annotations

import statistics
import time


def per_call(fn, inner: int = 1) -> float:
    """Mean seconds per call over ``inner`` back-to-back calls."""
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner


def interleaved(cases: dict, repeats: int, inner: int = 1) -> dict[str, float]:
    """One warm-up each, then ``repeats`` rounds calling every case once per round (so drift in the
    machine's speed hits all cases alike); the median seconds per call of each."""
    for fn in cases.values():
        per_call(fn, inner)
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(per_call(fn, inner))
    return {name: statistics.median(t) for name, t in times.items()}
