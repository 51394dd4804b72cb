"""SmolLM2's LM head shape (49,152 x 576) for one token: Int8Linear (int8 weights, per-row scales,
C kernel) against fp32 F.linear, interleaved, 1 thread by default; the error against the
dequantised product is printed too.
Usage: python benchmarks/int8_head.py [--repeats 20] [--threads 1]"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsetx.kernels.int8_linear import Int8Linear
from timing import bench_args, interleaved_stats, write_result


def main(argv=None):
    args = bench_args(__doc__, "benchmarks/results/int8_head.json", argv, repeats=20, threads=1)
    torch.manual_seed(0)
    w, x = torch.randn(49152, 576), torch.randn(1, 1, 576)
    head = Int8Linear(w)
    err = float((head(x)[0, 0] - head.dense() @ x[0, 0]).abs().max())
    stats = interleaved_stats({"fp32 F.linear": lambda: F.linear(x, w), "Int8Linear": lambda: head(x)}, args.repeats)
    ms = {k: v["median_s"] * 1000 for k, v in stats.items()}
    print(f"49152 x 576, one token, {args.threads} thread(s): fp32 {ms['fp32 F.linear']:.2f} ms, "
          f"int8 {ms['Int8Linear']:.2f} ms (x{ms['fp32 F.linear'] / ms['Int8Linear']:.2f}); "
          f"max |int8 kernel - dequantised product| {err:.1e}")
    write_result({"threads": args.threads, "stats": stats, "max_abs_error": err}, args.out)


if __name__ == "__main__":
    main()
