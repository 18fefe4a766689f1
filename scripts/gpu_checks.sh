#!/bin/bash
# Everything that only a GPU can show, in one command for a lent GPU machine (see
# ../shared/device/README.md): the CUDA tests, the step benchmark's CUDA rows, every preset
# on an emulated card of its size, and one epoch of fine-tuning with the 8gb preset on an
# emulated 8 GB card (images/s and peak memory in its summary.json). Run from the repository root after the kit's preamble:
#
#   <preamble printed by ../shared/device/make-gpu-kit.sh> bash scripts/gpu_checks.sh
#
# Results go under $OUT (default ./gpu-out): the two reports and the test log. Each part has its
# own time limit so that one slow part leaves the others their time.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
timeout 150 python -m pytest -q -p no:cacheprovider tests/losses/test_cuda.py \
  tests/eval/test_cuda.py tests/models/test_models.py -k "cuda or CUDA" > "$OUT/tests_cuda.log" 2>&1
echo "tests: rc $?" | tee -a "$OUT/summary.txt"
timeout 200 python scripts/bench_presets.py --device cuda --output "$OUT/presets_cuda.md" \
  > "$OUT/presets.log" 2>&1
echo "bench_presets: rc $?" | tee -a "$OUT/summary.txt"
timeout 200 python scripts/bench_step.py --device cuda --output "$OUT/step_cuda.md" \
  > "$OUT/step.log" 2>&1
echo "bench_step: rc $?" | tee -a "$OUT/summary.txt"
# Fine-tuning, 8gb preset, one epoch of CIFAR-10 (the kit's /tmp/data; random init: throughput
# and memory do not depend on the weights).
LOWRES_SSL_GPU_GIB=8 timeout 150 python scripts/finetune.py --random-init --preset 8gb \
  --train /tmp/data/cifar10/train --val /tmp/data/cifar10/test --epochs 1 \
  --out "$OUT/ft8gb" > "$OUT/finetune.log" 2>&1
echo "finetune 8gb: rc $?" | tee -a "$OUT/summary.txt"
tail -n 40 "$OUT/presets_cuda.md" "$OUT/step_cuda.md" "$OUT/ft8gb/summary.json" 2>/dev/null
