"""Fuzz the command line: every flag of every command given values it must refuse (see
tests/cli_bad_inputs.py); each must exit 2 with one line on stderr naming the flag, no traceback.

    .venv/bin/python scripts/fuzz_cli.py [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cli_bad_inputs import Accepted, cases, run_case  # noqa: E402


def classify(argv: list[str], flag: str) -> str:
    try:
        code, err = run_case(argv)
    except Accepted:
        return "accepted"
    except Exception as e:   # noqa: BLE001 - escaped main(): a traceback for a user
        return f"raw {type(e).__name__}"
    lines = err.strip().splitlines()
    if code != 2:
        return f"exit {code}"
    if "Traceback" in err or len(lines) != 1:
        return "not one line"
    return "refused" if flag in lines[0] else "flag not named"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        todo = cases(Path(tmp))
        results = [(a, f, classify(a, f)) for a, f in todo]
    counts = collections.Counter(r for _, _, r in results)
    print(f"{len(results)} bad command lines: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    bad = [{"argv": a, "flag": f, "outcome": r} for a, f, r in results if r != "refused"]
    for case in bad[:20]:
        print("  NOT ACCEPTABLE:", case)
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "bad": bad}, indent=1))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
