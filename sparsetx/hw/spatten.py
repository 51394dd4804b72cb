"""SpAtten's attention pipeline, cycle by cycle at the granularity of one head of one layer.

Per (step, layer, head), in the order of the accelerator (SpAtten HPCA 2021, Section 4):
fetch Q and the kept keys' MSBs from DRAM -> Q x K (qk_multipliers MACs a cycle) -> softmax
(softmax_per_cycle scores a cycle behind a fixed pipeline latency) -> if the row is flat, fetch the
keys' LSBs, recompute Q x K and softmax -> local value pruning's top-k over the keys -> fetch the
kept values -> P x V. Cascade token pruning adds one top-k over the layer's tokens. K and V buffers
are double-buffered, so the next head's fetch overlaps this head's compute.

Workloads are rows in the official trace format (one per step, layer, head), read from
spatten-traces/ or built from a model config plus keep ratios (encoders) or from our runtime's stats.

A trace is read in one of two semantics (``work_from_trace(..., semantics=)``, CLI ``--semantics``):

* ``official`` (the default): what the official simulator does with a row (mit-han-lab/spatten:
  TestSpAtten.scala, MatrixFetcher.scala, TopKLatencyModel.scala). Every row is ONE query (the
  traces are generation steps after the prompt, iteration 0 included); keys stored at -1 (fp), 10
  or 12 bits are fetched as 8 MSBs plus a forced 4-bit LSB refetch with a Q x K recompute, values
  at those widths as 8 bits; other widths use their own fetch format (4, 6 or 8 bits; two 6-bit
  heads share one request); key and value counts round up to multiples of 8; the query is not
  fetched from DRAM; a top-k pays its quick-select rounds plus ceil(k / 8) cycles to stream the
  result (once per pair of 6-bit heads); the cascade token top-k columns are not simulated; the
  softmax is the RTL's 0-latency placeholder.
* ``paper``: our reading of the paper: iteration 0 is the prompt pass (L queries), the trace's
  widths and counts as written, the query fetched, the token top-k simulated, and the softmax's
  87-cycle pipeline of the behavioural model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

SEMANTICS = ("official", "paper")
FORCED_REFETCH_BITS = (-1, 10, 12)   # official: key widths fetched as 8 MSBs + a forced 4-bit LSB refetch

from ..attention.trace import TraceRow, read_spatten_csv, read_stats
from .arch import SpAttenArch
from .energy import EXP_PJ, add_pj, dram_pj_per_byte, mac_pj, sram_pj_per_byte
from .events import Stage, simulate, span_by
from .topk import TopKEngine


@dataclass(frozen=True)
class HeadWork:
    """One head of one layer at one step: what it fetches and computes."""

    step: int
    layer: int
    head: int
    head_dim: int
    length: int            # tokens in the sequence (before pruning)
    queries: int           # query rows (the prompt's length at step 0 of generation, 1 after; L for encoders)
    keys: int              # keys fetched (kept tokens)
    values: int            # value rows fetched (local value pruning)
    key_bits: int          # MSB bits fetched first (or the full width, unquantized)
    value_bits: int
    query_bits: int
    requant: bool          # LSBs refetched and Q x K recomputed
    lsb_bits: int
    token_topk: int | None = None   # cascade token pruning's k, on the head that carries it
    topk_n: int = 0                 # ... and its candidates (the tokens alive before this layer)
    topk_stream: float = 0.0        # cycles to stream a top-k's result out (official semantics)

    @classmethod
    def from_trace(cls, row: TraceRow, arch: SpAttenArch, semantics: str = "official") -> HeadWork:
        if semantics not in SEMANTICS:
            raise ValueError(f"unknown trace semantics {semantics!r}; valid: {', '.join(SEMANTICS)}")
        if semantics == "official":
            return cls._official(row)
        bits = lambda b: arch.datapath_bits if b < 0 else b  # noqa: E731  (-1 = unquantized)
        # Step 0 of generation processes the whole prompt (SpAtten's summarization stage); later
        # steps one new token. Assumed from the traces' layout; SEEDS.md does not say.
        queries = row.sentence_length_L if row.iteration_id == 0 else 1
        return cls(row.iteration_id, row.layer_id, row.head_id, row.embedding_length_D, row.sentence_length_L,
                   queries, row.key_fetch_num, row.value_fetch_num, bits(row.quant_key_bit), bits(row.quant_value_bit),
                   bits(row.quant_query_bit) if row.quant_query_bit > 0 else arch.query_bits, row.if_requant,
                   max(row.auto_requant_incre, 0), row.topk if row.if_topk and row.topk > 0 else None)

    @classmethod
    def _official(cls, row: TraceRow) -> HeadWork:
        """One row as the official simulator runs it (module docstring, ``official``)."""
        up8 = lambda n: -(-int(n) // 8) * 8  # noqa: E731  (MatrixFetcher fetches rows in groups of 8)
        if row.quant_key_bit in FORCED_REFETCH_BITS:
            key_bits, requant, lsb = 8, True, 4
        else:
            key_bits, requant, lsb = row.quant_key_bit, row.if_requant, max(row.auto_requant_incre, 0)
        value_bits = 8 if row.quant_value_bit in FORCED_REFETCH_BITS else row.quant_value_bit
        keys, values = up8(row.key_fetch_num), up8(row.value_fetch_num)
        # a top-k streams its k winners out 8 a cycle; two 6-bit heads share one request and one stream
        stream = math.ceil(values / 8) * (0.5 if key_bits == 6 else 1.0) if values < keys else 0.0
        return cls(row.iteration_id, row.layer_id, row.head_id, int(row.embedding_length_D), row.sentence_length_L,
                   1, keys, values, key_bits, value_bits, 0, bool(requant), lsb, None, 0, stream)

    # --- counts (level 1 of validation: exact) -------------------------------------------------
    @property
    def qk_macs(self) -> int:
        return self.queries * self.keys * self.head_dim * (2 if self.requant else 1)

    @property
    def pv_macs(self) -> int:
        return self.queries * self.values * self.head_dim

    def dram_bytes(self) -> dict[str, float]:
        d = self.head_dim
        return {"q": self.queries * d * self.query_bits / 8,
                "k_msb": self.keys * d * self.key_bits / 8,
                "k_lsb": self.keys * d * self.lsb_bits / 8 if self.requant else 0.0,
                "v": self.values * d * self.value_bits / 8}


def dense_fp32_bytes(work: list[HeadWork], with_q: bool = True) -> float:
    """The dense baseline's Q, K and V fetches at fp32 with no token, head or value pruning (the
    reference of the paper's DRAM-access reduction): every head of every layer, all L tokens. The
    full head count of a step is the most heads any of its layers kept (layer 0 is never pruned)."""
    heads: dict[int, int] = {}
    layers: dict[tuple[int, int], HeadWork] = {}
    for w in work:
        heads[w.step] = max(heads.get(w.step, 0), w.head + 1)
        layers.setdefault((w.step, w.layer), w)
    return sum(heads[s] * (2 * w.length + (w.queries if with_q else 0)) * w.head_dim * 4
               for (s, _), w in layers.items())


@lru_cache(maxsize=4096)
def topk_cycles(n: int, k: int, comparators: int, pipeline: int) -> float:
    """Mean quick-select cycles (rounds only: the final filtering pass is pipelined behind)."""
    if k >= n:
        return 0.0
    return TopKEngine(comparators, pipeline).mean_cycles(n, k, trials=24, seed=n * 7919 + k, final_pass=False)


def topk_candidate_pj(arch: SpAttenArch) -> float:
    """Energy a quick-select spends on one candidate: one comparison, and one read plus (about half
    the time) one write of the (score, index) pair in the engine's candidate buffer, a
    max_context-entry SRAM (assumed; the zero eliminator's shifters are not counted)."""
    entry = (arch.datapath_bits + math.ceil(math.log2(arch.max_context))) / 8
    return add_pj(arch.datapath_bits) + 1.5 * entry * sram_pj_per_byte(int(arch.max_context * entry))


def kv_bank_bytes(arch: SpAttenArch) -> int:
    """The K and V buffers must deliver a key row for every multiplier each cycle, so they are
    banked into (multipliers x datapath bits / 64) 64-bit banks (assumed); energy follows the
    size of one bank."""
    banks = max(1, math.ceil(arch.qk_multipliers * arch.datapath_bits / 64))
    return arch.kv_buffer_bytes // banks


def k_buffer_bytes(w: HeadWork) -> float:
    """Bytes a head's keys take in the K buffer (full width once the LSBs are refetched)."""
    return w.keys * w.head_dim * (w.key_bits + (w.lsb_bits if w.requant else 0)) / 8


def head_jobs(work: list[HeadWork], arch: SpAttenArch) -> list[list[Stage]]:
    """Each head as a job of stages on the units dram, qk, softmax, topk, pv. DRAM fetches go
    through the transaction model (:mod:`sparsetx.hw.dram`); the K and V buffers hold as many
    heads' rows as fit (at least one), which is how far fetching can run ahead of compute."""
    jobs = []
    dram = arch.dram_model

    def fetch(op: str, rows: int, bits: float, extra_bursts: int = 0) -> Stage:
        bursts = dram.bursts(rows, rows and w.head_dim * bits / 8, packed=bits == 6) + extra_bursts
        cycles, latency = dram.fetch(bursts)
        return Stage("dram", cycles, op, latency=latency)

    for w in work:
        qk = math.ceil(w.queries * w.keys * w.head_dim / arch.qk_multipliers)
        sm = math.ceil(w.queries * w.keys / arch.softmax_rate)
        redo = w.requant
        # Local value pruning: one top-k a head over its keys' probabilities (summed over the
        # queries when there are several), choosing the V rows to fetch (assumed: the trace's
        # value_fetch_num is a per-head count; SEEDS.md describes the rule per query row).
        vt = topk_cycles(w.keys, w.values, arch.topk_comparators, arch.topk_pipeline) if w.values < w.keys else 0.0
        tt = topk_cycles(w.topk_n, w.token_topk, arch.topk_comparators, arch.topk_pipeline) \
            if w.token_topk else 0.0
        vt += w.topk_stream
        q_bursts = dram.bursts(w.queries, w.head_dim * w.query_bits / 8) if w.query_bits else 0
        jobs.append([
            fetch("fetch_k", w.keys, w.key_bits, q_bursts),
            Stage("qk", qk, "qk"),
            Stage("softmax", sm, "softmax", latency=arch.softmax_latency),
            fetch("fetch_k_lsb", w.keys if redo else 0, w.lsb_bits),
            Stage("qk", qk if redo else 0, "qk_requant"),
            Stage("softmax", sm if redo else 0, "softmax_requant", latency=arch.softmax_latency if redo else 0),
            Stage("topk", vt + tt, "topk"),
            fetch("fetch_v", w.values, w.value_bits),
            Stage("pv", math.ceil(w.queries * w.values * w.head_dim / arch.pv_multipliers), "pv"),
        ])
    # K buffer: a head's fetch waits until a buffer slot is free (the head `depth` back is done with
    # Q x K, recompute included); V buffer: likewise after P x V. depth = heads that fit, >= 1.
    for j, w in enumerate(work):
        k_depth = max(1, min(8, int(arch.kv_buffer_bytes // max(k_buffer_bytes(w), 1))))
        v_depth = max(1, min(8, int(arch.kv_buffer_bytes // max(w.values * w.head_dim * w.value_bits / 8, 1))))
        if j >= k_depth:
            jobs[j][0].after.append((j - k_depth, 4))
        if j >= v_depth:
            jobs[j][7].after.append((j - v_depth, 8))
    return jobs


def official_arch(arch: SpAttenArch) -> SpAttenArch:
    """The architecture as the official RTL simulates it: the softmax is a 0-latency placeholder
    (our 87-cycle pipeline comes from the behavioural model, the paper semantics)."""
    return replace(arch, softmax_latency=0)


def simulate_spatten(work: list[HeadWork], arch: SpAttenArch | None = None) -> dict:
    """Cycles, DRAM bytes by tensor, energy and per-op breakdowns for a list of heads."""
    arch = arch or SpAttenArch()
    arch.validate()
    if not work:
        raise ValueError("empty SpAtten workload: no (step, layer, head) rows")
    too_long = [w for w in work if w.keys > arch.max_context]
    if too_long:
        raise ValueError(f"spatten: {len(too_long)} heads attend over more than max_context={arch.max_context} keys "
                         f"(first: {too_long[0].keys})")
    sched = simulate(head_jobs(work, arch))
    dram = {"q": 0.0, "k_msb": 0.0, "k_lsb": 0.0, "v": 0.0}
    for w in work:
        for k, v in w.dram_bytes().items():
            dram[k] += v
    dram_total = sum(dram.values())
    dense = dense_fp32_bytes(work)
    qk_macs = sum(w.qk_macs for w in work)
    pv_macs = sum(w.pv_macs for w in work)
    exps = sum(w.queries * w.keys * (2 if w.requant else 1) for w in work)
    comparisons = sum((w.keys if w.values < w.keys else 0) + (w.topk_n if w.token_topk else 0)
                      for w in work) * 2   # about two passes' worth of candidates a quick-select
    kv_sram = dram["k_msb"] + dram["k_lsb"] + dram["v"]          # written once
    kv_sram += sum(w.queries * (w.keys * w.key_bits * (2 if w.requant else 1) + w.values * w.value_bits) * w.head_dim / 8
                   for w in work)                                # read by every query row
    energy = {"qk": qk_macs * mac_pj(arch.datapath_bits), "pv": pv_macs * mac_pj(arch.datapath_bits),
              "softmax": exps * EXP_PJ, "topk": comparisons * topk_candidate_pj(arch),
              "sram": kv_sram * sram_pj_per_byte(kv_bank_bytes(arch)),
              "dram": dram_total * dram_pj_per_byte(arch.dram)}
    seconds = sched.makespan / (arch.clock_ghz * 1e9)
    return {
        "arch": arch.name, "heads": len(work), "cycles": sched.makespan, "seconds": seconds,
        "cycles_by_op": sched.by_op,
        "utilisation": {u: sched.utilisation(u) for u in ("dram", "qk", "softmax", "topk", "pv")},
        "dram_bytes": dram, "dram_bytes_total": dram_total, "dense_fp32_bytes": dense,
        "dram_reduction": dense / dram_total if dram_total else float("inf"),
        # K and V only: Q comes from the FC layers, which run off SpAtten
        "kv_reduction": dense_fp32_bytes(work, with_q=False) / (dram_total - dram["q"]),
        "macs": {"qk": qk_macs, "pv": pv_macs}, "flops": 2 * (qk_macs + pv_macs),
        "tflops": 2 * (qk_macs + pv_macs) / seconds / 1e12 if seconds else 0.0,
        "generation": _generation(work, sched, arch),
        "sram_bytes": kv_sram, "energy_pj": energy, "energy_j": sum(energy.values()) * 1e-12,
        "requant_fraction": sum(w.requant for w in work) / len(work),
        "key_fetch_fraction": sum(w.keys for w in work) / sum(w.length for w in work),
        "layer_cycles": span_by(sched, [(w.step, w.layer) for w in work]),
    }


def _generation(work: list[HeadWork], sched, arch: SpAttenArch) -> dict | None:
    """The steps after the first (one query each) on their own: cycles from the end of step 0."""
    later = [(w, e) for w, e in zip(work, sched.end) if w.step > 0]
    if not later:
        return None
    first_end = max((e[-1] for w, e in zip(work, sched.end) if w.step == 0), default=0.0)
    cycles = max(e[-1] for _, e in later) - first_end
    macs = sum(w.qk_macs + w.pv_macs for w, _ in later)
    seconds = cycles / (arch.clock_ghz * 1e9)
    steps = len({w.step for w, _ in later})
    return {"steps": steps, "cycles": cycles, "seconds": seconds, "tflops": 2 * macs / seconds / 1e12 if seconds else 0.0,
            "cycles_per_step": cycles / steps}


# --- workloads ---------------------------------------------------------------------------------

def work_from_trace(path, arch: SpAttenArch | None = None,
                    semantics: str = "official") -> tuple[list[HeadWork], str | None]:
    """An official trace's rows as head work, read in ``semantics`` (module docstring). Official
    semantics come with :func:`official_arch` (the RTL's 0-latency softmax)."""
    arch = arch or SpAttenArch()
    rows, config = read_spatten_csv(path)
    work = [HeadWork.from_trace(r, arch, semantics) for r in rows]
    if semantics == "official":
        return work, config
    # a layer's token top-k ranks the tokens the previous layer kept (the whole sequence at layer 0)
    alive = {(w.step, w.layer): w.keys for w in work}
    work = [replace(w, topk_n=alive.get((w.step, w.layer - 1), w.length)) if w.token_topk else w for w in work]
    return work, config


def work_from_shape(shape, tokens: int, token_keep: list[float] | None = None,
                    head_keep: list[float] | None = None, value_keep: float = 1.0,
                    bits: int | None = None, arch: SpAttenArch | None = None) -> list[HeadWork]:
    """An encoder pass (BERT-style: every token a query) from a model shape and keep schedules."""
    arch = arch or SpAttenArch()
    bits = bits or arch.datapath_bits   # BERT on SpAtten: static quantization at the datapath width
    token_keep = token_keep or [1.0] * shape.layers
    head_keep = head_keep or [1.0] * shape.layers
    for name, sched in (("token_keep", token_keep), ("head_keep", head_keep)):
        if len(sched) != shape.layers:
            raise ValueError(f"{name} has {len(sched)} ratios for {shape.layers} layers")
        if any(not 0 < r <= 1 for r in sched):
            raise ValueError(f"{name} ratios must be in (0, 1], got {sched}")
    if not 0 < value_keep <= 1:
        raise ValueError(f"value_keep must be in (0, 1], got {value_keep}")
    work, prev = [], tokens
    for layer in range(shape.layers):
        kept = max(1, int(tokens * token_keep[layer]))
        topk = kept if kept < prev else None
        heads = max(1, int(shape.heads * head_keep[layer]))
        values = max(1, math.ceil(kept * value_keep))
        for h in range(heads):
            work.append(HeadWork(0, layer, h, shape.head_dim, tokens, kept, kept, values, bits, bits, arch.query_bits,
                                 False, 0, topk if h == 0 else None, prev if h == 0 and topk else 0))
        prev = kept
    return work


def work_from_stats(path, arch: SpAttenArch | None = None) -> list[HeadWork]:
    """Our runtime's stats JSON (encoder sequences or decoder steps) as SpAtten head work."""
    arch = arch or SpAttenArch()
    doc = read_stats(path)
    d = doc["model"]["head_dim"]
    work = []
    if "sequences" in doc:
        for s, seq in enumerate(doc["sequences"]):
            for layer in seq["layers"]:
                t, heads = layer["tokens"], layer["heads"]
                values = max(1, layer["values_fetched_rows"] // max(t * heads, 1))
                tok = next((c for c in layer["topk"] if c["unit"] == "token"), None)
                for h in range(heads):
                    work.append(HeadWork(s, layer["layer"], h, d, seq["length"], t, t, values, arch.datapath_bits,
                                         arch.datapath_bits, arch.query_bits, False, 0,
                                         tok["k"] if tok and h == 0 else None, tok["n"] if tok and h == 0 else 0))
        return work
    # Decoder steps: one job per KV head, its query heads' rows folded in (grouped-query attention
    # shares one K/V fetch among them; SpAtten itself predates GQA).
    cfg = doc.get("config", {})
    k_bits, lsb = cfg.get("k_bits"), cfg.get("lsb_bits") or 0
    seen = 0
    for s, step in enumerate(doc["steps"]):
        seen += step[0]["queries"] if step else 0          # the sequence length so far (the dense baseline's)
        for layer in step:
            q, t, heads, kv = layer["queries"], layer["tokens"], layer["heads"], layer["kv_heads"]
            values = max(1, layer["values_fetched_rows"] // max(q * heads, 1))
            flat_rows = layer.get("rows_refetched", 0)
            for h in range(kv):
                # the runtime counts refetched rows per layer; spread them over the first KV heads
                requant = k_bits is not None and h < math.ceil(kv * flat_rows / max(layer.get("rows", 1), 1))
                work.append(HeadWork(s, layer["layer"], h, d, seen, q * heads // kv, t, min(values, t),
                                     (k_bits - lsb) if k_bits else arch.datapath_bits,
                                     cfg.get("v_bits") or arch.datapath_bits, arch.query_bits, bool(requant), lsb))
    return work
