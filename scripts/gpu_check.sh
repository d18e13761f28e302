#!/usr/bin/env bash
# One prepared GPU session for the device tool: install, kernel correctness on the GPU, then the
# BASELINES.md protocol at both shapes. Writes everything under $OUT (default ./gpu_out).
#   run: bash scripts/gpu_check.sh        (the image already has torch and triton)
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/install.log" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"
# 1. kernels vs the reference on the GPU (compiled Triton, not the interpreter)
timeout 240 python3 -m pytest -q -x tests/kernels tests/ops -p no:cacheprovider \
  --ignore=tests/kernels/test_aot_compile.py > "$OUT/tests.log" 2>&1  # AOT: CPU-side check, already in CI
echo "tests rc=$?" | tee -a "$OUT/versions.txt"
tail -3 "$OUT/tests.log"
# 2. the protocol at both shapes, kernels on (blazec bench sets BLAZEC_KERNELS=1)
for shape in olmoe-like mixtral-like; do
  timeout 150 python3 -m blazec.bench --shape "$shape" --dtype bf16 --json "$OUT/bench_$shape.json" \
    > "$OUT/bench_$shape.txt" 2>&1
  echo "bench $shape rc=$?"; tail -15 "$OUT/bench_$shape.txt"
done
