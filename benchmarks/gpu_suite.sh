#!/usr/bin/env bash
# gpu_suite.sh -- the one GPU call: build, test, sanitize and measure htc_fast on a fresh GPU
# machine in at most 8 minutes, the most important evidence first.
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh      # from any directory; it works in the repo root
#
# Made for a machine with no network that already has Python, torch (CUDA build), triton,
# torchvision, pytest and pytest-benchmark (pytest-xdist is used when present). Missing pure-Python
# packages (pycocotools) may come as wheels in .whl/: installed to /tmp/site, put on PYTHONPATH.
#
# Phases, in priority order. Each has its own time limit, and each copies its results to $OUT the
# moment it ends, so a call that is cut off still returns everything that finished. A failing
# phase never stops the suite. Planned budget on an H100 machine with 16 cores, from dry runs on
# a 2-core CPU machine: one nvcc compile of the largest .cu for sm_90 alone (66 s), the Triton
# ahead-of-time compile of all 208 kernel variants for sm_80 + sm_90 (80 s on 2 cores,
# scripts/check_triton_compile.py; the op tests JIT-compile about half of that, for sm_90),
# gpu_sanitize.py on CPU (every op, < 10 s with the C++ kernels), and the CPU benchmarks' setup:
#
#   phase        limit  expected  what
#   build         210 s   ~100 s  pip install -e . for sm_90 only, MAX_JOBS=16 (10 units; the
#                                 largest, DCN, takes 66 s on one core here for sm_90 alone)
#   env            20 s     ~5 s  versions, GPU, compiled archs, backend per op
#   op-tests      110 s    ~70 s  pytest tests/ops -m cuda: every CUDA and Triton op test on the
#                                 GPU (xdist -n 8 when present; Triton JIT dominates)
#   sanitize       60 s    ~40 s  compute-sanitizer memcheck (cpp + triton) and racecheck (cpp)
#                                 over benchmarks/gpu_sanitize.py
#   e2e            60 s    ~45 s  bench_model + bench_train on CUDA (fp32, bf16): images/s, ops
#                                 and syncs per iteration (torch.cuda.set_sync_debug_mode)
#   op-bench      remaining       op benchmarks vs torchvision on CUDA (results.md summary)
#   two-gpu        30 s           the Triton device-guard tests, only with >= 2 GPUs
#   rest-tests    remaining       the other CUDA tests (model, training on CUDA), if time is left
#
# Files in $OUT (the device tool returns at most 8): suite.md (phase table, rewritten after
# every phase), build.log, op_tests.log, sanitize.log, e2e.json, ops.json, results.md, rest.log.
#
# Environment knobs:
#   OUT                 where results go (default build/gpu_suite_<date>/out)
#   PYTHON              interpreter (default python3)
#   SUITE_BUDGET_S      wall-clock budget for the whole suite (default 470 s: a 600 s call
#                       minus machine start-up margin)
#   SUITE_SKIP_BUILD=1  reuse the existing build (a second run on a warm machine)
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST   for the build (defaults 16 and 9.0: one H100/H200)

set -uo pipefail  # not -e: every phase runs even after a failure
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-470}
DATE=$(date -u +%F)
LOGS=build/gpu_suite_$DATE  # build/ is git-ignored
OUT=${OUT:-$LOGS/out}
rm -rf "$LOGS"
mkdir -p "$LOGS" "$OUT" benchmarks/results
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
FAILED=0
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)

remaining() { echo $((BUDGET - SECONDS)); }

# Phase table, rewritten to $OUT/suite.md after every phase.
echo "| phase | status | seconds |" >"$LOGS/suite.md"
echo "|---|---|---:|" >>"$LOGS/suite.md"
record() {  # record NAME RC START_SECONDS
  local status=ok
  [ "$2" -ne 0 ] && { status="FAILED (exit $2)"; FAILED=1; }
  [ "$2" -eq 124 ] && status="TIMED OUT"
  echo "| $1 | $status | $((SECONDS - $3)) |" >>"$LOGS/suite.md"
  cp "$LOGS/suite.md" "$OUT/suite.md"
}

# phase NAME LIMIT LOG CMD...: run CMD under min(LIMIT, what is left), log it, record it, and copy
# its log to $OUT at once.
phase() {
  local name=$1 limit=$2 log=$3 start=$SECONDS
  shift 3
  [ "$limit" -gt "$(remaining)" ] && limit=$(remaining)
  echo "=== $name (limit ${limit}s, $(remaining)s of the suite left) ==="
  if [ "$limit" -lt 15 ]; then
    echo "| $name | skipped (no time left) | 0 |" >>"$LOGS/suite.md"
    cp "$LOGS/suite.md" "$OUT/suite.md"
    return
  fi
  timeout -s INT -k 20 "$limit" "$@" >>"$LOGS/$log" 2>&1
  local rc=$?
  tail -n 25 "$LOGS/$log"
  cp "$LOGS/$log" "$OUT/$log"
  record "$name" "$rc" "$start"
}

# 0. wheels ------------------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# 1. build -------------------------------------------------------------------------------------
if [ "${SUITE_SKIP_BUILD:-0}" != 1 ]; then
  MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 \
    phase build 210 build.log "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .
  grep -F "[htc_fast setup]" "$LOGS/build.log"
fi

# 2. env ---------------------------------------------------------------------------------------
phase env 20 env.log "$PY" -m htc_fast.env
cat "$LOGS/env.log" >>"$LOGS/build.log"; cp "$LOGS/build.log" "$OUT/build.log"

# 3. CUDA and Triton op tests ------------------------------------------------------------------
phase op-tests 110 op_tests.log "$PY" -m pytest tests/ops -q -m cuda "${XDIST[@]}" -p no:cacheprovider

# 4. compute-sanitizer -------------------------------------------------------------------------
if command -v compute-sanitizer >/dev/null; then
  phase memcheck 40 sanitize.log compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" benchmarks/gpu_sanitize.py --backends cpp,triton
  phase racecheck 25 sanitize.log compute-sanitizer --tool racecheck --error-exitcode 9 \
    "$PY" benchmarks/gpu_sanitize.py --backends cpp
else
  echo "compute-sanitizer not found" >>"$LOGS/sanitize.log"; cp "$LOGS/sanitize.log" "$OUT/"
fi

# 5. end to end: images/s, ops and syncs per iteration ------------------------------------------
phase e2e 60 e2e.log "$PY" -m pytest benchmarks/bench_model.py benchmarks/bench_train.py -q \
  --bench-devices=cuda -p no:cacheprovider --benchmark-json="$LOGS/e2e.json"
[ -s "$LOGS/e2e.json" ] && cp "$LOGS/e2e.json" "$OUT/e2e.json"

# 6. op benchmarks vs torchvision ---------------------------------------------------------------
phase op-bench $(( $(remaining) - 45 )) op_bench.log "$PY" -m pytest benchmarks/bench_roi_align.py \
  benchmarks/bench_nms.py benchmarks/bench_deform_conv.py benchmarks/bench_mask_paste.py benchmarks/bench_assign.py -q \
  --bench-devices=cuda -p no:cacheprovider --benchmark-json="$LOGS/ops.json"
[ -s "$LOGS/ops.json" ] && cp "$LOGS/ops.json" "$OUT/ops.json"
JSONS=()
for f in "$LOGS/e2e.json" "$LOGS/ops.json"; do [ -s "$f" ] && JSONS+=("$f"); done
if [ ${#JSONS[@]} -gt 0 ]; then
  "$PY" benchmarks/summarize.py "${JSONS[@]}" >"benchmarks/results/gpu_$DATE.md" \
    && cp "benchmarks/results/gpu_$DATE.md" "$OUT/results.md"
fi

# 7. two devices -------------------------------------------------------------------------------
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" -ge 2 ]; then
  phase two-gpu 30 rest.log "$PY" -m pytest tests/ops -q -k "device_guard or two_device" -p no:cacheprovider
fi

# 8. the rest of the CUDA tests, if time is left ---------------------------------------------------
phase rest-tests $(( $(remaining) - 5 )) rest.log "$PY" -m pytest tests -q -m cuda \
  --ignore=tests/ops "${XDIST[@]}" -p no:cacheprovider

echo
echo "=== gpu_suite: ${SECONDS}s; logs in $LOGS, results in $OUT ==="
cat "$LOGS/suite.md"
exit "$FAILED"
