"""Where a packed int8 MiniLM's forward goes: the whole forward, its N:M linears and its attention
(int8 and fp32 kernels) each timed alone, 5 calls back to back as inside a forward, and scaled
by the layer count, interleaved; then the whole forward with the int8 attention against the same
model on the fp32 attention kernel (max |logit difference| printed beside). The pieces run
through Python and their own thread teams, not the one C call a forward makes, so "the rest" is
an estimate and can come out negative on a noisy machine.
Usage: python benchmarks/forward_split.py [--model runs/peers-idp8/candidate-2_8] [--tokens 128]
       [--repeats 12] [--threads 1]"""
from __future__ import annotations

import argparse

import torch

from sparsetx.kernels.attention import encoder_attention
from sparsetx.kernels.nm_linear import SparseLinear
from sparsetx.models import load_model
from timing import interleaved_stats, machine, write_result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/peers-idp8/candidate-2_8", help="a packed int8 MiniLM classifier folder")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/forward_split.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir, tokens = args.model, args.tokens
    model = load_model(model_dir, task="sentiment", fast=True, activation_bits=8)
    plan = getattr(model.base_model.encoder, "sparsetx_layers", None)
    if plan is None or plan.attention_bits != 8:
        raise SystemExit(f"{model_dir}: not an int8 N:M encoder that runs its layers in one C call")
    fp32_att = load_model(model_dir, task="sentiment", fast=True, activation_bits=8)
    fp32_att.base_model.encoder.sparsetx_layers.attention_bits = 32   # the same weights, the fp32 attention kernel

    cfg = model.config
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    d = cfg.hidden_size // heads
    ids = torch.randint(1000, 20000, (1, tokens))
    mask = torch.ones_like(ids)
    first = [m for n, m in model.named_modules() if isinstance(m, SparseLinear) and ".layer.0." in n]
    xs = [torch.randn(tokens, m.in_features) for m in first]
    q, k, v = (torch.randn(1, heads, tokens, d) for _ in range(3))
    with torch.inference_mode():
        diff = float((model(input_ids=ids, attention_mask=mask).logits
                      - fp32_att(input_ids=ids, attention_mask=mask).logits).abs().max())
        cases = {
            "forward, int8 attention": lambda: model(input_ids=ids, attention_mask=mask),
            "forward, fp32 attention": lambda: fp32_att(input_ids=ids, attention_mask=mask),
            "layer 0 N:M linears": lambda: [m(x) for m, x in zip(first, xs)],
            "attention int8 (one layer)": lambda: encoder_attention(q, k, v, d ** -0.5, bits=8),
            "attention fp32 (one layer)": lambda: encoder_attention(q, k, v, d ** -0.5, bits=32),
        }
        stats = interleaved_stats(cases, args.repeats, inner=5)   # back to back, as inside a forward
    ms = {name: s["median_s"] * 1000 for name, s in stats.items()}
    whole, lin, att = ms["forward, int8 attention"], layers * ms["layer 0 N:M linears"], layers * ms["attention int8 (one layer)"]
    print(f"{model_dir}, 1 x {tokens} tokens, {args.threads} thread(s), medians of {args.repeats}:")
    print(f"  forward {whole:.2f} ms = N:M linears {lin:.2f} (x{layers} layers) + int8 attention {att:.2f} "
          f"(fp32 kernel {layers * ms['attention fp32 (one layer)']:.2f}) + the rest {whole - lin - att:.2f}")
    print(f"  forward on the fp32 attention kernel {ms['forward, fp32 attention']:.2f} ms; "
          f"max |logit difference| {diff:.2e}")
    write_result({"machine": machine(args.threads), "model": model_dir, "tokens": tokens, "layers": layers,
                  "stats": stats, "max_abs_logit_difference": diff}, args.out)


if __name__ == "__main__":
    main()
