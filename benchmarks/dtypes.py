"""Would bf16 or int8 values help here? Dense F.linear in fp32 vs bf16 vs dynamic int8 (torch.ao),
and nm_linear with fp32 vs fp16 vs int8 (per-row scales) values, on BERT-base shapes and SmolLM2's tied
head (49152 x 576), 1 thread by default, interleaved.
Usage: python benchmarks/dtypes.py [--repeats 5]"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from sparsetx.formats.packed import pack_nm
from sparsetx.kernels.nm_linear import KernelWeight, nm_linear
from sparsetx.nm.mask import apply_mask, nm_mask
from sparsetx.nm.pattern import NMPattern
from timing import bench_args, interleaved, per_call, write_result

SHAPES = {"768x768": (768, 768), "3072x768": (3072, 768), "768x3072": (768, 3072), "49152x576": (49152, 576)}


def main(argv=None):
    args = bench_args(__doc__, "benchmarks/results/dtypes.json", argv, threads=1)
    rows = []
    print("| shape | T | bf16 F.linear | int8 dynamic | nm 2:8 fp32 values | nm 2:8 fp16 values | nm 2:8 int8 values |"
          "  (speedup over fp32 F.linear)")
    print("|---|---|---|---|---|---|---|")
    for name, (o, i) in SHAPES.items():
        w = torch.randn(o, i).half().float()
        w28 = apply_mask(w, nm_mask(w.abs(), NMPattern(2, 8)))
        kw32 = KernelWeight.from_packed(pack_nm(w28, NMPattern(2, 8)))
        kw16 = KernelWeight.from_packed(pack_nm(w28, NMPattern(2, 8), torch.float16))
        kw8 = KernelWeight.from_packed(pack_nm(w28, NMPattern(2, 8), torch.int8), compact=True)
        lin = torch.nn.Linear(i, o, bias=False)
        lin.weight.data.copy_(w)
        with warnings.catch_warnings():  # torch.ao's eager quantization API is deprecated, still the reference here
            warnings.simplefilter("ignore")
            q8 = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        wb = w.bfloat16()
        for t in (1, 128):
            x = torch.randn(t, i)
            xb = x.bfloat16()
            fns = {"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb), "int8": lambda: q8(x),
                   "nm_fp32": lambda: nm_linear(x, kw32), "nm_fp16": lambda: nm_linear(x, kw16),
                   "nm_int8": lambda: nm_linear(x, kw8)}
            inner = max(1, int(1e-2 / max(per_call(fns["fp32"]), 1e-6)))
            med = interleaved(fns, args.repeats, inner)
            sp = {k: med["fp32"] / v for k, v in med.items()}
            rows.append({"shape": name, "tokens": t, "median_s": med, "speedup": sp})
            print(f"| {name} | {t} | {sp['bf16']:.2f} | {sp['int8']:.2f} | {sp['nm_fp32']:.2f} | {sp['nm_fp16']:.2f} | "
                  f"{sp['nm_int8']:.2f} |", flush=True)
    write_result({"threads": args.threads, "torch": torch.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
