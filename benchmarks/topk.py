"""Top-k for the SpAtten runtime: C quick-select vs torch.topk vs a stable sort, at the runtime's
sizes (n scores, keep half), one thread. Median of --repeats rounds after a warm-up, interleaved.
Usage: python benchmarks/topk.py [--repeats 7]"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparsetx.kernels.topk import topk_indices
from timing import interleaved, per_call

SIZES = (16, 64, 256, 1024, 4096, 16384)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/topk.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print("| n | k | select (us) | torch.topk route (us) | stable sort (us) | bare torch.topk (us) | select vs route |")
    print("|---|---|---|---|---|---|---|")
    for n in SIZES:
        s, k = torch.randn(n, dtype=torch.float64), n // 2
        fns = {"select": lambda: topk_indices(s, k, "select"), "torch": lambda: topk_indices(s, k, "torch"),
               "sort": lambda: torch.sort(-s, stable=True).indices[:k].sort().values,
               "raw_topk": lambda: s.topk(k)}  # no tie guarantee, not ascending: a lower bound
        inner = max(1, int(2e-3 / max(per_call(fns["torch"], 3), 1e-7)))
        med = {name: t * 1e6 for name, t in interleaved(fns, args.repeats, inner).items()}
        rows.append({"n": n, "k": k, "median_us": med})
        print(f"| {n} | {k} | {med['select']:.1f} | {med['torch']:.1f} | {med['sort']:.1f} | {med['raw_topk']:.1f} | "
              f"x{med['torch'] / med['select']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
