#!/usr/bin/env bash
# One prepared GPU session for the device tool: install, kernel correctness on the GPU, then the
# BASELINES.md protocol at both shapes. Writes everything under $OUT (default ./gpu_out).
#   run: bash scripts/gpu_check.sh        (the image already has torch and triton)
# Budget: ~8 minutes of a 15-minute device session (the machine's start counts too).
set -uo pipefail
OUT=${OUT:-gpu_out}
SHARDS=${SHARDS:-8}
mkdir -p "$OUT"
python3 -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/install.log" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"
# 1. kernels vs the reference on the GPU (compiled Triton, not the interpreter). The tests
# compile ~550 kernel variants, each about a second of single-threaded Triton compilation, so
# they run as $SHARDS processes sharing one Triton cache (BLAZEC_TEST_SHARD, tests/conftest.py).
# The AOT test is a CPU-side check and already runs in CI.
t0=$(date +%s)
for i in $(seq 0 $((SHARDS - 1))); do
  BLAZEC_TEST_SHARD=$i/$SHARDS timeout 170 python3 -m pytest -q -x tests/kernels tests/ops \
    -p no:cacheprovider --ignore=tests/kernels/test_aot_compile.py > "$OUT/tests_$i.log" 2>&1 &
done
fail=0
for job in $(jobs -p); do wait "$job" || fail=1; done
echo "tests: $SHARDS shards, $(( $(date +%s) - t0 )) s, any shard failed: $fail" | tee -a "$OUT/versions.txt"
for i in $(seq 0 $((SHARDS - 1))); do echo "shard $i: $(tail -1 "$OUT/tests_$i.log")"; done
# 2. the protocol at both shapes, kernels on (blazec bench sets BLAZEC_KERNELS=1); the second
# shape reuses the compiled kernels from Triton's cache and only re-tunes.
for shape in olmoe-like:200 mixtral-like:150; do
  timeout "${shape#*:}" python3 -m blazec.bench --shape "${shape%:*}" --dtype bf16 \
    --json "$OUT/bench_${shape%:*}.json" > "$OUT/bench_${shape%:*}.txt" 2>&1
  echo "bench ${shape%:*} rc=$?"; tail -15 "$OUT/bench_${shape%:*}.txt"
done
