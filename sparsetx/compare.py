"""The comparison that matters (STA's IDP claim): accuracy and training time per N:M pattern for
dense, one-shot magnitude, one-shot activation-aware, SR-STE per pattern, and one IDP series with
the same total budget as the separate SR-STE runs. Every sub-run lives in its own folder and is
skipped when its results exist, so an interrupted comparison resumes."""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .data.sentiment import sentiment_splits
from .evaluate import accuracy
from .models import load_model, load_tokenizer
from .nm.pattern import NMPattern, parse_series
from .nm.prune import NMConfig, sparsify
from .train import RunSpec, Stage, TrainConfig, calibration_batches, run

console = Console(stderr=True)


@dataclass
class CompareConfig:
    model: str = "minilm"
    out: str = "runs/compare"
    dense: str | None = None            # an already fine-tuned dense folder (else fine-tune one)
    dense_steps: int = 400
    patterns: tuple[str, ...] = ("2:4", "4:8", "2:8", "1:8")
    series: str = "4:8,2:4,2:8,1:8"     # IDP order: each candidate inherits from the one before
    steps: int = 100                    # per separate SR-STE run, and per IDP stage
    calibration_batches: int = 8
    unnested: bool = True               # also run the IDP series with freely chosen masks
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        pats = [str(NMPattern.parse(p)) for p in self.patterns]
        series = [str(p) for p in parse_series(self.series)]
        if sorted(pats) != sorted(series):
            raise ValueError(f"IDP series {self.series!r} must hold the compared patterns {pats} once each")


def _sub_run(spec: RunSpec, progress: bool) -> dict:
    done = Path(spec.out) / "results.json"
    return json.loads(done.read_text()) if done.exists() else run(spec, progress=progress)


def one_shot(dense: str, pattern: str, criterion: str, cfg: CompareConfig) -> dict:
    model = load_model(dense)
    tok = load_tokenizer(dense)
    splits = sentiment_splits()
    calib = None
    if criterion == "activation":
        calib = calibration_batches(tok, splits["train"].texts, cfg.calibration_batches, cfg.train.batch_size,
                                    cfg.train.max_length)
    t = time.perf_counter()
    sparsify(model, NMConfig(pattern, criterion=criterion), calibration=calib)
    elapsed = time.perf_counter() - t
    dev, test = splits["dev"].subset(cfg.train.eval_examples), splits["test"].subset(cfg.train.eval_examples)
    return {"pattern": pattern, "train_seconds": round(elapsed, 1), "steps": 0,
            "dev_acc": accuracy(model, tok, dev, progress=False), "test_acc": accuracy(model, tok, test, progress=False)}


def compare(cfg: CompareConfig, progress: bool = True) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    rows: dict[str, dict[str, dict]] = {}
    dense = cfg.dense
    if dense is None:
        res = _sub_run(RunSpec(cfg.model, str(out / "dense"), [Stage(None, cfg.dense_steps)], cfg.train), progress)
        dense = str(out / "dense" / "candidate-dense")
        rows["dense"] = {"dense": res["stages"][0]}
    else:
        tok, model = load_tokenizer(dense), load_model(dense)
        test = sentiment_splits()["test"].subset(cfg.train.eval_examples)
        rows["dense"] = {"dense": {"test_acc": accuracy(model, tok, test, progress=False), "train_seconds": 0.0}}
    for criterion in ("magnitude", "activation"):
        key = f"one-shot {criterion}"
        cache = out / f"oneshot-{criterion}.json"
        rows[key] = json.loads(cache.read_text()) if cache.exists() else {}
        for pattern in cfg.patterns:
            if pattern not in rows[key]:
                console.print(f"one-shot {criterion} {pattern}")
                rows[key][pattern] = one_shot(dense, pattern, criterion, cfg)
                cache.write_text(json.dumps(rows[key], indent=1))
    rows["SR-STE (separate)"] = {}
    for pattern in cfg.patterns:
        spec = RunSpec(dense, str(out / f"srste-{pattern.replace(':', '_')}"), [Stage(pattern, cfg.steps)], cfg.train)
        rows["SR-STE (separate)"][pattern] = _sub_run(spec, progress)["stages"][0]
    series = [str(p) for p in parse_series(cfg.series)]
    spec = RunSpec(dense, str(out / "idp"), [Stage(p, cfg.steps) for p in series], cfg.train)
    rows["IDP series"] = {s["pattern"]: s for s in _sub_run(spec, progress)["stages"]}
    if cfg.unnested:
        free = dataclasses.replace(cfg.train, nested=False)
        spec = RunSpec(dense, str(out / "idp-unnested"), [Stage(p, cfg.steps) for p in series], free)
        rows["IDP series (unnested)"] = {s["pattern"]: s for s in _sub_run(spec, progress)["stages"]}
    result = {"config": asdict(cfg), "dense_model": dense, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot_comparison(result, out / "accuracy_vs_sparsity.png")
    return result


def table_rows(result: dict) -> list[list[str]]:
    """[method, accuracy per pattern..., train steps, train time] for every method."""
    patterns = list(result["config"]["patterns"])
    rows = []
    for method, cells in result["rows"].items():
        if method == "dense":
            d = cells["dense"]
            rows.append(["dense (fine-tuned)", *[f"{d['test_acc']:.4f}"] * len(patterns), str(d.get("steps", "-")),
                         f"{d.get('train_seconds', 0):.0f} s"])
            continue
        steps = sum(c.get("steps", 0) for c in cells.values())
        secs = sum(c.get("train_seconds", 0) for c in cells.values())
        rows.append([method, *[f"{cells[p]['test_acc']:.4f}" if p in cells else "-" for p in patterns],
                     str(steps), f"{secs:.0f} s"])
    return rows


def comparison_table(result: dict) -> Table:
    table = Table(title="Held-out test accuracy (Rotten Tomatoes) and training time")
    for col in ["method", *result["config"]["patterns"], "train steps", "train time"]:
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in table_rows(result):
        table.add_row(*row)
    return table


def table_markdown(result: dict) -> str:
    header = ["method", *result["config"]["patterns"], "train steps", "train time"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table_rows(result)])


def plot_comparison(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = sorted(result["config"]["patterns"], key=lambda p: (-NMPattern.parse(p).density, p))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    dense = result["rows"]["dense"]["dense"]["test_acc"]
    ax.axhline(dense, color="gray", ls="--", label="dense")
    for method, cells in result["rows"].items():
        if method == "dense":
            continue
        xs = [i for i, p in enumerate(patterns) if p in cells]
        ax.plot(xs, [cells[patterns[i]]["test_acc"] for i in xs], marker="o", label=method)
    ax.set_xticks(range(len(patterns)), [f"{p}\n({NMPattern.parse(p).density:.0%} kept)" for p in patterns])
    ax.set_ylabel("test accuracy")
    ax.set_title("MiniLM on Rotten Tomatoes: accuracy vs N:M sparsity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
