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


def interleaved_stats(cases: dict, repeats: int, inner: int = 1, settle: float = 0.0,
                      rotate: bool = False) -> dict[str, dict]:
    """One warm-up each, then ``repeats`` rounds calling every case once per round (so drift in the
    machine's speed hits all cases alike): median, min and max seconds per call of each. ``rotate``
    turns the order by one case every round; ``settle`` idles that many seconds before each timed
    call (other runtimes' worker threads spin for a while after a call and would slow the next case)."""
    for fn in cases.values():
        per_call(fn, inner)
    names = list(cases)
    times = {name: [] for name in cases}
    for r in range(repeats):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            if settle:
                time.sleep(settle)
            times[name].append(per_call(cases[name], inner))
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": len(t)}
            for name, t in times.items()}


def allow_recompiles(limit: int = 64) -> None:
    """Let torch.compile keep ``limit`` graphs a function (its default, 8, falls back to eager
    without a word once several compiled models and input shapes share a function)."""
    import torch

    for name in ("recompile_limit", "cache_size_limit"):   # the name changed between releases
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, limit)


def interleaved(cases: dict, repeats: int, inner: int = 1) -> dict[str, float]:
    """The median seconds per call of each case (:func:`interleaved_stats`, fixed order)."""
    return {name: s["median_s"] for name, s in interleaved_stats(cases, repeats, inner).items()}


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
