#!/usr/bin/env bash
# One call on a GPU machine: install the wheels in .device/wheels, run GPU tests, run benches, pack results into $OUT.
#   usage (the tree copied with .device):  bash bench/device_run.sh [bench names...]
# With names (e.g. `glu rope`), only those benches run (bench/run.py --ops <name> for an op with
# bench/cases/<name>.py, else python3 -m bench.e2e.<name> for bench/e2e/<name>.py, e.g. sft, grpo_dpo,
# offload, long_context); the GPU tests of those ops run first,
# (a name written `test:glu` runs the GPU tests only, no bench),
# one file at a time with its own time limit, so a bench only counts once its tests pass and a slow
# file cannot starve the others. The device returns at most 8 files: everything is written to a work
# folder and packed into $OUT/results.tar.gz after every step (a run cut short still returns the rest).
set -uo pipefail
OUT=${OUT:-/tmp/fastkern-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pack() { tar -czf "$OUT/results.tar.gz" -C "$W" . ; }
if [ -d .device/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$W/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$W/device.txt"
names=(); benches=()
for a in "$@"; do
  if [[ $a == test:* ]]; then names+=("${a#test:}"); else names+=("$a"); benches+=("$a"); fi
done
if [ ${#names[@]} -eq 0 ]; then
  names=($(ls bench/cases/*.py | sed 's#bench/cases/##; s#\.py##') sft_options grpo_dpo offload)
  benches=("${names[@]}")
fi
# Seconds per GPU test file, measured on an H100 (first compile of every kernel variant included);
# files not listed get 60.
declare -A LIMIT=([glu]=180 [rms_norm]=150 [rope]=240 [linear_cross_entropy]=180 [linear_cross_entropy_onchip]=420 [linear_logprobs]=60 [nf4]=30 [nf4_matmul]=120 [lora_linear]=120 [large_offsets]=90
                  [document_attention]=40 [offload_checkpoint]=120 [grpo_dpo]=240 [rope_qk_norm]=90)
status=0
SECONDS=0
for n in "${names[@]}"; do
  # An op's GPU tests live in tests/**/test_<name>*.py; the log-prob op shares the linear-CE kernel.
  for f in $(find tests -name "test_${n}*.py" -o -name "test_${n/cross_entropy/logprobs}*.py" | sort -u); do
    key=$(basename "$f" .py); key=${key#test_}
    timeout "${LIMIT[$key]:-60}" python3 -m pytest -q -rfE -p no:cacheprovider -m gpu --hypothesis-profile=gpu \
      --durations=5 "$f" > "$W/gpu_test_$key.log" 2>&1 || status=1
    echo "gpu tests $f (t=${SECONDS}s): $(grep -E '(passed|failed|error)' "$W/gpu_test_$key.log" | tail -1)"
    pack
  done
done
for n in "${benches[@]}"; do
  echo "=== bench ${n} (t=${SECONDS}s)"
  if [ -f "bench/cases/${n}.py" ]; then
    timeout 300 python3 bench/run.py --ops "$n" --out "$W/$n" 2>&1 | tee "$W/bench_${n}.log" | tail -40 || status=1
  elif [ -f "bench/e2e/${n}.py" ]; then
    timeout 300 python3 -m "bench.e2e.${n}" --out "$W/$n" 2>&1 | tee "$W/bench_${n}.log" | tail -40 || status=1
  fi
  pack
done
echo "=== done (t=${SECONDS}s); results in \$OUT/results.tar.gz"
exit $status
