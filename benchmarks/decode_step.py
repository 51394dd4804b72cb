"""The SpAtten decoder runtime's fast one-token step against its full path (DecoderConfig(fast_step=
False)), in the same process, the fast step both ways: every layer in one C call (llama_step, the
default) and its Python loop over the layers (use_c = False on the runtime's step); SmolLM2 (dense, or a packed folder), a 2048-token Wikipedia prompt,
the KV cache cut to 512 tokens; per round and path, a fresh prefill, then 24 one-token steps, the
median of the last 20; rounds interleaved with the order alternated.

Usage: python benchmarks/decode_step.py [--model smollm2|DIR] [--int8-head] [--rounds 3] [--threads 1]
Writes benchmarks/results/decode_step.json (one entry per model)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import wiki_ids  # noqa: E402

from sparsetx.adapters import family_of  # noqa: E402
from sparsetx.attention.decoder import DecoderConfig, spatten_decoder  # noqa: E402
from sparsetx.models import load_model, load_tokenizer  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "decode_step.json"


PATHS = ("full path", "python step", "c step")


def step_ms(model, prompt: torch.Tensor, path: str, steps: int = 24, skip: int = 4) -> float:
    with torch.inference_mode(), spatten_decoder(model, DecoderConfig(kv_budget=512, fast_step=path != "full path")) as rt:
        if rt.fast is not None:
            rt.fast.use_c = path == "c step"   # this runtime's step only (the class default stays)
        cache = DynamicCache()
        kw = family_of(model, decoder=True).cache_kwargs(model, cache)
        nxt = model(input_ids=prompt, use_cache=True, **kw).logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            nxt = model(input_ids=nxt, use_cache=True, **kw).logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
    return statistics.median(times[skip:]) * 1000


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--int8-head", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, fast=True, int8_head=args.int8_head)
    prompt = torch.tensor([wiki_ids(load_tokenizer("smollm2"), 2100)[-2048:]])
    runs = {path: [] for path in PATHS}
    for r in range(args.rounds):
        for path in (PATHS[r % 3:] + PATHS[:r % 3]):      # the order rotated each round
            runs[path].append(step_ms(model, prompt, path))
    med = {k: statistics.median(v) for k, v in runs.items()}
    key = f"{args.model}{' + int8 head' if args.int8_head else ''}, {args.threads}t"
    print(f"{key}: ms a step, median (min-max) of {args.rounds} rounds")
    for path in PATHS:
        print(f"  {path:12s} {med[path]:6.1f} ({min(runs[path]):.1f}-{max(runs[path]):.1f})  "
              f"x{med['full path'] / med[path]:.2f} the full path")
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results[key] = {"ms_per_step": runs, "median_ms": med, "speedup": {p: med["full path"] / med[p] for p in PATHS},
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    OUT.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
