#!/usr/bin/env bash
# One prepared GPU session for the device tool: install, kernel correctness on the GPU while
# the compile caches warm up, then the docs/BASELINES.md protocol at both shapes, alone on the GPU.
# Writes everything under $OUT (default ./gpu_out): at most 8 files, as the tool returns.
#   run: bash scripts/gpu_check.sh        (the image already has torch and triton)
# About 8 minutes (the timeouts below: 150 + 2 x 150 s, their kill grace periods, and 90 s for
# each path whose smoke run must be retried) of a 15-minute device session,
# whose start counts too, so that a second, shorter run fits after it; the bench's error columns
# (output, dL/dx and the weight gradients) check the kernels against the loop reference again
# at the real shapes, and each blazec row's first, autotuning step against a later one.
# A dry run of the whole flow on a machine without a GPU (small CPU shapes, interpreter):
#   OUT=/tmp/gco WARM_SHAPE=64,32,48,8,2 WARM_SMALL=64,32,48,8,2 SHAPES="64,32,48,8,2:120" XDIST="-n 2" bash scripts/gpu_check.sh
# (without a GPU each path's smoke run exits 2, no verdict: no path is left out)
set -uo pipefail
export PYTHONUNBUFFERED=1  # a step stopped by its timeout still leaves what it printed
OUT=${OUT:-gpu_out}
TMP=$(mktemp -d)  # the device tool returns at most 8 files from $OUT: logs gather here first
WARM_SHAPE=${WARM_SHAPE:-olmoe-like}
# blazec-loop's first step compiles every launch path its auto modes time (BLAZEC_GEMM1,
# BLAZEC_ROWS, BLAZEC_DX), one after another; the rows that force one path compile theirs in parallel.
WARM_IMPLS=${WARM_IMPLS:-blazec-loop blazec-loop-recompute blazec-loop-split-gemm1 blazec-loop-wide-gemm1 blazec-loop-tma-gemm1 blazec-loop-persistent-rows blazec-loop-cat-dx sort-grouped-mm-compile hf-grouped-mm-compile}
# (the cudagraphs rows share blazec-loop's and sort-grouped-mm-compile's Triton kernels)
# The Triton kernels compiled for olmoe-like are not those mixtral-like runs: some constexprs
# follow E (G_PAD), S = T*k (the route kernels' blocks) and I (the d(routing weight) partial
# count). This shape keeps mixtral-like's E, k, T and I, and so every constexpr and the
# integer arguments' divisibility by 16, with d = 512 instead of 4096: it compiles blazec's
# Triton kernels for mixtral-like, every launch path included, in less memory and time.
# (Inductor's kernels for the rest of the graph are compiled per size: not warmed here.)
WARM_SMALL=${WARM_SMALL-8192,512,14336,8,2}
WARM_SMALL_IMPLS=${WARM_SMALL_IMPLS:-blazec-loop blazec-loop-recompute}
WARM_S=${WARM_S:-150}
TESTS_S=${TESTS_S:-150}  # 140 s ran 446 of 464 tests on the H100 (2026-11-26), 120 s ~90 (2026-11-27)
NEW_TESTS=${NEW_TESTS:-auto_launch or pick_fastest or tma_gemm1 or cat_dx or wide_gemm1 or persistent or split_gemm1 or split_dh or autotuner or recompute_backward or grouped_mm}
NEW_TESTS_S=${NEW_TESTS_S:-75}
SHAPES=${SHAPES:-olmoe-like:150 mixtral-like:150}
# The rows (blazec-ops and blazec-ops-recompute left out by default: they repeat blazec-loop's
# kernels on stacked weights; IMPLS="" runs every row). blazec-loop picks GEMM 1's, the row
# GEMMs' and the gated dX's launch paths by timing (BLAZEC_GEMM1, BLAZEC_ROWS and BLAZEC_DX
# unset: auto; the bench prints the picks); blazec-loop-fused-tiles forces the former defaults
# (fused, tiles, two), and blazec-loop-split-gemm1, blazec-loop-wide-gemm1, blazec-loop-tma-gemm1,
# blazec-loop-persistent-rows and blazec-loop-cat-dx force those with one path changed, in the
# same process, on the same warm card. They run last, after dense-equivalent (the "% dense"
# denominator) and the two mode="reduce-overhead" rows (the compiled baseline and blazec-loop
# replaying CUDA graphs: each step's time without the host's launch cost, and whether blazec
# runs under CUDA graph trees at all), so that a bench stopped by its timeout has lost only
# them: each row prints its line when it ends. blazec-loop-fused-dh and blazec-loop-triton-wgrad were measured in
# both 2026-11-27 runs (slower than the defaults) and are left out to make room.
IMPLS=${IMPLS---impl eager-loop --impl sort-grouped-mm --impl sort-grouped-mm-compile --impl hf-grouped-mm-compile --impl blazec-loop --impl blazec-loop-recompute --impl dense-equivalent --impl sort-grouped-mm-compile-cudagraphs --impl blazec-loop-cudagraphs --impl blazec-loop-fused-tiles --impl blazec-loop-split-gemm1 --impl blazec-loop-wide-gemm1 --impl blazec-loop-tma-gemm1 --impl blazec-loop-persistent-rows --impl blazec-loop-cat-dx}
# Step 3 (off by default since the bench has that row): blazec-loop with BLAZEC_WGRAD=grouped_mm
# in a process of its own, profiled.
WGRAD_SHAPES=${WGRAD_SHAPES-}
# Step 4 (off by default; measured on the H100 on 2026-11-26): blazec-loop on the reference ops.
REF_SHAPES=${REF_SHAPES-}
XDIST=${XDIST:--n 12}
mkdir -p "$OUT"
python3 -m pip install --no-deps --no-build-isolation -q -e . > "$TMP/install.log" 2>&1 \
  || { echo "install failed:"; tail -20 "$TMP/install.log"; } | tee -a "$OUT/versions.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" \
  | tee -a "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit \
  --format=csv 2>&1 | tee -a "$OUT/versions.txt"
# 1. Compile first. A cold Triton cache would make the first bench compile every autotune
# config of every kernel variant one after another, so one untimed step of each compiled row
# runs first, in parallel processes that fill the shared Triton and Inductor caches (their
# tables are kept as a first look; their timings mean nothing, the rows ran concurrently).
# Meanwhile the kernel tests run: kernels vs the reference on the GPU (compiled Triton, not
# the interpreter; BLAZEC_AUTOTUNE=0, first configs), on pytest-xdist workers sharing the
# cache. The AOT test is a CPU-side check and already runs in CI.
t0=$(date +%s)
# Each timed launch path once, forced, on a small problem in a process of its own
# (scripts/path_smoke.py): one that does not exit 0 there (a fault ends a process, which the
# timed choice's own check cannot catch) is left out of the bench below, from blazec-loop's
# timed choices (BLAZEC_AUTO_EXCLUDE) and as a forced row. First configs only (no autotuning):
# a crash check, not a timing.
SMOKE_PATHS=${SMOKE_PATHS-tma cat cat-persistent wide split persistent}
for p in $SMOKE_PATHS; do
  ( PYTHONPATH=. BLAZEC_AUTOTUNE=0 timeout -k 10 140 python3 scripts/path_smoke.py "$p" > "$TMP/smoke_$p.txt" 2>&1
    echo $? > "$TMP/smoke_$p.rc" ) &
done
for impl in $WARM_IMPLS; do
  timeout -k 10 "$WARM_S" python3 -m blazec.bench --shape "$WARM_SHAPE" --dtype bf16 --impl "$impl" --warmup 0 --iters 1 \
    > "$TMP/warm_$impl.txt" 2>&1 &
done
if [ -n "$WARM_SMALL" ]; then
  for impl in $WARM_SMALL_IMPLS; do
    timeout -k 10 "$WARM_S" python3 -m blazec.bench --shape "$WARM_SMALL" --dtype bf16 --impl "$impl" --warmup 0 --iters 1 \
      > "$TMP/warm_small_$impl.txt" 2>&1 &
  done
fi
# The tests of the newest code paths first (NEW_TESTS, a -k expression), then all of them.
# A timeout interrupts pytest (SIGINT) rather than killing it, so that the failures it has met
# so far are still summarized in the log (killed after 15 s more if it does not stop).
timeout -s INT -k 15 "$NEW_TESTS_S" python3 -m pytest -q -m "" $XDIST tests/kernels -p no:cacheprovider -k "$NEW_TESTS" \
  --ignore=tests/kernels/test_aot_compile.py > "$OUT/tests_new.log" 2>&1
echo "new-path tests rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/tests_new.log")" | tee -a "$OUT/versions.txt"
left=$(( TESTS_S - ($(date +%s) - t0) )); [ "$left" -ge 10 ] || left=10
timeout -s INT -k 15 "$left" python3 -m pytest -q -x -m "" $XDIST tests/kernels tests/ops -p no:cacheprovider \
  --ignore=tests/kernels/test_aot_compile.py > "$OUT/tests.log" 2>&1
echo "tests rc=$? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/versions.txt"
tail -5 "$OUT/tests.log"
wait
for f in "$TMP"/warm_*.txt "$TMP"/smoke_*.txt; do [ -e "$f" ] && { echo "== $f"; cat "$f"; }; done > "$OUT/warm.txt"
EXCLUDE=""
declare -A ROW_OF=([tma]=blazec-loop-tma-gemm1 [wide]=blazec-loop-wide-gemm1 [split]=blazec-loop-split-gemm1
                   [persistent]=blazec-loop-persistent-rows [cat]=blazec-loop-cat-dx)
for p in $SMOKE_PATHS; do
  rc=$(cat "$TMP/smoke_$p.rc" 2>/dev/null || echo missing)
  if [ "$rc" != 0 ] && [ "$rc" != 2 ]; then  # once more, alone on the GPU with warm caches:
    # a run slowed past its timeout, or out of memory, among the warm-ups is no verdict
    PYTHONPATH=. BLAZEC_AUTOTUNE=0 timeout -k 10 90 python3 scripts/path_smoke.py "$p" >> "$TMP/smoke_$p.txt" 2>&1
    rc="$rc, then $?"
  fi
  echo "path_smoke $p: rc=$rc; $(tail -1 "$TMP/smoke_$p.txt" 2>/dev/null)" | tee -a "$OUT/versions.txt"
  # 2: no CUDA device or a name path_smoke does not know (a typo in SMOKE_PATHS): no verdict
  if [ "${rc##* }" != 0 ] && [ "${rc##* }" != 2 ]; then
    EXCLUDE="$EXCLUDE${EXCLUDE:+,}$p"
    row=${ROW_OF[$p]:-}
    [ -n "$row" ] && IMPLS=${IMPLS//--impl $row/}
  fi
done
if [ -n "$EXCLUDE" ]; then
  export BLAZEC_AUTO_EXCLUDE=$EXCLUDE
  echo "left out of the bench: $EXCLUDE (BLAZEC_AUTO_EXCLUDE, and their forced rows)" | tee -a "$OUT/versions.txt"
fi
echo "cache warm-up and tests: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/versions.txt"
# 2. The protocol at both shapes, alone on the GPU, kernels on (the default on CUDA), with a
# profiled step per row (per-launch kernel times, GPU busy time).
# The SM clock, power and throttle reasons are sampled every 500 ms during each bench: a step
# time above its kernels' sum can be a lower clock under the power limit, not the host.
for shape in $SHAPES; do
  SMI=""
  REASONS=""  # the field's name before and after the drivers renamed it
  for f in clocks_event_reasons.active clocks_throttle_reasons.active; do
    nvidia-smi --query-gpu="$f" --format=csv,noheader > /dev/null 2>&1 && { REASONS=$f; break; }
  done
  if [ -n "$REASONS" ]; then
    nvidia-smi --query-gpu="clocks.sm,power.draw,$REASONS" --format=csv,noheader,nounits \
      -lms 500 > "$TMP/smi_${shape%:*}.csv" 2>&1 & SMI=$!
  fi
  # SIGINT at the timeout: the bench stops its rows and still prints its table, targets and JSON
  timeout -s INT -k 20 "${shape#*:}" python3 -m blazec.bench --shape "${shape%:*}" --dtype bf16 --profile $IMPLS \
    --json "$OUT/bench_${shape%:*}.json" > "$OUT/bench_${shape%:*}.txt" 2>&1
  echo "bench ${shape%:*} rc=$?"; grep -v "^  running" "$OUT/bench_${shape%:*}.txt" | tail -80
  if [ -n "$SMI" ]; then
    kill "$SMI" 2>/dev/null; wait "$SMI" 2>/dev/null
    python3 - "$TMP/smi_${shape%:*}.csv" "${shape%:*}" <<'PY' | tee -a "$OUT/versions.txt"
import collections, statistics, sys
rows = [l.split(",") for l in open(sys.argv[1]) if l.count(",") == 2]
try:
    clk = [float(r[0]) for r in rows]; pw = [float(r[1]) for r in rows]
except ValueError:
    clk = []
if not clk:
    print(f"nvidia-smi during {sys.argv[2]}: no readable samples"); raise SystemExit
busy = [i for i, p in enumerate(pw) if p > 200]  # samples with the GPU under load
reasons = collections.Counter(rows[i][2].strip() for i in busy)
sel = [clk[i] for i in busy] or clk
print(f"nvidia-smi during {sys.argv[2]}: {len(rows)} samples, {len(busy)} above 200 W; SM clock under load "
      f"min {min(sel):.0f} / median {statistics.median(sel):.0f} / max {max(sel):.0f} MHz; power max {max(pw):.0f} W; "
      f"throttle reasons under load: {dict(reasons.most_common(4))}")
PY
  fi
done
# 3. blazec on the loop model with the weight gradients through torch's grouped GEMM on sorted
# row copies (kernels/wgrad_grouped_mm.py), profiled, so that its per-launch times show.
for shape in $WGRAD_SHAPES; do
  BLAZEC_WGRAD=grouped_mm timeout "${shape#*:}" python3 -m blazec.bench --shape "${shape%:*}" --dtype bf16 \
    --profile --impl blazec-loop > "$TMP/wgrad_${shape%:*}.txt" 2>&1
  echo "grouped_mm wgrad ${shape%:*} rc=$?"; grep -v "^  running" "$TMP/wgrad_${shape%:*}.txt" | tail -40
done
if [ -n "$WGRAD_SHAPES" ]; then  # (a file only then: $OUT returns at most 8)
  for f in "$TMP"/wgrad_*.txt; do [ -e "$f" ] && { echo "== $f"; cat "$f"; }; done > "$OUT/wgrad.txt"
fi
# 4. For comparison: blazec on the loop model with the reference ops instead of the kernels
# (BLAZEC_KERNELS=0), last, as it matters least.
for shape in $REF_SHAPES; do
  BLAZEC_KERNELS=0 timeout "${shape#*:}" python3 -m blazec.bench --shape "${shape%:*}" --dtype bf16 \
    --impl blazec-loop > "$TMP/ref_${shape%:*}.txt" 2>&1
  echo "reference ops ${shape%:*} rc=$?"; grep -E "^    blazec-loop" "$TMP/ref_${shape%:*}.txt" | tee -a "$OUT/versions.txt"
done
