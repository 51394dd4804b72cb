#!/usr/bin/env bash
# The venv for benchmarks/scalesim_check.py: SCALE-Sim 3.0.0 (pure Python) needs numpy < 2.4, which
# the project's lock does not allow, so it gets its own venv (benchmarks/.venv-scalesim). Afterwards:
#   benchmarks/.venv-scalesim/bin/python benchmarks/scalesim_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
venv=benchmarks/.venv-scalesim
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@"; }
pip install "scalesim==3.0.0" "numpy<2.4"
"$venv/bin/python" -c "import scalesim, numpy; print('scalesim 3.0.0, numpy', numpy.__version__)"
