"""``sparsetx sim sweep``: N:M pattern x token keep x head keep x PE array on one accelerator model
(STA's unified engine running SpAtten's pruned attention), joined with the accuracy that the N:M and
SpAtten evaluations measured, and the Pareto front of accuracy against simulated latency."""
from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

from .arch import load_arch
from .run import keep_schedules, model_shape
from .sta import simulate_sta, sta_workload


def load_accuracy(nm_results: str | None, attention_results: str | None, nm_method: str = "IDP series"):
    """(dense accuracy, {pattern: acc}, {(token_keep, head_keep): acc}) from ``sparsetx compare``'s
    results.json and ``sparsetx attention-eval``'s JSON (either may be None)."""
    dense, nm, attn = None, {}, {}
    if nm_results:
        doc = json.loads(Path(nm_results).read_text())
        rows = doc.get("rows", {})
        if nm_method not in rows:
            raise ValueError(f"{nm_results}: no method {nm_method!r}; found {sorted(rows)}")
        nm = {p: r["test_acc"] for p, r in rows[nm_method].items()}
        dense = rows.get("dense", {}).get("dense", {}).get("test_acc")
    if attention_results:
        doc = json.loads(Path(attention_results).read_text())
        attn = {(r["token_keep"], r["head_keep"]): r["accuracy"] for r in doc["rows"] if r.get("method") == "cascade"}
        attn["dense"] = doc.get("dense_accuracy")
    return dense, nm, attn


def accuracy_of(pattern, tok, head, dense, nm, attn):
    """Measured where one evaluation covers the point; the sum of both measured drops otherwise
    (marked "estimated": neither evaluation measured the two kinds of pruning together)."""
    a_nm = dense if pattern is None else nm.get(pattern)
    drop_attn = 0.0 if (tok, head) == (1.0, 1.0) else (
        attn[(tok, head)] - attn["dense"] if (tok, head) in attn and attn.get("dense") is not None else None)
    if a_nm is None or drop_attn is None:
        return None, "unknown"
    if pattern is None and (tok, head) != (1.0, 1.0):
        return attn[(tok, head)], "measured"
    return a_nm + drop_attn, "measured" if drop_attn == 0.0 else "estimated"


def sweep(model: str, tokens: int, patterns, token_keeps, head_keeps, pe_sizes, nm_results=None,
          attention_results=None, progress=None) -> list[dict]:
    shape = model_shape(model)
    dense, nm, attn = load_accuracy(nm_results, attention_results)
    base = load_arch("sta")
    points = list(itertools.product(patterns, token_keeps, head_keeps, pe_sizes))
    rows = []
    for i, (pattern, tok, head, pes) in enumerate(points):
        arch = replace(base, pe_rows=pes, pe_cols=pes)
        arch.validate()
        ops = sta_workload(shape, tokens, pattern, *keep_schedules(shape.layers, tok, head))
        r = simulate_sta(ops, arch)
        acc, how = accuracy_of(pattern, tok, head, dense, nm, attn)
        rows.append({"pattern": pattern or "dense", "token_keep": tok, "head_keep": head, "pe_array": f"{pes}x{pes}",
                     "latency_ms": r["seconds"] * 1e3, "energy_uj": r["energy_j"] * 1e6,
                     "dram_mib": r["dram_bytes_total"] / 2**20, "accuracy": acc, "accuracy_source": how})
        if progress:
            progress(i + 1, len(points))
    mark_pareto(rows)
    return rows


def mark_pareto(rows: list[dict]) -> None:
    """pareto = no other point (with an accuracy) is at least as fast and as accurate, and better in one."""
    known = [r for r in rows if r["accuracy"] is not None]
    for r in rows:
        r["pareto"] = r["accuracy"] is not None and not any(
            o is not r and o["latency_ms"] <= r["latency_ms"] and o["accuracy"] >= r["accuracy"]
            and (o["latency_ms"] < r["latency_ms"] or o["accuracy"] > r["accuracy"]) for o in known)


def plot_pareto(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .run import _atomic_savefig

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [r for r in rows if r["accuracy"] is not None]
    for i, pattern in enumerate(sorted({r["pattern"] for r in pts})):
        for source, marker in (("measured", "o"), ("estimated", "x")):
            sel = [r for r in pts if r["pattern"] == pattern and r["accuracy_source"] == source]
            if sel:
                ax.scatter([r["latency_ms"] for r in sel], [r["accuracy"] for r in sel], s=18, color=f"C{i}",
                           marker=marker, label=pattern if source == "measured" else None)
    front = sorted((r for r in pts if r["pareto"]), key=lambda r: r["latency_ms"])
    ax.plot([r["latency_ms"] for r in front], [r["accuracy"] for r in front], "k-", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("simulated latency (ms)")
    ax.set_ylabel("test accuracy (sentiment)")
    ax.set_title("N:M x token/head pruning x PE array (x: estimated accuracy)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_savefig(fig, path)
    plt.close(fig)
