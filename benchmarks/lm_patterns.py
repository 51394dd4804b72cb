"""Which N:M patterns keep SmolLM2-135M's perplexity? One-shot activation-aware pruning (Wanda's
|W| x ||X||, calibrated as `sparsetx prune --model smollm2 --criterion activation` does: windows of
512 tokens from the end of the Wikipedia excerpt) of every block Linear, each pattern or mix scored
on the perplexity windows of benchmarks/peers.py (the excerpt's first 4 x 512 tokens, tokens
128..511 of each, full context, no KV pruning), fp32 values.

Usage: python benchmarks/lm_patterns.py [--batches 8] [SPEC ...]
A SPEC is a pattern, then optional REGEX=N:M overrides, ';'-separated: "6:8;down_proj=7:8".
Writes benchmarks/results/lm_patterns.json."""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import hf_nll, wiki_ids  # noqa: E402

from sparsetx.models import load_model, load_tokenizer  # noqa: E402
from sparsetx.nm.prune import NMConfig, sparsify  # noqa: E402
from sparsetx.train import lm_calibration_batches  # noqa: E402

SPECS = ["2:4", "4:8", "3:4", "6:8", "7:8", "6:8;self_attn=7:8", "6:8;down_proj=7:8",
         r"6:8;down_proj=7:8;layers\.(0|1|29)\.=7:8"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=SPECS)
    ap.add_argument("--batches", type=int, default=8, help="calibration batches of 8 windows of 512 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "lm_patterns.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok, dense = load_tokenizer("smollm2"), load_model("smollm2")
    ids = wiki_ids(tok, 4 * 512)
    windows = [ids[i * 512:(i + 1) * 512] for i in range(4)]
    calib = lm_calibration_batches(tok, args.batches)

    def ppl(model) -> float:
        return math.exp(statistics.fmean(x for w in windows for x in hf_nll(model, w, 128)))

    rows = [{"spec": "dense", "perplexity": ppl(dense)}]
    print(f"| pattern (one-shot, activation-aware) | Wikipedia ppl | vs dense |\n|---|---|---|\n"
          f"| dense | {rows[0]['perplexity']:.2f} | x1.00 |", flush=True)
    for spec in args.specs:
        pattern, *overrides = spec.split(";")
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        sparsify(model, NMConfig(pattern, criterion="activation", overrides=dict(o.rsplit("=", 1) for o in overrides)), calib)
        rows.append({"spec": spec, "perplexity": ppl(model), "seconds": time.perf_counter() - t})
        print(f"| {spec} | {rows[-1]['perplexity']:.2f} | x{rows[-1]['perplexity'] / rows[0]['perplexity']:.2f} |", flush=True)
        del model
    Path(args.out).write_text(json.dumps({"protocol": __doc__.split("Usage")[0].strip(), "calibration_windows":
                                          args.batches * 8, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
