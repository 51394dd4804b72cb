"""Top-k for the SpAtten runtime: C quick-select vs torch.topk vs a stable sort, at the runtime's
sizes (n scores, keep half), one thread by default. Median of --repeats rounds after a warm-up, interleaved.
Usage: python benchmarks/topk.py [--repeats 7]"""
from __future__ import annotations

import torch

from sparsetx.kernels.topk import topk_indices
from timing import bench_args, interleaved, per_call, write_result

SIZES = (16, 64, 256, 1024, 4096, 16384)


def main(argv=None):
    args = bench_args(__doc__, "benchmarks/results/topk.json", argv, repeats=7, threads=1)
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
    write_result({"repeats": args.repeats, "threads": args.threads, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
