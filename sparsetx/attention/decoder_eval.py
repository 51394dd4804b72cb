"""Decoder evaluation: perplexity and agreement with the dense model against the KV budget
(SpAtten cascade vs window, StreamingLLM-style sink + window, H2O-style per-layer scores), and
progressive quantization (perplexity, bytes fetched, refetch rate) per bit split and threshold."""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import DynamicCache

from ..adapters import family_of
from ..data.text import shakespeare_plays, wikipedia_articles
from ..models import load_model, load_tokenizer
from .decoder import DecoderConfig, spatten_decoder

console = Console(stderr=True)


@dataclass
class Streamed:
    """One streamed pass: per-token NLL and argmax of tokens prefill..N-1, and the logits that
    predicted them ((N - prefill, vocab), when asked for); ``runtime`` is None for the dense pass."""

    nll: list[float]
    preds: list[int]
    runtime: object | None = None
    logits: torch.Tensor | None = None


@torch.no_grad()
def streaming_pass(model, ids: torch.Tensor, config: DecoderConfig | None, prefill: int,
                   keep_logits: bool = False, within=None) -> Streamed:
    """Prefill ``prefill`` tokens, then feed the rest one at a time through the (pruned) cache,
    each token at its true position in the text (however many tokens the cache evicted).

    ``config``: the SpAtten runtime's settings (None: the model as it is, inside ``within``, a
    context manager such as another library's cache compression, when given)."""
    if not 0 < prefill < ids.shape[1]:
        raise ValueError(f"prefill {prefill} must leave tokens to stream (the text has {ids.shape[1]} tokens)")
    cache = DynamicCache()
    cache_kw = family_of(model, decoder=True).cache_kwargs(model, cache)
    out = Streamed([], [])
    kept = []

    def last_logits(start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(start, stop).unsqueeze(0)
        return model(input_ids=ids[:, start:stop], position_ids=pos, use_cache=True, **cache_kw).logits[:, -1]

    def run():
        logits = last_logits(0, prefill)
        for t in range(prefill, ids.shape[1]):
            out.nll.append(float(F.cross_entropy(logits, ids[:, t])))
            out.preds.append(int(logits.argmax(-1)))
            if keep_logits:
                kept.append(logits[0].clone())
            if t + 1 < ids.shape[1]:
                logits = last_logits(t, t + 1)

    if config is None:
        with within if within is not None else contextlib.nullcontext():
            run()
    else:
        with spatten_decoder(model, config) as rt:
            run()
        out.runtime = rt
    if keep_logits:
        out.logits = torch.stack(kept)
    return out


def eval_texts(words: int = 3000) -> dict[str, str]:
    """Held-out Shakespeare (Macbeth onwards) and Wikipedia, first ``words`` words each."""
    plays = shakespeare_plays()["heldout"]
    shakes = " ".join(plays[k] for k in sorted(plays))
    wiki = "\n".join(wikipedia_articles().values())
    return {"shakespeare": " ".join(shakes.split()[:words]), "wikipedia": " ".join(wiki.split()[:words])}


@dataclass
class DecoderEvalConfig:
    model: str = "smollm2"
    context: int = 512                 # tokens per text (prompt + streamed)
    prefill: int = 64                  # tokens prefilled before streaming
    budgets: tuple[int, ...] = (64, 128, 256)
    policies: tuple[str, ...] = ("cascade", "h2o", "window", "sink")
    quant: tuple[tuple[int, int, int], ...] = ((10, 4, 6), (12, 4, 8))   # (k bits, k lsb bits, v bits)
    thresholds: tuple[float, ...] = (0.05, 0.1, 0.2)
    out: str = "runs/decoder-eval"
    texts: dict = field(default_factory=dict)


def decoder_eval(cfg: DecoderEvalConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(cfg.model, fast=True), load_tokenizer(cfg.model)
    texts = cfg.texts or eval_texts()
    rows, quant_rows = [], []
    jobs = [(name, None, None) for name in texts] + [(n, p, b) for n in texts for p in cfg.policies for b in cfg.budgets]
    with Progress(console=console) as bar:
        task = bar.add_task("KV budget sweep", total=len(jobs))
        dense_preds = {}
        for name, policy, budget in jobs:
            ids = tok(texts[name], return_tensors="pt").input_ids[:, :cfg.context]
            conf = None if policy is None else DecoderConfig(kv_budget=budget, policy=policy)
            streamed = streaming_pass(model, ids, conf, cfg.prefill)
            nll, preds = streamed.nll, streamed.preds
            if policy is None:
                dense_preds[name] = preds
            agree = sum(a == b for a, b in zip(preds, dense_preds[name])) / len(preds)
            rows.append({"text": name, "policy": policy or "dense", "kv_budget": budget or ids.shape[1],
                         "perplexity": math.exp(sum(nll) / len(nll)), "top1_agreement": agree, "tokens": len(nll)})
            bar.advance(task)
        qjobs = [(n, q, t) for n in texts for q in cfg.quant for t in cfg.thresholds]
        task = bar.add_task("progressive quantization", total=len(qjobs))
        for name, (kb, lsb, vb), tau in qjobs:
            ids = tok(texts[name], return_tensors="pt").input_ids[:, :cfg.context]
            with torch.no_grad(), spatten_decoder(model, DecoderConfig(k_bits=kb, lsb_bits=lsb, v_bits=vb,
                                                                      requant_threshold=tau)) as rt:
                logits = model(input_ids=ids, use_cache=True).logits
            loss = float(F.cross_entropy(logits[0, :-1], ids[0, 1:]))
            stats = [s for step in rt.stats for s in step]
            fp16 = sum(s["kv_bytes_fp16"] for s in stats)
            quant_rows.append({"text": name, "k_bits": f"{kb - lsb}+{lsb}", "v_bits": vb, "threshold": tau,
                               "perplexity": math.exp(loss),
                               "rows_refetched": sum(s["rows_refetched"] for s in stats) / sum(s["rows"] for s in stats),
                               "bytes_vs_fp16": sum(s["kv_bytes_quantized"] for s in stats) / fp16,
                               "bytes_msb_only_vs_fp16": sum(s["k_bytes_msb"] + s["v_bytes"] for s in stats) / fp16})
            bar.advance(task)
        for name in texts:  # the unquantized reference perplexity over the same full pass
            ids = tok(texts[name], return_tensors="pt").input_ids[:, :cfg.context]
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            quant_rows.append({"text": name, "k_bits": "fp32", "v_bits": 32, "threshold": None,
                               "perplexity": math.exp(float(F.cross_entropy(logits[0, :-1], ids[0, 1:]))),
                               "rows_refetched": 0.0, "bytes_vs_fp16": 2.0, "bytes_msb_only_vs_fp16": 2.0})
    result = {"config": {k: v for k, v in cfg.__dict__.items() if k != "texts"}, "kv": rows, "quant": quant_rows,
              "note": "SmolLM2-135M dequantized from its Q4_1 GGUF: perplexities are those of the 4-bit checkpoint"}
    (out / "decoder_eval.json").write_text(json.dumps(result, indent=1))
    plot_decoder_eval(result, out / "decoder_eval.png")
    return result


def decoder_tables(result: dict) -> list[Table]:
    kv = Table(title="SmolLM2: perplexity / top-1 agreement with dense vs KV budget (streamed, teacher-forced)")
    for col in ("text", "policy", "KV budget", "perplexity", "top-1 agreement"):
        kv.add_column(col, justify="right")
    for r in result["kv"]:
        kv.add_row(r["text"], r["policy"], str(r["kv_budget"]), f"{r['perplexity']:.2f}", f"{r['top1_agreement']:.3f}")
    q = Table(title="Progressive quantization: perplexity and K/V bytes fetched (relative to fp16)")
    for col in ("text", "K bits", "V bits", "threshold", "perplexity", "rows refetched", "bytes (MSB only)", "bytes (with refetch)"):
        q.add_column(col, justify="right")
    for r in result["quant"]:
        q.add_row(r["text"], r["k_bits"], str(r["v_bits"]), "-" if r["threshold"] is None else f"{r['threshold']:.2f}",
                  f"{r['perplexity']:.2f}", f"{r['rows_refetched']:.3f}", f"{r['bytes_msb_only_vs_fp16']:.3f}",
                  f"{r['bytes_vs_fp16']:.3f}")
    return [kv, q]


def plot_decoder_eval(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(dict.fromkeys(r["text"] for r in result["kv"]))
    fig, axes = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4), squeeze=False)
    for ax, text in zip(axes[0], texts):
        dense = next(r for r in result["kv"] if r["text"] == text and r["policy"] == "dense")
        ax.axhline(dense["perplexity"], color="gray", ls="--", label="dense")
        for policy in dict.fromkeys(r["policy"] for r in result["kv"] if r["policy"] != "dense"):
            pts = sorted((r["kv_budget"], r["perplexity"]) for r in result["kv"] if r["text"] == text and r["policy"] == policy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV budget (tokens per layer)")
        ax.set_ylabel("perplexity")
        ax.set_title(text)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
