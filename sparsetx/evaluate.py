"""Held-out metrics: task accuracy, embedding fidelity (encoders), perplexity (causal LMs)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import nn

from .data.sentiment import TextClassification


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def accuracy(model: nn.Module, tokenizer, data: TextClassification, batch_size: int = 64, max_length: int = 64,
             progress: bool = True, desc: str = "accuracy") -> float:
    """Fraction of ``data`` whose argmax logit equals the label."""
    model.eval()
    correct = 0
    chunks = list(zip(batches(data.texts, batch_size), batches(data.labels, batch_size)))
    for texts, labels in track(chunks, description=desc, disable=not progress, transient=True):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        logits = model(**enc).logits
        correct += int((logits.argmax(-1) == torch.tensor(labels)).sum())
    return correct / len(data)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32,
                        max_length: int = 128, progress: bool = False) -> torch.Tensor:
    """Mean-pooled last hidden states (the all-MiniLM-L6-v2 sentence embedding), L2-normalised."""
    model.eval()
    body = getattr(model, "base_model", model)
    out = []
    for chunk in track(list(batches(texts, batch_size)), description="embeddings", disable=not progress, transient=True):
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        result = body(**enc)
        hidden = result.last_hidden_state
        # A token-pruning runtime returns its own mask of the tokens that survived to the end.
        kept = getattr(result, "attention_mask", None)
        mask = (kept if kept is not None else enc["attention_mask"]).unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def text_passages(text: str, words: int = 64, limit: int | None = 256) -> list[str]:
    """Cut a long text into consecutive passages of ``words`` words (the first ``limit``)."""
    tokens = text.split()
    passages = [" ".join(tokens[i:i + words]) for i in range(0, len(tokens) - words + 1, words)]
    return passages[:limit] if limit else passages


def embedding_similarity(model: nn.Module, reference: nn.Module, tokenizer, texts: list[str], **kw) -> float:
    """Mean cosine similarity between the model's and the reference's sentence embeddings."""
    a = sentence_embeddings(model, tokenizer, texts, **kw)
    b = sentence_embeddings(reference, tokenizer, texts, **kw)
    return float((a * b).sum(-1).mean())


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text: str, window: int = 512, max_windows: int | None = 16,
               progress: bool = False) -> float:
    """Perplexity of a causal LM over non-overlapping windows of ``window`` tokens."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    starts = list(range(0, len(ids) - 1, window))[:max_windows]
    nll, count = 0.0, 0
    for s in track(starts, description="perplexity", disable=not progress, transient=True):
        chunk = ids[s:s + window + 1].unsqueeze(0)
        if chunk.shape[1] < 2:
            continue
        logits = model(input_ids=chunk[:, :-1]).logits
        nll += float(F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return math.exp(nll / count)
