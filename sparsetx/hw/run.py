"""``sparsetx sim run``: one simulation with its baselines, as a report (tables, JSON, a plot)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import atomic_path
from ..attention.encoder import SpAttenConfig
from ..attention.importance import keep_schedule
from .arch import load_arch
from .baselines import PLATFORMS, measure_cpu, roofline_seconds
from .spatten import HeadWork, official_arch, simulate_spatten, work_from_shape, work_from_stats, work_from_trace
from .sta import simulate_sta, sta_workload
from .workload import ModelShape, Op


# Fractions of layers before token / head pruning starts: the runtimes' defaults (SEEDS.md).
TOKEN_START, HEAD_START = SpAttenConfig.token_start, SpAttenConfig.head_start


@dataclass
class SimConfig:
    arch: str = "sta"                  # "sta" or "spatten"
    model: str = "bert-base"           # a preset name or a Hugging Face config.json / model folder
    tokens: int = 128
    pattern: str | None = None         # N:M of the linear layers (STA)
    token_keep: float = 1.0            # final keep ratio of cascade token pruning (ramp after start)
    head_keep: float = 1.0
    value_keep: float = 1.0            # local value pruning (SpAtten)
    start: float = TOKEN_START         # fraction of layers before token pruning begins (SEEDS.md ~15 %)
    trace: str | None = None           # official SpAtten CSV (SpAtten only)
    semantics: str = "official"        # how a trace is read: "official" (the RTL's) or "paper" (spatten.py)
    stats: str | None = None           # our runtime's stats JSON (SpAtten only)
    arch_config: str | None = None     # YAML/JSON overrides of the architecture
    measure: bool = False              # time the same workload on this CPU (sparsetx runtime)


def model_shape(model: str) -> ModelShape:
    """A preset name, a config.json, or a folder holding one (no weights are read)."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.exists():
        from transformers import AutoConfig

        return ModelShape.from_config(AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path,
                                                              local_files_only=True))
    if os.sep in model or model.endswith(".json"):
        raise FileNotFoundError(f"model config {model} not found")
    return ModelShape.from_config(model)


def keep_schedules(layers: int, token_keep: float, head_keep: float,
                   start: float = TOKEN_START) -> tuple[list[float], list[float] | None]:
    """Per-layer keep ratios for tokens and heads (None: no head pruned), each 1.0 for the first
    layers (``start`` of them for tokens, HEAD_START for heads) and then a linear ramp down to the
    given ratio at the last layer: the shape of SpAtten's schedule, as the runtimes build it."""
    tokens = keep_schedule(token_keep, layers, math.ceil(start * layers))
    heads = keep_schedule(head_keep, layers, math.ceil(HEAD_START * layers)) if head_keep < 1 else None
    return tokens, heads


def attention_ops(work: list[HeadWork]) -> list[Op]:
    """The dense attention a baseline platform runs for the same heads (no pruning)."""
    ops = []
    for w in work:
        ops += [Op(w.layer, "qk", "dense_dense", w.queries, w.head_dim, w.length),
                Op(w.layer, "softmax", "softmax", w.queries, w.length, 1),
                Op(w.layer, "pv", "dense_dense", w.queries, w.length, w.head_dim)]
    return ops


def run(cfg: SimConfig) -> dict:
    arch = load_arch(cfg.arch, cfg.arch_config)
    if cfg.arch == "spatten":
        if cfg.pattern:
            raise ValueError("spatten simulates attention only; --pattern (N:M weights) applies to --arch sta")
        if cfg.trace and cfg.stats:
            raise ValueError("give --trace or --stats, not both")
        if cfg.trace:
            work, _ = work_from_trace(cfg.trace, arch, cfg.semantics)
            arch = official_arch(arch) if cfg.semantics == "official" else arch
            shape = None
        elif cfg.stats:
            work, shape = work_from_stats(cfg.stats, arch), None
        else:
            shape = model_shape(cfg.model)
            work = work_from_shape(shape, cfg.tokens, *keep_schedules(shape.layers, cfg.token_keep, cfg.head_keep,
                                                                      cfg.start), cfg.value_keep, arch=arch)
        result = simulate_spatten(work, arch)
        base_ops = attention_ops(work)
    else:
        if cfg.trace or cfg.stats:
            raise ValueError("--trace/--stats drive the spatten simulator; STA takes --model and keep ratios")
        shape = model_shape(cfg.model)
        ops = sta_workload(shape, cfg.tokens, cfg.pattern,
                           *keep_schedules(shape.layers, cfg.token_keep, cfg.head_keep, cfg.start))
        result = simulate_sta(ops, arch)
        base_ops = sta_workload(shape, cfg.tokens, None)
    result["config"] = asdict(cfg)
    result["arch_params"] = asdict(arch)
    result["baselines"] = {}
    for key, plat in PLATFORMS.items():
        t = roofline_seconds(base_ops, plat)
        result["baselines"][key] = {"platform": plat.name, "roofline_seconds": t,
                                    "speedup_bound": t / result["seconds"], "source": plat.source}
    if cfg.measure:
        if shape is None:
            raise ValueError("--measure needs --model (a trace has no weights shape to run)")
        m = measure_cpu(shape, cfg.tokens, cfg.pattern)
        m["speedup"] = m["seconds"] / result["seconds"]
        result["this_cpu"] = m
    return result


def report_tables(result: dict) -> list[tuple[str, list[dict]]]:
    """(title, rows) pairs for the terminal and the markdown report."""
    clock = result["arch_params"]["clock_ghz"] * 1e9
    ops = [{"operation": k, "cycles": round(v), "us": v / clock * 1e6,
            "share": v / sum(result["cycles_by_op"].values())} for k, v in result["cycles_by_op"].items() if v]
    summary = [{"metric": "latency (ms)", "value": result["seconds"] * 1e3},
               {"metric": "cycles", "value": round(result["cycles"])},
               {"metric": "DRAM bytes", "value": round(result["dram_bytes_total"])},
               {"metric": "energy (uJ)", "value": result["energy_j"] * 1e6}]
    summary += [{"metric": f"utilisation {u}", "value": v} for u, v in result["utilisation"].items()]
    if "dram_reduction" in result:
        summary.append({"metric": "DRAM reduction vs dense fp32", "value": result["dram_reduction"]})
    sram = result["sram_bytes"]
    for name, v in (sram.items() if isinstance(sram, dict) else [("K/V", sram)]):
        summary.append({"metric": f"on-chip buffer bytes read/written ({name})", "value": round(v)})
    layers = [{"layer": layer, "cycles": round(c), "us": c / clock * 1e6}
              for layer, c in result["layer_cycles"].items()]
    dram = [{"tensor": k, "bytes": round(v)} for k, v in result["dram_bytes"].items()]
    energy = [{"part": k, "uJ": v * 1e-6} for k, v in result["energy_pj"].items()]
    base = [{"platform": b["platform"], "roofline ms": b["roofline_seconds"] * 1e3,
             "speedup vs roofline": b["speedup_bound"]} for b in result["baselines"].values()]
    if "this_cpu" in result:
        base.append({"platform": f"this CPU, measured ({result['this_cpu']['threads']} threads)",
                     "roofline ms": result["this_cpu"]["seconds"] * 1e3, "speedup vs roofline": result["this_cpu"]["speedup"]})
    return [("summary", summary), ("cycles by operation (unit busy time)", ops),
            ("latency by layer (first start to last end, summed over steps; neighbours overlap)", layers), ("DRAM traffic by tensor", dram),
            ("energy", energy), ("baselines (roofline bound; measured where stated)", base)]


def plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ops = {k: v for k, v in result["cycles_by_op"].items() if v}
    axes[0].barh(list(ops), [v / 1e3 for v in ops.values()])
    axes[0].set_xlabel("kilocycles (unit busy time)")
    axes[0].set_title("latency by operation")
    dram = result["dram_bytes"]
    axes[1].bar(list(dram), [v / 2**20 for v in dram.values()])
    axes[1].set_ylabel("MiB")
    axes[1].set_title("DRAM traffic by tensor")
    base = result["baselines"]
    names = [b["platform"] for b in base.values()]
    vals = [b["speedup_bound"] for b in base.values()]
    if "this_cpu" in result:
        names.append("this CPU (measured)")
        vals.append(result["this_cpu"]["speedup"])
    axes[2].barh(names, vals)
    axes[2].set_xscale("log")
    axes[2].xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[2].axvline(1.0, color="gray", lw=0.8)
    for y, v in enumerate(vals):
        axes[2].annotate(f"{v:.3g}x", (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    axes[2].set_xlabel("speedup of the accelerator")
    axes[2].set_title("vs baselines (roofline bounds)")
    fig.suptitle(f"{result['arch']}: {result['seconds'] * 1e3:.3f} ms")
    fig.tight_layout()
    _atomic_savefig(fig, path)
    plt.close(fig)


def _atomic_savefig(fig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def write_json(obj, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))
