"""torch.compile on a packed sparse model: eager vs compiled with static shapes vs compiled with
dynamic shapes, in one process, interleaved (median of N after a warm-up), one thread.

    .venv/bin/python benchmarks/compile.py --model runs/peers-idp8/candidate-1_8

`load_model(..., compile=True)` compiles with torch's default (the first shape static, dynamic
dimensions after a recompile), which is what a server with varying lengths gets; `dynamic=False`
compiles a graph per input shape. Writes benchmarks/results/compile.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparsetx.models import load_model
from timing import allow_recompiles, interleaved_stats

OUT = Path(__file__).resolve().parent / "results" / "compile.json"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a packed classifier folder")
    ap.add_argument("--shapes", default="128x1,128x8,512x1", help="LENGTHxBATCH,...")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    allow_recompiles()
    eager = load_model(args.model, task="sentiment", fast=True)
    dynamic = load_model(args.model, task="sentiment", fast=True, compile=True)
    static = load_model(args.model, task="sentiment", fast=True)
    static.requires_grad_(False)
    static.compile(dynamic=False)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    # every model sees every shape once first (the dynamic one recompiles with dynamic dimensions
    # on its second shape, as it would in service), then each shape is timed
    for length, batch in shapes + shapes:
        ids = torch.randint(1000, 2000, (batch, length))
        with torch.inference_mode():
            for m in (dynamic, static):
                m(input_ids=ids)
    for length, batch in shapes:
        ids = torch.randint(1000, 2000, (batch, length))

        def case(m):
            def run():
                with torch.inference_mode():
                    return m(input_ids=ids).logits
            return run

        cases = {"eager": case(eager), "compiled, dynamic shapes": case(dynamic), "compiled, static shapes": case(static)}
        ref = cases["eager"]()
        diff = max(float((cases[k]() - ref).abs().max()) for k in cases)
        t = interleaved_stats(cases, args.repeats, settle=0.02, rotate=True)
        row = {"tokens": length, "batch": batch, "times": t, "max_abs_diff": diff,
               "speedup": {k: t["eager"]["median_s"] / v["median_s"] for k, v in t.items()}}
        rows.append(row)
        print(f"{length}x{batch}: " + ", ".join(f"{k} {v['median_s'] * 1e3:.1f} ms (x{row['speedup'][k]:.2f})"
                                                for k, v in t.items()) + f"; max |diff| {diff:.1e}", flush=True)
    result = {"model": args.model, "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
