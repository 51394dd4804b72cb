"""Roofline models of the papers' baseline platforms, and this machine's measured time.

A roofline only bounds a platform: time >= max(FLOPs / peak, bytes / bandwidth) per operation. The
papers' speedups come from measured baseline latencies, so :mod:`sparsetx.hw.validate` compares with
the paper's ratios and checks that no implied baseline beats its roofline. CPUs and GPUs run N:M
weights dense (the RTX 2080 Ti's 2:4 sparse tensor cores came a generation later).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .workload import ModelShape, Op


@dataclass(frozen=True)
class Platform:
    name: str
    peak_flops: float      # FP32 FLOP/s
    bandwidth: float       # bytes/s
    watts: float
    source: str


# Public specifications (HW.md marks them as recollections: the values are the vendors' datasheet
# figures as commonly quoted; peak FP32 = cores x clock x FLOPs a cycle).
PLATFORMS = {
    "i9-9900x": Platform("Intel i9-9900X", 10 * 3.5e9 * 64, 85.3e9, 165,
                         "10 cores x 3.5 GHz x 2 AVX-512 FMA (64 FLOP/cycle); 4 x DDR4-2666"),
    "rtx2080ti": Platform("NVIDIA RTX 2080 Ti", 13.4e12, 616e9, 250, "NVIDIA Turing spec (boost clock), GDDR6 352-bit"),
    "titan-xp": Platform("NVIDIA TITAN Xp", 12.1e12, 547.7e9, 250, "NVIDIA Pascal spec, GDDR5X 384-bit"),
    "xeon-e5-2640v4": Platform("Intel Xeon E5-2640 v4", 10 * 2.4e9 * 32, 68.3e9, 90,
                               "10 cores x 2.4 GHz x 2 AVX2 FMA (32 FLOP/cycle); 4 x DDR4-2133"),
}


def op_flops_bytes(op: Op, value_bytes: int = 4) -> tuple[float, float]:
    """Dense FLOPs and the bytes a dense implementation moves (weights + inputs + outputs)."""
    if op.kind == "softmax":
        elems = op.m * op.k * op.count
        return 5.0 * elems, 2.0 * elems * value_bytes
    flops = 2.0 * op.m * op.k * op.n * op.count
    if op.kind == "sparse_dense":
        traffic = (op.k * op.n + op.m * op.k + op.m * op.n) * value_bytes
    else:
        traffic = (op.m * op.k + op.k * op.n + op.m * op.n) * op.count * value_bytes
    return flops, traffic


def roofline_seconds(ops: list[Op], platform: Platform, value_bytes: int = 4) -> float:
    total = 0.0
    for op in ops:
        f, b = op_flops_bytes(op, value_bytes)
        total += max(f / platform.peak_flops, b / platform.bandwidth)
    return total


def measure_cpu(shape: ModelShape, tokens: int, pattern: str | None = None, repeats: int = 5,
                threads: int | None = None) -> dict:
    """This machine's time for the same workload: a randomly initialised BERT-style stack of the
    shape (no weights needed for timing), N:M-pruned and run through SparseLinear when ``pattern``
    is given, one sequence of ``tokens``. Median of ``repeats`` after a warm-up. For Llama shapes
    this is an approximation (BERT's ungated FFN, full-width K and V)."""
    import statistics

    import torch
    from transformers import BertConfig, BertModel

    from ..kernels.nm_linear import to_sparse_linear
    from ..nm.prune import NMConfig, recorded_patterns, sparsify

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                     num_attention_heads=shape.heads, intermediate_size=shape.ffn,
                     max_position_embeddings=max(512, tokens))
    model = BertModel(cfg, add_pooling_layer=False).eval()
    if pattern:
        sparsify(model, NMConfig(pattern))
        to_sparse_linear(model, recorded_patterns(model))
    ids = torch.randint(0, 1000, (1, tokens))
    times = []
    with torch.no_grad():
        model(input_ids=ids)
        for _ in range(repeats):
            t = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "threads": torch.get_num_threads(), "tokens": tokens,
            "pattern": pattern, "repeats": repeats}


def implied_efficiency(ours_seconds: float, paper_speedup: float, ops: list[Op], platform: Platform) -> float:
    """If the paper's speedup holds over our simulated latency, the baseline took ours x speedup;
    the fraction of its roofline that would be (must be <= 1 for the figures to be consistent)."""
    baseline = ours_seconds * paper_speedup
    return roofline_seconds(ops, platform) / baseline if baseline > 0 else math.nan
