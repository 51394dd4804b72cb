"""The one trace schema between the SpAtten runtime and the accelerator simulators.

1. ``sparsetx-attention-stats`` JSON, version 1, written by the runtime::

     {"schema": "sparsetx-attention-stats", "version": 1,
      "model": {"layers": L, "heads": H, "head_dim": D},
      "config": {...SpAttenConfig...},
      "sequences": [{"length": n, "layers": [
          {"layer": i, "tokens": T_i, "heads": H_i, "keys_fetched": T_i * H_i,
           "values_fetched_rows": rows of V read by P V, "topk": [{"unit": "token"|"head"|"value",
           "n": candidates, "k": kept, "calls": how many (default 1)}]}]}]}

   A decoder run has "steps" instead of "sequences": one list per forward pass (the prompt, then
   one per generated token), each holding one entry per layer::

      {"layer": i, "tokens": keys attended, "tokens_after": cache size after eviction,
       "queries": new tokens, "heads": query heads computed, "kv_heads": KV heads kept,
       "head_dim": D, "values_fetched_rows": rows of V read, "kv_bytes_fp16": K+V bytes at fp16,
       and with progressive quantization "rows", "rows_refetched", "k_bytes_msb",
       "k_bytes_lsb_refetch", "v_bytes", "kv_bytes_quantized"}

   and its "model" adds "kv_heads" (grouped-query attention).

2. The official SpAtten workload trace CSV (mit-han-lab/spatten, MIT licence): one row per
   (generation step, layer, head) with the columns of :data:`CSV_COLUMNS`, and a trailing line
   naming the run's config. :func:`read_spatten_csv` and :func:`write_spatten_csv` read and write
   it, so the paper's runs and ours feed the same simulator.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..atomic import atomic_path

STATS_SCHEMA = "sparsetx-attention-stats"
STATS_VERSION = 1

CSV_COLUMNS = ("iteration_id", "layer_id", "head_id", "embedding_length_D", "sentence_length_L", "key_fetch_num",
               "quant_key_bit", "quant_query_bit", "auto_requant_thres", "if_requant", "auto_requant_incre",
               "value_fetch_num", "quant_value_bit", "if_accumulate_importance", "if_rescale_previous_importance",
               "if_topk", "topk")


class TraceError(ValueError):
    """A trace file that does not follow its schema."""


@dataclass(frozen=True)
class TraceRow:
    """One (step, layer, head) of an official SpAtten trace. Bits of -1 mean unquantized."""

    iteration_id: int
    layer_id: int
    head_id: int
    embedding_length_D: int
    sentence_length_L: int
    key_fetch_num: int
    quant_key_bit: int
    quant_query_bit: int
    auto_requant_thres: float
    if_requant: bool
    auto_requant_incre: int
    value_fetch_num: int
    quant_value_bit: int
    if_accumulate_importance: bool
    if_rescale_previous_importance: bool
    if_topk: bool
    topk: int


def _parse(name: str, kind: type, text: str, where: str):
    try:
        if kind is bool:
            if text not in ("True", "False"):
                raise ValueError(text)
            return text == "True"
        if kind is int:
            return int(float(text))
        return float(text)
    except ValueError:
        raise TraceError(f"{where}: column {name} has {text!r}, expected {kind.__name__}") from None


def read_spatten_csv(path: str | os.PathLike) -> tuple[list[TraceRow], str | None]:
    """Rows and the trailing config name of an official SpAtten trace CSV."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != CSV_COLUMNS:
            raise TraceError(f"{path}: header {header} is not the SpAtten trace header {list(CSV_COLUMNS)}")
        rows, config = [], None
        kinds = {f.name: f.type for f in fields(TraceRow)}
        kinds = {k: {"int": int, "float": float, "bool": bool}[v] if isinstance(v, str) else v for k, v in kinds.items()}
        for n, line in enumerate(reader, start=2):
            if line and all(not x for x in line[1:]) and line[0] and not line[0][0].isdigit():
                config = line[0]
                continue
            if len(line) != len(CSV_COLUMNS):
                raise TraceError(f"{path}:{n}: {len(line)} columns, expected {len(CSV_COLUMNS)}")
            rows.append(TraceRow(**{c: _parse(c, kinds[c], v, f"{path}:{n}") for c, v in zip(CSV_COLUMNS, line)}))
    if not rows:
        raise TraceError(f"{path}: no trace rows")
    return rows, config


def write_spatten_csv(path: str | os.PathLike, rows: list[TraceRow], config: str | None = None) -> None:
    """Write rows in the official layout (D as a float, as the official files do), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for r in rows:
            d = asdict(r)
            d["embedding_length_D"] = float(r.embedding_length_D)
            if float(r.auto_requant_thres).is_integer():  # the official files write -1, not -1.0
                d["auto_requant_thres"] = int(r.auto_requant_thres)
            w.writerow([str(d[c]) for c in CSV_COLUMNS])
        if config is not None:
            w.writerow([config] + [""] * (len(CSV_COLUMNS) - 1))


# The keys every layer entry must hold, per form of the document.
REQUIRED = {
    "sequences": {"layer", "tokens", "heads", "keys_fetched", "values_fetched_rows", "topk"},
    "steps": {"layer", "tokens", "tokens_after", "queries", "heads", "kv_heads", "head_dim",
              "values_fetched_rows", "kv_bytes_fp16"},
}


def stats_document(model_shape: dict, config: dict, sequences: list[list[dict]] | None = None,
                   steps: list[list[dict]] | None = None) -> dict:
    """The versioned document: encoder ``sequences`` or decoder ``steps`` (exactly one)."""
    if (sequences is None) == (steps is None):
        raise ValueError("a stats document holds either encoder sequences or decoder steps")
    doc = {"schema": STATS_SCHEMA, "version": STATS_VERSION, "model": model_shape, "config": config}
    if sequences is not None:
        doc["sequences"] = [{"length": seq[0]["tokens"] if seq else 0, "layers": seq} for seq in sequences]
    else:
        doc["steps"] = steps
    return doc


def write_stats(path: str | os.PathLike, document: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=1))


def read_stats(path: str | os.PathLike) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != STATS_SCHEMA or doc.get("version") != STATS_VERSION:
        raise TraceError(f"{path}: schema {doc.get('schema')!r} v{doc.get('version')!r}; expected {STATS_SCHEMA!r} v{STATS_VERSION}")
    forms = [f for f in REQUIRED if f in doc]
    if len(forms) != 1:
        raise TraceError(f"{path}: expected exactly one of {sorted(REQUIRED)}, found {forms}")
    form = forms[0]
    groups = [seq.get("layers", []) for seq in doc["sequences"]] if form == "sequences" else doc["steps"]
    for s, layers in enumerate(groups):
        for layer in layers:
            missing = REQUIRED[form] - set(layer)
            if missing:
                raise TraceError(f"{path}: {form[:-1]} {s} layer {layer.get('layer')} lacks {sorted(missing)}")
    return doc


def encoder_trace_rows(stats: list[dict], head_dim: int, iteration: int = 0) -> list[TraceRow]:
    """Official-CSV rows (one per kept head) for one encoder sequence of runtime stats."""
    rows = []
    for layer in stats:
        values = layer["values_fetched_rows"] // max(layer["tokens"] * layer["heads"], 1)
        for h in range(layer["heads"]):
            rows.append(TraceRow(
                iteration_id=iteration, layer_id=layer["layer"], head_id=h, embedding_length_D=head_dim,
                sentence_length_L=layer["tokens"], key_fetch_num=layer["tokens"], quant_key_bit=-1, quant_query_bit=-1,
                auto_requant_thres=-1.0, if_requant=False, auto_requant_incre=-1, value_fetch_num=values,
                quant_value_bit=-1, if_accumulate_importance=True, if_rescale_previous_importance=False,
                if_topk=any(t["unit"] == "token" for t in layer["topk"]), topk=-1))
    return rows


def decoder_trace_rows(document: dict) -> list[TraceRow]:
    """Official-CSV rows from a decoder stats document: one per (forward, layer, query head computed).

    The rows describe the work done: after head pruning only the kept query heads have rows (with
    their original head ids); ``value_fetch_num`` is the V rows one query of a head read (local
    value pruning lowers it); ``if_requant`` is set for the heads whose rows refetched LSBs."""
    model, cfg = document["model"], document["config"]
    group = model["heads"] // model.get("kv_heads", model["heads"])
    quant = cfg.get("k_bits") is not None
    rows, seen = [], 0
    for it, step in enumerate(document["steps"]):
        if not step:
            continue
        seen += step[0]["queries"]
        for s in step:
            heads = [kv * group + g for kv in s.get("kv_head_ids", range(s["kv_heads"])) for g in range(group)]
            values = s["values_fetched_rows"] // max(s["queries"] * s["heads"], 1)
            requant = set(s.get("requant_heads", []))
            pruned = s["tokens_after"] < s["tokens"]
            for h in heads:
                rows.append(TraceRow(
                    iteration_id=it, layer_id=s["layer"], head_id=h, embedding_length_D=s["head_dim"],
                    sentence_length_L=seen, key_fetch_num=s["tokens"],
                    quant_key_bit=cfg["k_bits"] - cfg["lsb_bits"] if quant else -1, quant_query_bit=16 if quant else -1,
                    auto_requant_thres=cfg["requant_threshold"] if quant else -1.0, if_requant=h in requant,
                    auto_requant_incre=cfg["lsb_bits"] if quant else -1, value_fetch_num=values,
                    quant_value_bit=cfg["v_bits"] if quant else -1, if_accumulate_importance=True,
                    if_rescale_previous_importance=False, if_topk=pruned, topk=s["tokens_after"] if pruned else -1))
    return rows
