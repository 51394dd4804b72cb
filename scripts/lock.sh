#!/usr/bin/env bash
# Regenerates constraints.txt (the lock): resolves the newest versions pyproject.toml allows in a
# throw-away venv and freezes them. Run it on purpose, then run the tests and commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m venv "$tmp/venv"
pip() { "$tmp/venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install "torch==2.13.0"           # first and pinned: the local CPU wheel, never a CUDA build
pip install -e ".[test]"
pip install --no-deps -r requirements-assets.txt
{
  echo "# The lock: exact versions sparsetx is tested with (scripts/setup.sh and .ci/run install with -c)."
  echo "# pyproject.toml keeps the supported ranges; scripts/test_range.sh tests their ends."
  echo "# Regenerate with: bash scripts/lock.sh"
  "$tmp/venv/bin/python" -m pip freeze --disable-pip-version-check | grep -v '^-e\|^#' | sed 's/+cpu$//' | sort -f
} > constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
