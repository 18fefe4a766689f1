#!/bin/bash
# Everything that only a GPU can show, in one command for a lent GPU machine (see
# ../shared/device/README.md), done within 420 s by its parts' own timeouts (a command may run
# 600 s), in this order:
#   (a) the GPU, the versions, and which bitsandbytes library loaded (gpu.txt, environment.txt);
#   (b) quick checks of what broke before (scripts/gpu_quick_checks.py: quick_checks.md);
#   (c) the CUDA tests (tests_cuda.log);
#   (d) the step, layout and preset benchmarks on CUDA, a trimmed grid (bench_step.md,
#       bench_layout.md: what bitsandbytes' per-parameter synchronize costs; bench_presets.md);
#   (e) fine-tuning with the 8gb preset on an emulated 8 GB card, one epoch of CIFAR-10 capped at
#       100 steps (images/s and peak memory in ft8gb/summary.json).
# Run from the repository root after the kit's preamble, which `bash ../shared/device/make-gpu-kit.sh`
# prints (it puts the kit on PYTHONPATH and CIFAR-10 under /tmp/data):
#
#   <preamble printed by ../shared/device/make-gpu-kit.sh> bash scripts/gpu_checks.sh
#   bash scripts/gpu_checks.sh --dry-run     # on a CPU: every part in a tiny CPU form, ~3 minutes
#
# Results go under $OUT (default ./gpu-out). Each part has its own time limit, so that one slow
# part leaves the others their time, and appends its row (exit status, seconds, log) to
# summary.md as it ends; the quick checks and the benchmarks write theirs row by row too, so a
# kill at any moment keeps what had finished.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
scratch=$(mktemp -d)  # run folders: their weights and checkpoints are not results
trap 'rm -rf "$scratch"' EXIT

if [ "${1:-}" = "--dry-run" ]; then
  DEVICE=cpu
  export LOWRES_SSL_CACHE=$scratch/cache  # the tiny folder's decoded cache: not in the user's
  DATA=$scratch/data
  python scripts/gpu_quick_checks.py --make-tiny-folder "$DATA"
  CARD_GIB=  # no card to emulate
  STEP_GRID=(--sizes 32 --batch 8 --micro-batches 4 --max-rows 2 --projector 32-64 --warmup 0
    --steps 1)
  PRESET_GRID=(--presets cpu --max-cases 1 --steps 1)
  LAYOUT_GRID=(--batch 4 --repeats 1)
  FINETUNE=(--max-steps 2 --set train.batch_size=4)
else
  DEVICE=cuda
  DATA=/tmp/data/cifar10
  CARD_GIB=8
  STEP_GRID=(--sizes 32 --micro-batches 256 --warmup 2 --steps 5)
  PRESET_GRID=(--presets 8gb --steps 3)
  LAYOUT_GRID=()
  FINETUNE=(--max-steps 100)
fi

SUMMARY=$OUT/summary.md
printf '| part | rc | seconds | output |\n|---|---:|---:|---|\n' > "$SUMMARY"

# part NAME LOG COMMAND...: run COMMAND (it starts with its own `timeout N`) with its output in
# $OUT/LOG, then append its row to summary.md at once; rc 124 is the timeout's.
part() {
  local name=$1 log=$2 start=$SECONDS rc
  shift 2
  "$@" > "$OUT/$log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && rc="124 (timed out)"
  printf '| %s | %s | %d | %s |\n' "$name" "$rc" $((SECONDS - start)) "$log" >> "$SUMMARY"
  echo "$name: rc $rc after $((SECONDS - start)) s"
}

part gpu gpu.txt timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
part environment environment.txt \
  timeout 40 python scripts/gpu_quick_checks.py --environment --device "$DEVICE"
part "quick checks" quick_checks.log \
  timeout 95 python scripts/gpu_quick_checks.py --device "$DEVICE" --data "$DATA/train" \
  --out "$OUT" --time-limit-s 90
part "CUDA tests" tests_cuda.log \
  timeout 70 python -m pytest -q -p no:cacheprovider tests/losses/test_cuda.py \
  tests/eval/test_cuda.py tests/models/test_models.py -k "cuda or CUDA"
part bench_step bench_step.log \
  timeout 55 python scripts/bench_step.py --device "$DEVICE" "${STEP_GRID[@]}" \
  --output "$OUT/bench_step.md"
part bench_layout bench_layout.log \
  timeout 30 python scripts/bench_layout.py --device "$DEVICE" "${LAYOUT_GRID[@]}" \
  --output "$OUT/bench_layout.md"
part bench_presets bench_presets.log \
  timeout 60 python scripts/bench_presets.py --device "$DEVICE" "${PRESET_GRID[@]}" \
  --output "$OUT/bench_presets.md"
# Random init: throughput and memory do not depend on the weights.
part "finetune 8gb" finetune.log \
  timeout 60 env LOWRES_SSL_GPU_GIB="$CARD_GIB" python scripts/finetune.py --random-init \
  --preset 8gb --train "$DATA/train" --val "$DATA/test" --epochs 1 "${FINETUNE[@]}" \
  --out "$scratch/ft8gb"
mkdir -p "$OUT/ft8gb"
cp "$scratch"/ft8gb/{summary.json,metrics.jsonl,config.yaml} "$OUT/ft8gb/" 2>/dev/null

cat "$SUMMARY" "$OUT/quick_checks.md" 2>/dev/null
