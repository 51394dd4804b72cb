"""``sparsetx attention-eval`` for encoders: accuracy and embedding fidelity against the token and
head keep ratios, for SpAtten's cascade and same-budget baselines."""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from ..data.sentiment import sentiment_splits
from ..data.text import wikipedia_articles
from ..evaluate import accuracy, embedding_similarity, text_passages
from ..models import load_model, load_tokenizer
from .encoder import TOKEN_POLICIES, SpAttenConfig, spatten

console = Console(stderr=True)


@dataclass
class EncoderEvalConfig:
    classifier: str | None          # fine-tuned classifier folder (accuracy); None skips accuracy
    encoder: str = "minilm"         # sentence encoder (embedding cosine to itself unpruned)
    token_keeps: tuple[float, ...] = (1.0, 0.75, 0.5, 0.3)
    head_keeps: tuple[float, ...] = (1.0, 0.75, 0.5)
    policies: tuple[str, ...] = TOKEN_POLICIES
    examples: int = 512
    passages: int = 64
    max_length: int = 128
    out: str = "runs/attention-eval"


def _pruned(model, cfg: SpAttenConfig | None):
    """The SpAtten runtime for ``cfg``, or nothing (the unpruned model) when cfg is None."""
    return nullcontext() if cfg is None else spatten(model, cfg)


def encoder_eval(cfg: EncoderEvalConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    grid = [(policy, keep, 1.0) for policy in cfg.policies for keep in cfg.token_keeps]
    grid += [("cascade", 1.0, h) for h in cfg.head_keeps if h < 1.0]
    encoder, reference = load_model(cfg.encoder, fast=True), load_model(cfg.encoder, fast=True)
    enc_tok = load_tokenizer(cfg.encoder)
    texts = text_passages(" ".join(list(wikipedia_articles().values())), words=96, limit=cfg.passages)
    clf = load_model(cfg.classifier, fast=True) if cfg.classifier else None
    clf_tok = load_tokenizer(cfg.classifier) if cfg.classifier else None
    data = sentiment_splits()["test"].subset(cfg.examples)
    dense_acc = accuracy(clf, clf_tok, data, progress=False, max_length=128) if clf is not None else None
    for policy, keep, head in track(grid, description="attention-eval", console=console):
        sp = SpAttenConfig(token_keep=keep, head_keep=head, token_policy=policy)
        with _pruned(encoder, sp):
            row = {"method": policy, "token_keep": keep, "head_keep": head,
                   "embedding_cosine": embedding_similarity(encoder, reference, enc_tok, texts)}
        if clf is not None:
            with _pruned(clf, sp):
                row["accuracy"] = accuracy(clf, clf_tok, data, progress=False, max_length=128)
        rows.append(row)
    result = {"config": cfg.__dict__, "dense_accuracy": dense_acc, "rows": rows,
              "data": {"accuracy": f"Rotten Tomatoes test, first {len(data)} examples",
                       "embedding_cosine": f"{len(texts)} Wikipedia passages of 96 words"}}
    (out / "encoder_eval.json").write_text(json.dumps(result, indent=1))
    plot_encoder_eval(result, out / "encoder_eval.png")
    return result


def encoder_table(result: dict) -> Table:
    table = Table(title="SpAtten on encoders: metric vs keep ratio (token_keep = fraction at the last layer)")
    for col in ("method", "token keep", "head keep", "accuracy", "embedding cosine"):
        table.add_column(col, justify="right")
    if result["dense_accuracy"] is not None:
        table.add_row("dense", "1.0", "1.0", f"{result['dense_accuracy']:.4f}", "1.0000")
    for r in result["rows"]:
        table.add_row(r["method"], f"{r['token_keep']:.2f}", f"{r['head_keep']:.2f}",
                      f"{r['accuracy']:.4f}" if "accuracy" in r else "-", f"{r['embedding_cosine']:.4f}")
    return table


def plot_encoder_eval(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("accuracy", "embedding_cosine") if any(m in r for r in result["rows"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method in dict.fromkeys(r["method"] for r in result["rows"]):
            pts = sorted((r["token_keep"], r[metric]) for r in result["rows"]
                         if r["method"] == method and r["head_keep"] == 1.0 and metric in r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xlabel("token keep ratio (last layer)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.suptitle("Cascade token pruning vs same-budget baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
