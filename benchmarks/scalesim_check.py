"""Cross-check STA's dense x dense engine model against SCALE-Sim 3.0.0 on BERT-base GEMMs.

SCALE-Sim (PyPI ``scalesim``, pure Python) needs numpy < 2.4, so it runs in its own venv
(``bash benchmarks/setup_scalesim.sh``); this script runs in the project's venv and calls it in a
subprocess. Both sides get the same array: 16 x 16 PEs of one multiplier each (``lanes=1``),
output-stationary, dense operands, compute cycles only (SCALE-Sim's "Total Cycles", no DRAM
stalls; our engine stage alone).

    .venv/bin/python benchmarks/scalesim_check.py      # writes benchmarks/results/scalesim/

The result is kept as data: tests/test_sim.py checks our model against the recorded SCALE-Sim
cycles, so the cross-check runs without SCALE-Sim installed (about 80 s of SCALE-Sim here).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsetx.atomic import atomic_path  # noqa: E402
from sparsetx.hw.arch import STAArch  # noqa: E402
from sparsetx.hw.sta import dense_cycles  # noqa: E402
from sparsetx.hw.workload import Op  # noqa: E402

VENV = ROOT / "benchmarks" / ".venv-scalesim" / "bin" / "python"
OUT = ROOT / "benchmarks" / "results" / "scalesim"
# BERT-base at 128 tokens: one head's Q K^T and P V, one head's slice of the Q projection, the
# whole Q projection. (M tokens, N outputs, K reduction), as SCALE-Sim's GEMM topology names them.
GEMMS = {"qk_head": (128, 128, 64), "pv_head": (128, 64, 128), "q_proj_head": (128, 64, 768),
         "q_proj": (128, 768, 768)}

CONFIG = """[general]
run_name = sta_check
[architecture_presets]
ArrayHeight: {rows}
ArrayWidth: {cols}
IfmapSramSzkB: 1024
FilterSramSzkB: 1024
OfmapSramSzkB: 1024
IfmapOffset: 0
FilterOffset: 10000000
OfmapOffset: 20000000
Bandwidth: 10
Dataflow: os
MemoryBanks: 1
ReadRequestBuffer: 32
WriteRequestBuffer: 32
[layout]
IfmapCustomLayout: False
IfmapSRAMBankBandwidth: 10
IfmapSRAMBankNum: 10
IfmapSRAMBankPort: 2
FilterCustomLayout: False
FilterSRAMBankBandwidth: 10
FilterSRAMBankNum: 10
FilterSRAMBankPort: 2
[sparsity]
SparsitySupport: false
SparseRep: ellpack_block
OptimizedMapping: false
BlockSize: 8
RandomNumberGeneratorSeed: 40
[run_presets]
InterfaceBandwidth: CALC
UseRamulatorTrace: False
"""

RUNNER = """
import sys
from scalesim.scale_sim import scalesim
s = scalesim(save_disk_space=True, verbose=False, config=sys.argv[1], topology=sys.argv[2],
             layout=sys.argv[3], input_type_gemm=True)
s.run_scale(top_path=sys.argv[4])
"""


def run_scalesim(rows: int, cols: int) -> dict[str, int]:
    """SCALE-Sim's compute cycles per GEMM (its COMPUTE_REPORT's "Total Cycles")."""
    if not VENV.exists():
        sys.exit(f"SCALE-Sim's venv is missing: run `bash benchmarks/setup_scalesim.sh` first ({VENV})")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "cfg.cfg").write_text(CONFIG.format(rows=rows, cols=cols))
        (t / "topo.csv").write_text("Layer, M, N, K,\n" + "".join(f"{k}, {m}, {n}, {kk},\n" for k, (m, n, kk) in GEMMS.items()))
        (t / "layout.csv").write_text("Layer,\n" + "".join(f"{k},\n" for k in GEMMS))
        # SCALE-Sim 3.0.0's own get_total_cycles() raises (it indexes a method); its report is read instead
        subprocess.run([str(VENV), "-c", RUNNER, str(t / "cfg.cfg"), str(t / "topo.csv"), str(t / "layout.csv"),
                        str(t / "out")], check=True)
        lines = (t / "out" / "sta_check" / "COMPUTE_REPORT.csv").read_text().strip().splitlines()[1:]
    return {name: int(line.split(",")[2]) for name, line in zip(GEMMS, lines)}


def ours(rows: int, cols: int) -> dict[str, dict[str, int]]:
    """Our engine on the same array: broadcast operands (our STA), and the same with a systolic
    array's skew, rows + cols - 2 cycles to fill and drain each output fold."""
    arch = STAArch(pe_rows=rows, pe_cols=cols, lanes=1)
    out = {}
    for name, (m, n, k) in GEMMS.items():
        op = Op(0, "qk", "dense_dense", m=m, k=k, n=n)
        folds = -(-m // cols) * -(-n // rows)
        out[name] = {"sparsetx": dense_cycles(op, arch), "folds": folds,
                     "sparsetx_with_skew": folds * (k + rows + cols - 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--cols", type=int, default=16)
    args = ap.parse_args()
    ref = run_scalesim(args.rows, args.cols)
    mine = ours(args.rows, args.cols)
    rows = []
    print(f"{'GEMM (M x N x K)':28} {'SCALE-Sim':>10} {'sparsetx':>10} {'ratio':>6} {'+ skew':>10}")
    for name, (m, n, k) in GEMMS.items():
        r = {"gemm": name, "m": m, "n": n, "k": k, "scalesim_cycles": ref[name], **mine[name]}
        r["ratio"] = ref[name] / r["sparsetx"]
        rows.append(r)
        print(f"{name + f' ({m} x {n} x {k})':28} {ref[name]:>10,} {r['sparsetx']:>10,} {r['ratio']:>6.2f} "
              f"{r['sparsetx_with_skew']:>10,}")
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {"array": [args.rows, args.cols], "dataflow": "os", "scalesim": "3.0.0", "lanes": 1, "rows": rows,
           "explanation": "SCALE-Sim's output-stationary array shifts operands in with a skew: each output "
                          "fold takes K + rows + cols - 2 cycles and folds do not overlap. Our STA engine "
                          "broadcasts a column's activations to its PEs (no skew) and pipelines the "
                          "adder-tree drain, so a fold takes K + 1. With the skew added our formula equals "
                          "SCALE-Sim's cycle for cycle (up to SCALE-Sim's -1 on the last cycle)."}
    with atomic_path(OUT / "scalesim_check.json") as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT / 'scalesim_check.json'}")


if __name__ == "__main__":
    main()
