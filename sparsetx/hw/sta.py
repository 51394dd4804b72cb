"""STA's unified engine: N:M sparse x dense and dense x dense products on one PE array, with the
scalable softmax streaming behind Q K^T so the score matrix never goes to DRAM.

The engine (our reconstruction, SEEDS.md): pe_rows x pe_cols PEs, output-stationary, one output
feature x token per PE. A PE has ``lanes`` multipliers; each kept weight carries its in-group index,
which drives an M:1 multiplexer over the group's M activations (index-driven operand selection).
A PE consumes min(lanes, act_width * N / M) kept weights a cycle, so an N:M product of X (T x K) by
W^T (K x O) takes ceil(O / pe_rows) x ceil(T / pe_cols) output tiles of ceil(K * N / M / rate)
cycles each (plus an adder-tree drain). A dense operand (Q K^T, P V, a dense layer) is N = M: each
group of M enters as M / lanes sub-groups with identity indices, so utilisation stays high in both
modes.

Memory: weights stream from DRAM in row blocks (pe_rows output features x K, packed: values plus
ceil(log2 M)-bit indices), double-buffered against compute. A linear layer's activations
(:func:`linear_plan`) stay on chip when its input and output fit the activation buffer; otherwise
the tokens are tiled so that one tile's input and one row block's output fit, and of the two loop
orders (token tiles outside, the weights streamed once per tile; or row blocks outside, the input
re-streamed once per block) the one that moves fewer bytes is taken.
Attention runs per head: Q K^T tiles feed the softmax unit; with ``onchip_softmax=False`` the scores
are written to DRAM and read back (the baseline STA avoids), and P x V waits for them to return.
"""
from __future__ import annotations

import math

from ..formats.packed import index_bits
from ..nm.pattern import NMPattern
from .arch import STAArch
from .energy import EXP_PJ, dram_pj_per_byte, index_decode_pj, mac_pj, mux_pj, sram_pj_per_byte
from .events import Stage, simulate, span_by
from .workload import ModelShape, Op, model_ops


def tile_cycles(arch: STAArch, k: int, n: int, m: int) -> int:
    """Cycles for one output tile: the K reduction at the PE's kept-weight rate, plus the drain of
    a log2(lanes)-deep adder tree."""
    rate = arch.kept_per_cycle(n, m)
    return math.ceil(k * n / m / rate) + max(1, math.ceil(math.log2(arch.lanes)))


def buffer_reads(macs: int, act_per_mac: float, weight_bytes: float, act_bytes: float,
                 arch: STAArch) -> tuple[float, float]:
    """On-chip bytes read (activations, weights): a PE column's activations (M per N kept weights)
    are broadcast to the pe_rows PEs of the column, a PE row's weights to its pe_cols PEs."""
    return macs * act_per_mac * act_bytes / arch.pe_rows, macs * weight_bytes / arch.pe_cols


def bank_bytes(buffer_bytes: int, bits_per_cycle: float) -> float:
    """A buffer that must deliver ``bits_per_cycle`` is banked in 64-bit banks (assumed); access
    energy follows one bank's size."""
    return buffer_bytes / max(1, math.ceil(bits_per_cycle / 64))


def weight_format(op: Op, arch: STAArch) -> tuple[int, int, int]:
    """(N, M, bits per kept weight) of a linear op: values plus ceil(log2 M)-bit indices; dense
    weights are 1:1 with no index."""
    if op.pattern is None:
        return 1, 1, arch.value_bits
    p = NMPattern.parse(op.pattern)
    return p.n, p.m, arch.value_bits + index_bits(p)


def dense_cycles(op: Op, arch: STAArch) -> int:
    """Engine cycles of one head of a dense x dense product (Q K^T or P V): N = M operands."""
    return math.ceil(op.n / arch.pe_rows) * math.ceil(op.m / arch.pe_cols) * tile_cycles(arch, op.k, 1, 1)


def linear_plan(op: Op, arch: STAArch) -> tuple[str, int]:
    """How a linear op's activations move, and the token tile: ("resident", T) when its input and
    output (T x (K + O)) fit the activation buffer; else tiles of Tt tokens, a multiple of pe_cols,
    such that a tile's input and one row block's output (Tt x (K + pe_rows)) fit, in the cheaper
    loop order: "tokens-outer" (weights streamed once per tile, activations once) or
    "weights-outer" (weights once, the input re-streamed once per row block)."""
    vb = arch.value_bits / 8
    if op.m * (op.k + op.n) * vb <= arch.act_buffer_bytes:
        return "resident", op.m
    fit = int(arch.act_buffer_bytes // ((op.k + arch.pe_rows) * vb))
    tile = min(op.m, max(arch.pe_cols, fit // arch.pe_cols * arch.pe_cols))
    if tile * (op.k + arch.pe_rows) * vb > arch.act_buffer_bytes:
        raise ValueError(f"sta: {op.name}: not even {arch.pe_cols} tokens of a {op.k}-wide input fit the "
                         f"activation buffer ({arch.act_buffer_bytes} bytes)")
    d = linear_dram(op, arch, ("tokens-outer", tile)), linear_dram(op, arch, ("weights-outer", tile))
    return ("tokens-outer", tile) if sum(d[0].values()) <= sum(d[1].values()) else ("weights-outer", tile)


def linear_dram(op: Op, arch: STAArch, plan: tuple[str, int]) -> dict[str, float]:
    """DRAM bytes (weights, activations) of a linear op under ``plan`` (see :func:`linear_plan`)."""
    n, m, bits = weight_format(op, arch)
    vb = arch.value_bits / 8
    weights = op.n * op.k * n / m * bits / 8
    mode, tile = plan
    if mode == "resident":
        return {"weights": weights, "activations": 0.0}
    x, y = op.m * op.k * vb, op.m * op.n * vb
    if mode == "tokens-outer":
        return {"weights": math.ceil(op.m / tile) * weights, "activations": x + y}
    return {"weights": weights, "activations": math.ceil(op.n / arch.pe_rows) * x + y}


def op_jobs(op: Op, arch: STAArch, plan: tuple[str, int] | None = None) -> list[list[Stage]]:
    """Jobs for one operation: weight row blocks (linear layers, per token tile when tiled; ``plan``
    from :func:`linear_plan`, computed if not given) or heads (attention)."""
    vb = arch.value_bits / 8
    bw = arch.dram_bytes_per_cycle
    if op.kind == "sparse_dense":
        n, m, bits = weight_format(op, arch)
        arch.check_pattern(n, m)
        blocks = math.ceil(op.n / arch.pe_rows)
        block_bytes = arch.pe_rows * op.k * n / m * bits / 8
        if block_bytes > arch.weight_buffer_bytes / 2:
            raise ValueError(f"sta: a weight row block of {op.name} ({block_bytes:.0f} bytes) does not fit half "
                             f"the weight buffer ({arch.weight_buffer_bytes} bytes, double-buffered)")
        per_tile = tile_cycles(arch, op.k, n, m)
        mode, tile = plan or linear_plan(op, arch)
        jobs = []
        if mode == "weights-outer":   # the whole input re-streamed with every row block
            for _ in range(blocks):
                jobs.append([Stage("dram", (block_bytes + op.m * op.k * vb) / bw, "fetch_w"),
                             Stage("engine", math.ceil(op.m / arch.pe_cols) * per_tile, op.name),
                             Stage("dram", arch.pe_rows * op.m * vb / bw, "write_act")])
            return jobs
        for start in range(0, op.m, tile):   # resident: one tile of all the tokens
            t = min(tile, op.m - start)
            for b in range(blocks):
                act_in = t * op.k * vb if mode == "tokens-outer" and b == 0 else 0.0
                act_out = arch.pe_rows * t * vb if mode == "tokens-outer" else 0.0
                jobs.append([Stage("dram", (block_bytes + act_in) / bw, "fetch_w"),
                             Stage("engine", math.ceil(t / arch.pe_cols) * per_tile, op.name),
                             Stage("dram", act_out / bw, "write_act")])
        return jobs  # the weight buffer's double buffering spans operations: simulate_sta adds it
    if op.name == "qk":   # per head: Q (T x d) x K^T; scores stream into the softmax unit
        spill = 0.0 if arch.onchip_softmax else op.m * op.n * vb / arch.dram_bytes_per_cycle  # each way
        sm = math.ceil(op.m * op.n / arch.softmax_per_cycle)
        return [[Stage("engine", dense_cycles(op, arch), "qk"),
                 Stage("dram", spill, "scores_to_dram"),
                 Stage("softmax", sm, "softmax", latency=arch.softmax_latency),
                 Stage("dram", spill, "scores_from_dram")]
                for _ in range(op.count)]
    if op.name == "pv":   # per head: P (T x T) x V (T x d)
        return [[Stage("engine", dense_cycles(op, arch), "pv")] for _ in range(op.count)]
    return []            # the softmax op is timed inside qk's jobs


def simulate_sta(ops: list[Op], arch: STAArch | None = None) -> dict:
    """Cycles, DRAM bytes by tensor, energy and per-op/per-layer breakdowns for a list of ops."""
    arch = arch or STAArch()
    arch.validate()
    if not ops:
        raise ValueError("empty STA workload")
    jobs: list[list[Stage]] = []
    owner: list[Op] = []
    last_compute: tuple[int, int] | None = None
    plans = {id(op): linear_plan(op, arch) for op in ops if op.kind == "sparse_dense"}
    scores: list[tuple[int, int]] = []
    for op in ops:
        new = op_jobs(op, arch, plans.get(id(op)))
        if not new:
            continue
        first = len(jobs)
        for job in new:                       # op_jobs numbers its jobs from 0: move them into place
            for st in job:
                st.after = [(j + first, s) for j, s in st.after]
        compute_stage = 1 if op.kind == "sparse_dense" else 0
        # P x V of a head waits for that head's probabilities: on chip, its softmax stage; off
        # chip, the scores' return trip from DRAM (the cost the scalable softmax avoids)
        probs = 2 if arch.onchip_softmax else 3
        if op.name == "pv" and len(scores) == len(new):
            for head, job in enumerate(new):
                job[0].after.append(scores[head])
        elif last_compute is not None:        # data dependency: every job of an op waits for the previous op
            for job in new:
                job[compute_stage].after.append(last_compute)
        jobs += new
        owner += [op] * len(new)
        if op.name == "qk":
            scores = [(first + h, probs) for h in range(len(new))]
        last_compute = (first + len(new) - 1, compute_stage if op.name != "qk" else probs)
    # One weight buffer, double-buffered across the whole run: the k-th row block's fetch waits
    # until the (k-2)-th block's compute has freed its half.
    weight_jobs = [j for j, op in enumerate(owner) if op.kind == "sparse_dense"]
    for a, b in zip(weight_jobs, weight_jobs[2:]):
        jobs[b][0].after.append((a, 1))
    sched = simulate(jobs)
    dram = {"weights": 0.0, "activations": 0.0, "scores": 0.0}
    macs = {"sparse_dense": 0, "dense_dense": 0}
    exps = 0
    select_pj = 0.0     # operand multiplexers and index decoding
    sram = [0.0, 0.0]   # activation buffer, weight buffer
    op_cycles: dict[str, float] = {}
    for job in jobs:
        for st in job:
            op_cycles[st.op] = op_cycles.get(st.op, 0.0) + st.cycles
    vb = arch.value_bits / 8
    for op in ops:
        if op.kind == "sparse_dense":
            n, m, bits = weight_format(op, arch)
            dens = n / m
            for key, value in linear_dram(op, arch, plans[id(op)]).items():
                dram[key] += value
            macs["sparse_dense"] += op.macs
            # every kept weight's index is decoded and drives an M:1 mux; dense weights pass through
            # the same muxes with identity indices, a sub-group of `lanes` activations at a time
            select_pj += op.macs * (mux_pj(m, arch.value_bits) + index_decode_pj(m) if m > 1
                                    else mux_pj(arch.lanes, arch.value_bits))
            sram = [a + b for a, b in zip(sram, buffer_reads(op.macs, 1 / dens, bits / 8, vb, arch))]
        elif op.kind == "dense_dense":
            macs["dense_dense"] += op.macs
            select_pj += op.macs * mux_pj(arch.lanes, arch.value_bits)
            sram = [a + b for a, b in zip(sram, buffer_reads(op.macs, 1.0, vb, vb, arch))]
        elif op.kind == "softmax":
            exps += op.m * op.k * op.count
            if not arch.onchip_softmax:
                dram["scores"] += 2 * op.m * op.k * op.count * vb
    dram_total = sum(dram.values())
    seconds = sched.makespan / (arch.clock_ghz * 1e9)
    energy = {"engine": (macs["sparse_dense"] + macs["dense_dense"]) * mac_pj(arch.value_bits),
              "select": select_pj,
              "softmax": exps * EXP_PJ,
              "sram": sram[0] * sram_pj_per_byte(bank_bytes(arch.act_buffer_bytes, arch.pe_cols * arch.act_width
                                                            * arch.value_bits))
              + sram[1] * sram_pj_per_byte(bank_bytes(arch.weight_buffer_bytes, arch.pe_rows * arch.lanes
                                                      * (arch.value_bits + max(1, math.ceil(math.log2(arch.act_width))))))}
    energy["control"] = arch.control_fraction * sum(energy.values())
    energy["static"] = arch.static_watts * seconds * 1e12
    energy["dram"] = dram_total * dram_pj_per_byte(arch.dram)
    peak = arch.pes * arch.lanes
    return {
        "arch": arch.name, "cycles": sched.makespan, "seconds": seconds, "cycles_by_op": op_cycles,
        "utilisation": {u: sched.utilisation(u) for u in ("dram", "engine", "softmax")},
        "engine_mac_utilisation": (macs["sparse_dense"] + macs["dense_dense"]) / (sched.makespan * peak)
        if sched.makespan else 0.0,
        "dram_bytes": dram, "dram_bytes_total": dram_total,
        "activations_on_chip": all(mode == "resident" for mode, _ in plans.values()),
        "activation_plans": {mode: sum(m == mode for m, _ in plans.values())
                             for mode in ("resident", "tokens-outer", "weights-outer")},
        "macs": macs, "dense_equivalent_macs": sum(o.m * o.k * o.n * o.count for o in ops if o.kind != "softmax"),
        "sram_bytes": {"activations": sram[0], "weights": sram[1]}, "energy_pj": energy, "energy_j": sum(energy.values()) * 1e-12,
        "layer_cycles": span_by(sched, [op.layer for op in owner]),
    }


def sta_workload(shape: ModelShape, tokens: int, pattern: str | None = None,
                 token_keep: list[float] | None = None, head_keep: list[float] | None = None) -> list[Op]:
    """Model ops for STA; with head_keep the attention products cover the kept heads only (and the
    projections the kept heads' rows; the combination neither paper evaluates)."""
    ops = model_ops(shape, tokens, pattern, token_keep)
    if head_keep is None:
        return ops
    if len(head_keep) != shape.layers:
        raise ValueError(f"head_keep has {len(head_keep)} ratios for {shape.layers} layers")
    out = []
    for op in ops:
        heads = max(1, int(shape.heads * head_keep[op.layer]))
        kv_heads = max(1, int((shape.kv_heads or shape.heads) * head_keep[op.layer]))  # GQA: whole KV groups
        if op.kind in ("dense_dense", "softmax"):
            op = Op(op.layer, op.name, op.kind, op.m, op.k, op.n, op.pattern, heads)
        elif op.name == "q":
            op = Op(op.layer, op.name, op.kind, op.m, op.k, heads * shape.head_dim, op.pattern)
        elif op.name in ("k", "v"):
            op = Op(op.layer, op.name, op.kind, op.m, op.k, kv_heads * shape.head_dim, op.pattern)
        elif op.name == "o":
            op = Op(op.layer, op.name, op.kind, op.m, heads * shape.head_dim, op.n, op.pattern)
        out.append(op)
    return out
