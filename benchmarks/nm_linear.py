"""nm_linear vs torch.nn.functional.linear (dense weight) vs torch.sparse CSR, in one run.

Shapes of BERT-base (768x768, 3072x768, 768x3072 as out x in) and MiniLM (384x384, 1536x384,
384x1536); tokens T in {1, 16, 128, 512}; patterns 2:4, 4:8, 2:8, 1:8, 1:16; 1 and 2 threads.
Each case: one warm-up, then --repeats rounds with the three methods interleaved; the median time
of each. Prints a markdown table of speedups over F.linear with the ideal M/N beside them, writes
JSON and a plot.  Usage: python benchmarks/nm_linear.py [--repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsetx.formats.packed import pack_nm, packed_bytes
from sparsetx.kernels.loader import library
from sparsetx.kernels.nm_linear import KernelWeight, nm_linear
from sparsetx.nm.mask import apply_mask, nm_mask
from sparsetx.nm.pattern import NMPattern
from timing import interleaved, per_call

SHAPES = {"bert 768x768": (768, 768), "bert 3072x768": (3072, 768), "bert 768x3072": (768, 3072),
          "minilm 384x384": (384, 384), "minilm 1536x384": (1536, 384), "minilm 384x1536": (384, 1536)}
PATTERNS = ("2:4", "4:8", "2:8", "1:8", "1:16")
TOKENS = (1, 16, 128, 512)


def bench_case(out, inp, pattern, tokens, threads, repeats):
    torch.set_num_threads(threads)
    p = NMPattern.parse(pattern)
    w = torch.randn(out, inp).half().float()  # fp16-exact values: the fp16-packed weight is the same matrix
    w = apply_mask(w, nm_mask(w.abs(), p))
    kw = KernelWeight.from_packed(pack_nm(w, p))
    csr = w.to_sparse_csr()
    x = torch.randn(tokens, inp)
    ref = F.linear(x, w)
    err = float((nm_linear(x, kw, threads=threads) - ref).abs().max())
    fns = {"dense": lambda: F.linear(x, w), "nm": lambda: nm_linear(x, kw, threads=threads),
           "csr": lambda: torch.sparse.mm(csr, x.t())}
    if tokens == 1:  # memory-bound: fp16 values (F16C) halve the bytes the kernel streams
        kw16 = KernelWeight.from_packed(pack_nm(w, p, torch.float16))
        fns["nm_fp16"] = lambda: nm_linear(x, kw16, threads=threads)
    inner = max(1, int(1e-2 / max(per_call(fns["dense"]), 1e-6)))  # ~10 ms of dense calls per timing sample
    med = interleaved(fns, repeats, inner)
    # T = 1 is memory-bound: its target is the byte ratio of the fp32 dense weight to the packed one
    byte_ratio = out * inp * 4 / packed_bytes((out, inp), p, value_bits=32)
    row = {"out": out, "in": inp, "pattern": pattern, "tokens": tokens, "threads": threads, "max_abs_err": err,
           "median_s": med, "speedup_nm": med["dense"] / med["nm"], "speedup_csr": med["dense"] / med["csr"],
           "ideal": p.m / p.n, "byte_ratio": byte_ratio,
           "target": 0.6 * (byte_ratio if tokens == 1 else p.m / p.n)}
    if "nm_fp16" in med:
        row["speedup_nm_fp16"] = med["dense"] / med["nm_fp16"]
        row["byte_ratio_fp16"] = out * inp * 4 / packed_bytes((out, inp), p, value_bits=16)
        row["target_fp16"] = 0.6 * row["byte_ratio_fp16"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="MiniLM 384x1536, T 1 and 128, 1 thread")
    ap.add_argument("--out", default="benchmarks/results/nm_linear")
    args = ap.parse_args(argv)
    if library() is None:
        print("warning: the C kernel did not build; nm_linear runs its PyTorch fallback")
    shapes = {"minilm 384x1536": SHAPES["minilm 384x1536"]} if args.quick else SHAPES
    tokens = (1, 128) if args.quick else TOKENS
    threads = (1,) if args.quick else (1, 2)
    rows = []
    for th in threads:
        for name, (o, i) in shapes.items():
            for t in tokens:
                for pat in PATTERNS:
                    r = bench_case(o, i, pat, t, th, args.repeats)
                    r["shape"] = name
                    rows.append(r)
                    fp16 = f" fp16 x{r['speedup_nm_fp16']:.2f}" if "speedup_nm_fp16" in r else ""
                    print(f"threads {th} {name:16s} T={t:4d} {pat:5s} nm x{r['speedup_nm']:.2f}{fp16} "
                          f"(target {r['target']:.2f}) csr x{r['speedup_csr']:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nm_linear.json").write_text(json.dumps({"repeats": args.repeats, "torch": torch.__version__,
                                                     "rows": rows}, indent=1))
    lines = ["| threads | shape | T | " + " | ".join(PATTERNS) + " |", "|---" * (3 + len(PATTERNS)) + "|"]
    for th in threads:
        for name in shapes:
            for t in tokens:
                cells = [next(r for r in rows if r["threads"] == th and r["shape"] == name and r["tokens"] == t
                              and r["pattern"] == p) for p in PATTERNS]
                lines.append(f"| {th} | {name} | {t} | " + " | ".join(
                    f"{c['speedup_nm']:.2f}" + (f" / fp16 {c['speedup_nm_fp16']:.2f}" if "speedup_nm_fp16" in c else "")
                    + f" (csr {c['speedup_csr']:.2f})" for c in cells) + " |")
    met = sum(r["speedup_nm"] >= r["target"] for r in rows if r["tokens"] == 1 or r["tokens"] >= 128)
    judged = sum(1 for r in rows if r["tokens"] == 1 or r["tokens"] >= 128)
    beats_csr = sum(r["speedup_nm"] > r["speedup_csr"] for r in rows)
    met16 = sum(r["speedup_nm_fp16"] >= r["target_fp16"] for r in rows if "speedup_nm_fp16" in r)
    n16 = sum("speedup_nm_fp16" in r for r in rows)
    lines += ["", f"Target (T >= 128: 0.6 x M/N; T = 1: 0.6 x dense fp32 / packed fp32 bytes) met in {met} of {judged} "
              f"cases; T = 1 with fp16 values against 0.6 x dense fp32 / packed fp16 bytes: {met16} of {n16}; "
              f"faster than torch.sparse CSR in {beats_csr} of {len(rows)}."]
    table = "\n".join(lines)
    (out / "nm_linear.md").write_text("Speedup of nm_linear over F.linear (ideal M/N: 2:4 2, 4:8 2, 2:8 4, 1:8 8, "
                                      "1:16 16); T = 1 also with fp16 values; csr = torch.sparse CSR\n\n"
                                      + table + "\n")
    print(table)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in tokens:
        pts = [(r["ideal"], r["speedup_nm"]) for r in rows if r["tokens"] == t and r["threads"] == threads[0]]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=f"T={t}", s=14)
    ax.plot([1, 16], [1, 16], "k--", lw=0.8, label="ideal M/N")
    ax.axhline(1, color="gray", lw=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("ideal speedup M/N")
    ax.set_ylabel("measured speedup over F.linear")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "nm_linear.png", dpi=120)
    print(f"wrote {out}/nm_linear.json, nm_linear.md, nm_linear.png")
    return rows


if __name__ == "__main__":
    main()
