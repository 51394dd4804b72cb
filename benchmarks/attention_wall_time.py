"""Wall time on this CPU, SpAtten-pruned vs unpruned, measured in the same run (issue: SpAtten runtime).

* Encoder: all-MiniLM-L6-v2 on 512-token inputs; Hugging Face's own forward (sdpa) vs the SpAtten
  runtime keeping 100 %, 50 % and 25 % of the tokens (one ratio per layer after the first).
* Decoder: SmolLM2-135M generating 32 tokens after a 1024-token context; Hugging Face's generate
  vs the SpAtten runtime with the KV cache pruned to 256 tokens per layer (and unpruned, to show
  the runtime's own overhead).

Median of --repeats runs after one warm-up, candidates interleaved with the baseline; prints the
ratios and writes JSON.  Usage: python benchmarks/attention_wall_time.py [--repeats 5] [--out F]
"""
from __future__ import annotations


import torch

from sparsetx.attention.decoder import DecoderConfig, spatten_decoder
from sparsetx.attention.encoder import SpAttenConfig, spatten
from sparsetx.data.text import shakespeare_plays
from sparsetx.models import load_model, load_tokenizer
from timing import bench_args, interleaved, machine, write_result


def text() -> str:
    plays = shakespeare_plays()["heldout"]
    return " ".join(plays[k] for k in sorted(plays))


@torch.no_grad()
def encoder_bench(repeats: int) -> dict:
    model, tok = load_model("minilm"), load_tokenizer("minilm")
    enc = tok(text()[:20000], return_tensors="pt", truncation=True, max_length=512)
    layers = model.config.num_hidden_layers

    def run(keep):
        if keep is None:
            return lambda: model(**enc)
        sched = [1.0] + [keep] * (layers - 1)
        def f():
            with spatten(model, SpAttenConfig(token_keep=sched)):
                model(**enc)
        return f

    cases = {"hf_dense": run(None), "spatten_keep_1.0": run(1.0), "spatten_keep_0.5": run(0.5), "spatten_keep_0.25": run(0.25)}
    med = interleaved(cases, repeats)
    return {"tokens": int(enc.input_ids.shape[1]), "median_s": med,
            "speedup_vs_hf_dense": {k: med["hf_dense"] / v for k, v in med.items()}}


@torch.no_grad()
def decoder_bench(repeats: int, new_tokens: int = 32) -> dict:
    model, tok = load_model("smollm2"), load_tokenizer("smollm2")
    ids = tok(text(), return_tensors="pt").input_ids[:, :1024]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def run(cfg):
        if cfg is None:
            return lambda: model.generate(input_ids=ids, **kw)
        def f():
            with spatten_decoder(model, cfg):
                model.generate(input_ids=ids, **kw)
        return f

    cases = {"hf_dense": run(None), "spatten_unpruned": run(DecoderConfig()), "spatten_kv256": run(DecoderConfig(kv_budget=256))}
    med = interleaved(cases, repeats)
    return {"context": int(ids.shape[1]), "new_tokens": new_tokens, "median_s": med,
            "speedup_vs_hf_dense": {k: med["hf_dense"] / v for k, v in med.items()}}


def main(argv=None) -> dict:
    args = bench_args(__doc__, "benchmarks/results/attention_wall_time.json", argv)
    result = {"machine": machine(args.threads), "repeats": args.repeats,
              "encoder": encoder_bench(args.repeats), "decoder": decoder_bench(args.repeats)}
    for part in ("encoder", "decoder"):
        print(f"{part}:")
        for name, t in result[part]["median_s"].items():
            print(f"  {name:20s} {t * 1000:9.1f} ms   x{result[part]['speedup_vs_hf_dense'][name]:.2f} vs hf_dense")
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
