#!/bin/bash
# The GPU checks on a machine whose Python has torch but not charbuild's other needs and no
# package index (a lent device). Two steps:
#
#   bash benchmarks/gpu_on_device.sh wheels   # here, with an index: the wheels into .whl/
#   bash benchmarks/gpu_on_device.sh run      # there, with .whl/ carried: install, then check
#
# `run` installs the wheels into /tmp/site, runs gpu_check.py --quick (results under $OUT or
# benchmarks/results), the training and final-model tests, the demo's smoke build and the
# dress rehearsal. vLLM's wheel is too large to carry to such a machine: it is not measured.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
case "${1:-}" in
wheels)
  mkdir -p .whl
  plat=""
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_34_x86_64; do
    plat="$plat --platform $p"
  done
  # The versions this project is tested with; the device's torch, peft, accelerate and hub are used as they are.
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection typing_extensions diskcache==5.6.3 \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 peft==0.21.2 regex
  du -sh .whl ;;
run)
  OUT=${OUT:-benchmarks/results}
  mkdir -p "$OUT"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 330 $PY benchmarks/gpu_check.py --quick --out "$OUT/gpu_check.json" > "$OUT/gpu_check.log" 2>&1
  echo "gpu_check rc=$?"; grep -v -E "it/s\]|Loading weights|Writing model" "$OUT/gpu_check.log" | tail -12
  timeout 140 $PY -m pytest -q -x -p no:cacheprovider tests/test_training.py tests/test_final_model.py > "$OUT/pytest.log" 2>&1
  echo "training tests rc=$?"; tail -3 "$OUT/pytest.log"
  timeout 200 $PY -m charbuild run specs/smoke-small.yaml --cache /tmp/cb-smoke --no-progress > "$OUT/smoke.log" 2>&1
  echo "smoke build rc=$?"; tail -4 "$OUT/smoke.log"
  timeout 240 $PY tests/support/rehearse.py --cache /tmp/cb-rehearse > "$OUT/rehearse.log" 2>&1
  echo "rehearsal rc=$?"; tail -2 "$OUT/rehearse.log" ;;
*)
  echo "usage: $0 wheels|run" >&2; exit 2 ;;
esac
