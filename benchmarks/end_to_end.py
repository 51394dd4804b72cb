"""End to end on this CPU: dense vs 2:8-pruned (SparseLinear, the N:M kernel) vs 2:8 plus SpAtten
token pruning at 50 %, measured in one run (issue: fast CPU kernels).

* Encoder: the MiniLM classifier (all-MiniLM-L6-v2 with a sequence-classification head) on one
  sequence of 128 and of 512 tokens of Shakespeare; Hugging Face's own forward for the dense and the
  2:8 models, the SpAtten encoder runtime (keep 1.0 in layer 0, then 0.5) for the pruned runs.
* Decoder: SmolLM2-135M generating 32 tokens after a 512-token prompt; Hugging Face generate for
  dense and 2:8, the SpAtten decoder runtime with a KV cache of 256 tokens (50 % of the prompt).

Speed does not depend on accuracy, so the 2:8 models are one-shot magnitude-pruned. Median of
--repeats runs after one warm-up, cases interleaved.  Usage: python benchmarks/end_to_end.py
"""
from __future__ import annotations

import copy

import torch

from sparsetx.attention.decoder import DecoderConfig, spatten_decoder
from sparsetx.attention.encoder import SpAttenConfig, spatten
from sparsetx.data.text import shakespeare_plays
from sparsetx.kernels.loader import library
from sparsetx.kernels.nm_linear import to_sparse_linear
from sparsetx.models import load_model, load_tokenizer
from sparsetx.nm.prune import NMConfig, recorded_patterns, sparsify
from timing import bench_args, interleaved, machine, write_result

PATTERN = "2:8"


def text() -> str:
    plays = shakespeare_plays()["heldout"]
    return " ".join(plays[k] for k in sorted(plays))


def pruned_copy(model):
    twin = copy.deepcopy(model)
    sparsify(twin, NMConfig(PATTERN))
    return to_sparse_linear(twin, recorded_patterns(twin))


def within(ctx_factory, fn):
    def run():
        with ctx_factory():
            fn()
    return run


@torch.no_grad()
def encoder_bench(repeats: int) -> dict:
    dense = load_model("minilm", task="sentiment")
    sparse = pruned_copy(dense)
    tok = load_tokenizer("minilm")
    layers = dense.config.num_hidden_layers
    half = SpAttenConfig(token_keep=[1.0] + [0.5] * (layers - 1))
    out = {}
    for length in (128, 512):
        enc = tok(text()[:20000], return_tensors="pt", truncation=True, max_length=length)
        cases = {"dense": lambda: dense(**enc),
                 f"{PATTERN}": lambda: sparse(**enc),
                 "dense + tokens 50%": within(lambda: spatten(dense, half), lambda: dense(**enc)),
                 f"{PATTERN} + tokens 50%": within(lambda: spatten(sparse, half), lambda: sparse(**enc))}
        med = interleaved(cases, repeats)
        out[str(length)] = {"tokens": int(enc.input_ids.shape[1]), "median_s": med,
                            "speedup": {k: med["dense"] / v for k, v in med.items()}}
    return out


@torch.no_grad()
def decoder_bench(repeats: int, prompt: int = 512, new_tokens: int = 32) -> dict:
    dense = load_model("smollm2")
    sparse = pruned_copy(dense)
    ids = load_tokenizer("smollm2")(text(), return_tensors="pt").input_ids[:, :prompt]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    half = DecoderConfig(kv_budget=prompt // 2)
    cases = {"dense": lambda: dense.generate(input_ids=ids, **kw),
             f"{PATTERN}": lambda: sparse.generate(input_ids=ids, **kw),
             "dense + KV 50%": within(lambda: spatten_decoder(dense, half), lambda: dense.generate(input_ids=ids, **kw)),
             f"{PATTERN} + KV 50%": within(lambda: spatten_decoder(sparse, half),
                                           lambda: sparse.generate(input_ids=ids, **kw))}
    med = interleaved(cases, repeats)
    return {"prompt": int(ids.shape[1]), "new_tokens": new_tokens, "median_s": med,
            "speedup": {k: med["dense"] / v for k, v in med.items()}}


def main(argv=None) -> dict:
    args = bench_args(__doc__, "benchmarks/results/end_to_end.json", argv)
    if library() is None:
        print("warning: the C kernel did not build; SparseLinear runs its PyTorch fallback")
    result = {"machine": machine(args.threads), "repeats": args.repeats, "pattern": PATTERN,
              "encoder": encoder_bench(args.repeats), "decoder": decoder_bench(args.repeats)}
    lines = ["| workload | case | median ms | speedup vs dense |", "|---|---|---|---|"]
    parts = [(f"MiniLM classifier, {k} tokens", v) for k, v in result["encoder"].items()]
    parts.append((f"SmolLM2 generate {result['decoder']['new_tokens']} after {result['decoder']['prompt']}",
                  result["decoder"]))
    for title, part in parts:
        for name, t in part["median_s"].items():
            lines.append(f"| {title} | {name} | {t * 1000:.1f} | x{part['speedup'][name]:.2f} |")
    print("\n".join(lines))
    result["table"] = lines
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
