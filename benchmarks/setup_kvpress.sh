#!/usr/bin/env bash
# The venv for benchmarks/kv_peers.py: NVIDIA's kvpress pins transformers < 5.3, so it gets its own
# venv (benchmarks/.venv-kvpress), never the project's. sparsetx is installed into it as well, so
# both run in one process on identical weights. Afterwards:
#   benchmarks/.venv-kvpress/bin/python benchmarks/kv_peers.py
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
venv=benchmarks/.venv-kvpress
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install "torch==2.13.0"          # first and pinned: the local CPU wheel, never a CUDA build
pip install "kvpress==0.5.5"         # resolves transformers 5.2.x (its pin: >=4.56,<5.3)
pip install -e .                     # sparsetx supports transformers >= 5.0: it runs on kvpress's
pip install --no-deps -r requirements-assets.txt
"$venv/bin/python" -c "import kvpress, transformers, sparsetx; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__)"
