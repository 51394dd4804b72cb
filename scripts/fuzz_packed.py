"""Fuzz the packed-folder loader: N mutants of a good 2:8 folder, each loaded (plain, fast kernel
layers, and `sparsetx info`'s report) in a forked worker given 20 seconds; prints the outcome counts.

    .venv/bin/python scripts/fuzz_packed.py [--mutants 1200] [--seed 0] [--json out.json]

Outcomes (see tests/packed_mutants.py): ok (correct load), refused (PackedFormatError), raw <Type>
(any other exception), wrong (loaded with numbers that differ), hang. Exit status 1 unless every
outcome is ok or refused.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import packed_mutants as pm  # noqa: E402


def _judge(args):
    target, truth, mode, rehashed = args
    return pm.judge(Path(target), truth, mode, rehashed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the counts and every non-acceptable case here")
    args = p.parse_args(argv)
    from rich.progress import track

    ctx = multiprocessing.get_context("fork")   # a blocked open() (a FIFO) cannot be interrupted in-process
    kinds = sorted(pm.MUTATIONS)
    counts = collections.Counter()
    by_kind = collections.defaultdict(collections.Counter)
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        good, truth = pm.make_folder(Path(tmp))
        pool = ctx.Pool(1)
        for i in track(range(args.mutants), description="mutants"):
            kind, mode = kinds[i % len(kinds)], ("load", "fast", "info")[(i // len(kinds)) % 3]
            seed = args.seed * 1_000_003 + i
            target, desc = pm.mutant(good, Path(tmp), kind, seed)
            job = pool.apply_async(_judge, ((str(target), truth, mode, kind == "re-hashed tamper"),))
            try:
                outcome = job.get(timeout=20)
            except multiprocessing.TimeoutError:
                outcome = "hang"
                pool.terminate()
                pool = ctx.Pool(1)
            counts[outcome] += 1
            by_kind[kind][outcome] += 1
            if outcome not in ("ok", "refused"):
                bad.append({"kind": kind, "mode": mode, "seed": seed, "mutation": desc, "outcome": outcome})
            pm.shutil.rmtree(target, ignore_errors=True)
        pool.terminate()
    print(f"{args.mutants} mutants: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    for kind in kinds:
        print(f"  {kind:18s} " + ", ".join(f"{k} {v}" for k, v in by_kind[kind].most_common()))
    for case in bad[:20]:
        print("  NOT ACCEPTABLE:", case)
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "by_kind": by_kind, "bad": bad}, indent=1))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
