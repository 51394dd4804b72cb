"""``sparsetx sim validate``: the papers' headline figures next to the simulators' own, with the
ratio, or the reason a figure cannot be reproduced here."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from ..formats.packed import packed_bytes
from ..nm.pattern import NMPattern
from .arch import SpAttenArch, STAArch
from .baselines import PLATFORMS, implied_efficiency
from .spatten import official_arch, simulate_spatten, topk_cycles, work_from_shape, work_from_trace
from .sta import simulate_sta, sta_workload
from .workload import ModelShape
from .run import keep_schedules

FIGURES = Path(__file__).with_name("paper_figures.json")
TRACES = {"gpt2-small": "summary-gpt2-small-wikitext2-per8.csv",
          "gpt2-medium": "summary-gpt2-medium-wikitext2-per0-hp-step5+dedic+glob_p+local_p+hp+topk+quant.csv"}


def traces_dir() -> Path | None:
    """The official SpAtten traces: $SPARSETX_TRACES, or shared/spatten-traces beside the checkout."""
    env = os.environ.get("SPARSETX_TRACES")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "spatten-traces")
    return next((c for c in candidates if (c / TRACES["gpt2-small"]).exists()), None)


def _unquantized(work):
    """The same pruned workload fetched at fp32 (isolates pruning from quantization)."""
    return [replace(w, key_bits=32, value_bits=32, query_bits=32, requant=False) for w in work]


def reproduce(progress=None) -> list[dict]:
    """Every figure of paper_figures.json with ours, the ratio and a status."""
    figures = json.loads(FIGURES.read_text())["figures"]
    paper = {f["id"]: f["value"] for f in figures}   # the paper's side, quoted once (in the JSON)
    ours: dict[str, tuple[float | None, str]] = {}
    tick = progress or (lambda msg: None)

    # --- SpAtten ------------------------------------------------------------------------------
    tick("top-k engine")
    ours["spatten.topk_cycles"] = (topk_cycles(1024, 512, 16, 3), "quick-select rounds, mean of 24 random inputs")
    sp = SpAttenArch()
    tdir = traces_dir()
    runs = {}
    if tdir is None:
        reason = "official traces not found (set SPARSETX_TRACES or place shared/spatten-traces beside the checkout)"
        for k in ("key_fetch_fraction", "lsb_refetch", "pruning_dram_reduction", "quant_dram_reduction",
                  "dram_reduction", "gpt2_tflops", "speedup_titan_xp", "speedup_xeon", "topk_comparators_saturate",
                  "kv_sram_saturate", "gpt2_prune_speedup", "gpt2_quant_speedup", "power_w", "topk_power_share",
                  "energy_titan_xp", "energy_xeon"):
            ours[f"spatten.{k}"] = (None, reason)
    else:
        for name, file in TRACES.items():
            tick(f"SpAtten on the {name} trace")
            work, _ = work_from_trace(tdir / file, sp, "paper")   # the figures below read the trace as the paper does
            runs[name] = (work, simulate_spatten(work, sp), simulate_spatten(_unquantized(work), sp))
        small = runs["gpt2-small"][1]
        ours["spatten.key_fetch_fraction"] = (small["key_fetch_fraction"], "GPT-2 small trace, summed over steps and layers")
        ours["spatten.lsb_refetch"] = (small["requant_fraction"], "GPT-2 small trace, heads with if_requant")
        # K and V fetches only (Q is produced by the FC layers, which run off SpAtten)
        prune = [r[2]["kv_reduction"] for r in runs.values()]
        small_q, small_f = runs["gpt2-small"][1], runs["gpt2-small"][2]
        quant = (small_f["dram_bytes_total"] - small_f["dram_bytes"]["q"]) / (small_q["dram_bytes_total"] - small_q["dram_bytes"]["q"])
        medium_quant = runs["gpt2-medium"][1]["kv_reduction"] / runs["gpt2-medium"][2]["kv_reduction"]
        total = [r[1]["kv_reduction"] for r in runs.values()]
        ours["spatten.pruning_dram_reduction"] = (sum(prune) / 2, "K/V fetches, mean of the two GPT-2 traces (small {:.2f}x, "
                                                  "medium {:.2f}x), pruned at fp32 vs dense fp32".format(*prune))
        ours["spatten.quant_dram_reduction"] = (quant, f"the GPT-2-small trace (K 6 MSB + 4 LSB bits on refetch, V 6) vs "
                                                f"fp32; the medium trace quantizes statically (K 12, V 8 bits: "
                                                f"{medium_quant:.2f}x) without progressive refetch")
        ours["spatten.dram_reduction"] = (sum(total) / 2, "K/V, GPT-2 traces only (small {:.1f}x, medium {:.1f}x): the "
                                          "paper's figure averages 30 benchmarks, 22 of them BERT runs without "
                                          "progressive quantization, so ours is higher".format(*total))
        gen = [r[1]["generation"]["tflops"] for r in runs.values()]
        whole = [r[1]["tflops"] for r in runs.values()]
        ours["spatten.gpt2_tflops"] = (sum(gen) / 2, "generation steps (one query a step; SpAtten's GPT-2 focus), mean of "
                                       "the traces (small {:.2f}, medium {:.2f}); with the 993-token prompt stage "
                                       "counted: {:.2f} / {:.2f}".format(*gen, *whole))
        # GPT-2 speedup breakdown: generation steps (one query each), dense fp32 -> cascade pruning
        # (fp32) -> progressive quantization, each on the same simulated datapath
        tick("SpAtten GPT-2 speedup breakdown")
        steps = {}
        for name, (work, _, _) in runs.items():
            gen = [w for w in work if w.step > 0]
            dense = [replace(w, keys=w.length, values=w.length, token_topk=None, topk_n=0) for w in _unquantized(gen)]
            steps[name] = [simulate_spatten(ws, sp)["cycles"] for ws in (dense, _unquantized(gen), gen)]
        prune = {n: c[0] / c[1] for n, c in steps.items()}
        quant = {n: c[1] / c[2] for n, c in steps.items()}
        which = "the paper's text we have does not say which GPT-2 the breakdown used; the datapath bar (over the GPU) needs the GPU's measured latency"
        ours["spatten.gpt2_prune_speedup"] = (sum(prune.values()) / 2, "generation steps, dense fp32 vs pruned fp32 cycles, mean of the traces "
                                              "(small {:.2f}x: it keeps 27.6 % of the keys; medium {:.2f}x); ".format(*prune.values()) + which)
        ours["spatten.gpt2_quant_speedup"] = (sum(quant.values()) / 2, "generation steps, pruned fp32 vs pruned with the trace's progressive "
                                              "quantization, mean of the traces (small {:.2f}x, medium {:.2f}x)".format(*quant.values()))
        # design-space claims and power, on the traces as the official RTL simulator reads them
        tick("SpAtten design sweeps (official semantics)")
        official = {name: work_from_trace(tdir / file, sp)[0] for name, file in TRACES.items()}
        cyc = lambda name, **kw: simulate_spatten(official[name], official_arch(replace(sp, **kw)))["cycles"]  # noqa: E731
        base = {name: simulate_spatten(w, official_arch(sp)) for name, w in official.items()}
        c16, c32 = base["gpt2-small"]["cycles"], cyc("gpt2-small", topk_comparators=32)
        ours["spatten.topk_comparators_saturate"] = (c16 / c32, f"GPT-2-small trace, official semantics: {c16:,.0f} "
                                                     f"cycles at 16 comparators, {c32:,.0f} at 32")
        kv = {48: cyc("gpt2-medium", kv_buffer_bytes=48 * 1024), 196: base["gpt2-medium"]["cycles"],
              392: cyc("gpt2-medium", kv_buffer_bytes=392 * 1024)}
        ours["spatten.kv_sram_saturate"] = (kv[196] / kv[392], "GPT-2-medium trace (96-KB heads), official semantics: "
                                            "{:,.0f} / {:,.0f} / {:,.0f} cycles at 48 / 196 / 392 KB".format(*kv.values()))
        chip = {n: _energy_pj(r, chip_only=True) * 1e-12 / r["seconds"] for n, r in base.items()}
        total = {n: _energy_pj(r, chip_only=False) * 1e-12 / r["seconds"] for n, r in base.items()}
        topk = {n: r["energy_pj"]["topk"] / _energy_pj(r, chip_only=True) for n, r in base.items()}
        watts = paper["spatten.power_w"]
        ours["spatten.power_w"] = (sum(chip.values()) / 2, "on-chip dynamic power on the GPT-2 traces, official semantics "
                                   "(small {:.2f} W, medium {:.2f} W; with HBM2: {:.2f} / {:.2f} W). The energy table counts "
                                   "arithmetic and SRAM accesses only (45 nm): no clock tree, pipeline registers, control, "
                                   "crossbar or leakage, which a 1 GHz synthesised chip pays".format(*chip.values(), *total.values()))
        at_paper = {n: r["energy_pj"]["topk"] * 1e-12 / r["seconds"] / watts for n, r in base.items()}
        ours["spatten.topk_power_share"] = (sum(topk.values()) / 2, "top-k energy (comparators + candidate buffer) over "
                                            "on-chip energy, GPT-2 traces, official semantics (small {:.2%}, medium "
                                            "{:.2%}); the denominator misses the same overheads as the power: against "
                                            "the paper's {:.2f} W the engine's power is {:.2%} / {:.2%}, so the figure lies "
                                            "in that bracket".format(*topk.values(), watts, *at_paper.values()))
        for target, plat in (("titan_xp", "titan-xp"), ("xeon", "xeon-e5-2640v4")):
            key, speedup, saving = f"speedup_{target}", paper[f"spatten.speedup_{target}"], paper[f"spatten.energy_{target}"]
            eff = _attention_implied(runs["gpt2-small"][0], small["seconds"], speedup, PLATFORMS[plat])
            ours[f"spatten.{key}"] = (None, f"baseline latency was measured on the platform, not given; if {speedup}x held "
                                            f"over our GPT-2-small latency, the {PLATFORMS[plat].name} would run at "
                                            f"{eff:.1%} of its roofline ({'consistent' if eff <= 1 else 'INCONSISTENT'})")
            # energy saving = speedup x (baseline power / SpAtten power): the baseline's power is implied
            implied = [saving / speedup * p for p in (sum(chip.values()) / 2, sum(total.values()) / 2, watts)]
            ours[f"spatten.energy_{target}"] = (None, f"needs the {PLATFORMS[plat].name}'s measured energy; with the paper's "
                                             f"{speedup}x speedup the saving implies a baseline drawing {saving / speedup:.2f}x "
                                             f"SpAtten's power: {implied[0]:.1f} W against our on-chip power, {implied[1]:.1f} W "
                                             f"with HBM2, {implied[2]:.1f} W against the paper's {watts:.2f} W (TDP "
                                             f"{PLATFORMS[plat].watts} W: " + ("within it)" if implied[2] <= PLATFORMS[plat].watts else
                                                 "above it: the measured energy must include more than the package, e.g. DRAM or a second socket)"))
    tick("SpAtten on BERT-base")
    bert = ModelShape.from_config("bert-base")
    # The paper's per-task lengths are not given (9 GLUE tasks, SQuAD): a bracket over plausible
    # lengths and over pruning off / on at the review's reductions (tokens 1.9x, heads 1.1x)
    bracket = {}
    for length in (64, 128, 256, 384, 512):
        for tk, hk in ((1.0, 1.0), (0.5, 0.9)):
            sched = keep_schedules(bert.layers, tk, hk)
            bracket[(length, tk)] = simulate_spatten(work_from_shape(bert, length, *sched, arch=sp), sp)["tflops"]
    lo, hi = min(bracket.values()), max(bracket.values())
    ours["spatten.bert_tflops"] = (bracket[(128, 0.5)], f"BERT-base at 128 tokens with cascade pruning (token keep ramping "
                                   f"to 0.5, heads to 0.9); the per-task lengths are not known here: over 64-512 tokens, "
                                   f"pruning off or on, {lo:.2f}-{hi:.2f} TFLOPS. Our pipeline keeps the Q x K and P x V "
                                   f"arrays ~97 % busy on encoders; the RTL's 79 % includes stalls we do not model")
    for key in ("speedup_a3", "speedup_mnnfast", "energy_a3", "energy_mnnfast"):
        ours[f"spatten.{key}"] = (None, "no model of A3 or MNNFast here (their designs' parameters are not in SEEDS.md/HW.md)")
    for key, what in (("area_mm2", "the chip's"), ("topk_area_share", "the top-k engine's share of")):
        ours[f"spatten.{key}"] = (None, f"no area model: {what} area needs synthesis or per-cell areas at 40 nm, which "
                                        f"none of our sources give")

    # --- STA ----------------------------------------------------------------------------------
    for pat, key in (("2:4", "2_4"), ("2:8", "2_8"), ("1:8", "1_8")):
        p = NMPattern.parse(pat)
        ours[f"sta.compression_{key}"] = (768 * 768 * 2 / packed_bytes((768, 768), p, 16), "16-bit values + ceil(log2 M)-bit indices")
    tick("STA on BERT-base")
    sta = STAArch()
    ops = sta_workload(bert, 128, None)
    dense = simulate_sta(ops, sta)
    sparse = simulate_sta(sta_workload(bert, 128, "2:8"), sta)
    linear = lambda r: sum(v for k, v in r["cycles_by_op"].items() if k in ("q", "k", "v", "o", "ffn_gate", "ffn_in", "ffn_out"))  # noqa: E731
    ours["sta.sparse_speedup_2_8"] = (linear(dense) / linear(sparse), "engine cycles of the linear layers, BERT-base, 128 tokens")
    for key, plat in (("speedup_i9", "i9-9900x"), ("speedup_2080ti", "rtx2080ti")):
        speedup = paper[f"sta.{key}"]
        eff = implied_efficiency(sparse["seconds"], speedup, ops, PLATFORMS[plat])
        ours[f"sta.{key}"] = (None, f"FPGA part, clock, DSPs and the benchmark are not in the text we could read; with our "
                                    f"assumed STA (2:8, BERT-base, 128 tokens: {sparse['seconds'] * 1e3:.2f} ms) the "
                                    f"{PLATFORMS[plat].name} would run at {eff:.1%} of its roofline")
    ours["sta.speedup_fpga"] = (None, "the compared FPGA accelerators' configurations are not known here")
    dense_eq = sparse["dense_equivalent_macs"] / (sparse["cycles"] * sta.pes * sta.lanes)
    ours["sta.mac_efficiency_fpga"] = (None, f"needs the compared accelerators' throughput per DSP; ours (2:8, BERT-base, "
                                             f"128 tokens, assumed 16 x 16 x 4 multipliers): {dense_eq:.2f} dense-equivalent "
                                             f"MACs a multiplier a cycle ({sparse['engine_mac_utilisation']:.2f} real)")
    ours["sta.energy_efficiency_fpga"] = (None, f"needs the compared accelerators' measured power; ours (2:8, BERT-base, 128 "
                                                f"tokens, assumed FPGA): {sparse['energy_j'] * 1e3:.1f} mJ, "
                                                f"{2 * sparse['dense_equivalent_macs'] / sparse['energy_j'] / 1e9:.1f} dense-equivalent GOP/J")

    rows = []
    for f in figures:
        value, how = ours.get(f["id"], (None, "not computed"))
        ratio = value / f["value"] if value is not None else None
        status = "n/a" if ratio is None else ("ok" if abs(ratio - 1) <= f["tolerance"] else "off")
        rows.append({**f, "ours": value, "ratio": ratio, "status": status, "how": how})
    return rows


def _energy_pj(report: dict, chip_only: bool) -> float:
    """A simulated run's energy, on chip (everything but DRAM) or with DRAM."""
    return sum(v for k, v in report["energy_pj"].items() if not (chip_only and k == "dram"))


def _attention_implied(work, seconds, speedup, platform) -> float:
    """Implied roofline fraction of a baseline running the trace's attention densely at fp32."""
    flops = sum(2 * w.queries * w.length * w.head_dim * 2 for w in work)
    traffic = sum((2 * w.length + w.queries) * w.head_dim * 4 for w in work)
    roof = max(flops / platform.peak_flops, traffic / platform.bandwidth)
    return roof / (seconds * speedup)
