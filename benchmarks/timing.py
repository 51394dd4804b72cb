"""Timing helpers shared by the benchmarks: medians of interleaved runs after a warm-up."""
from __future__ import annotations

import argparse
import platform
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


def bench_args(doc: str, out: str, argv=None, repeats: int = 5, threads: int | None = None) -> argparse.Namespace:
    """--repeats, --threads (set for torch here; default ``threads``, else torch's) and --out, the
    flags every benchmark takes."""
    import torch

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=threads or torch.get_num_threads())
    p.add_argument("--out", default=out)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def machine(threads: int) -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "threads": threads, "torch": torch.__version__}


def write_result(result: dict, out: str) -> dict:
    """The result as JSON at ``out`` (folders made), announced."""
    import json
    from pathlib import Path

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result
