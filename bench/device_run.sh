#!/usr/bin/env bash
# One call on the GPU machine: install carried wheels, run GPU tests, run benches, write under $OUT.
#   device run (carry .device):  bash bench/device_run.sh [bench names...]
# With names (e.g. `glu rope`), only bench/bench_<name>.py run; the GPU tests always run first for
# those names' test files (tests/**/test_<name>*.py) so a bench only counts once its tests pass.
set -uo pipefail
OUT=${OUT:-/tmp/fastkern-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .device/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=($(ls bench/bench_*.py | sed 's#bench/bench_##; s#\.py##'))
fi
tests=()
# An op's GPU tests live in tests/**/test_<name>*.py; the log-prob op shares the linear-CE kernel.
for n in "${names[@]}"; do tests+=($(find tests -name "test_${n}*.py" -o -name "test_${n/cross_entropy/logprobs}*.py" | sort -u)); done
status=0
if [ ${#tests[@]} -gt 0 ]; then
  SECONDS=0; timeout 240 python3 -m pytest -q -rfE -m gpu --hypothesis-profile=gpu "${tests[@]}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || status=1
fi
for n in "${names[@]}"; do
  [ -f "bench/bench_${n}.py" ] || continue
  echo "=== bench ${n} (t=${SECONDS}s)"
  timeout 300 python3 "bench/bench_${n}.py" --out "$OUT" 2>&1 | tee "$OUT/bench_${n}.log" | tail -40 || status=1
  if [ -f "bench/test_bench_${n}.py" ]; then
    timeout 200 python3 -m pytest -q -p no:cacheprovider "bench/test_bench_${n}.py" --benchmark-json="$OUT/pytest_bench_${n}.json" \
      --benchmark-columns=median,iqr,rounds 2>&1 | tail -15 || status=1
  fi
done
echo "=== done (t=${SECONDS}s)"
exit $status
