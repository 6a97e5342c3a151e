#!/usr/bin/env bash
# gpu_suite.sh -- build, test and benchmark htc_fast on a fresh GPU machine, in one go (~9 min).
#
#   bash benchmarks/gpu_suite.sh            # from any directory; it works in the repo root
#
# Made for a machine with no network that already has Python, torch (CUDA build), triton,
# torchvision, pytest and pytest-benchmark. Missing pure-Python packages (pycocotools) may come as
# wheels in .whl/: they are installed to /tmp/site and put on PYTHONPATH.
#
# Phases, each logged, each given a slice of the budget; a failing phase never stops the suite:
#   1. wheels   .whl/*.whl -> /tmp/site (only if .whl/ holds wheels)
#   2. build    pip install -e . (see "Why pip -e" below); FORCE_CUDA=1 so that a missing toolkit
#               fails the build loudly instead of producing a CPU-only _C and skipped CUDA cases
#   3. env      python -m htc_fast.env (versions, compiled archs, backend per op)
#   4. tests    python -m pytest tests -q
#   5. bench    pytest benchmarks/ --bench-devices=cuda, then the CPU cases if time is left
#   6. summary  benchmarks/summarize.py -> benchmarks/results/gpu_<date>.md (also printed)
# The exit code is 0 only if every phase passed; the end of the output lists each phase's status.
#
# Why pip -e rather than `setup.py build_ext --inplace`: the editable install both builds _C into
# htc_fast/ and installs the import hook that maps htc_fast.kernels to kernels/ (setup.py's
# package_dir). build_ext --inplace alone builds _C but leaves htc_fast.kernels unimportable, so
# the Triton backend would report itself unavailable and its cases would skip.
#
# Environment knobs:
#   OUT                 if set, logs, JSON and the summary are copied there (7 files)
#   PYTHON              interpreter (default python3)
#   SUITE_BUDGET_S      wall-clock budget for the whole suite (default 540 s). A phase that runs
#                       past its slice gets SIGINT (pytest then still reports and writes its JSON)
#   SUITE_SKIP_BUILD=1  reuse the existing build (a second run on a warm machine)
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST   for the build (defaults 16 and 9.0: one H100/H200)
#
# CPU variant (any machine; what produced benchmarks/results/cpu_*.md):
#   python -m pytest benchmarks/ -q --bench-devices=cpu --benchmark-json=/tmp/bench_cpu.json
#   python benchmarks/summarize.py /tmp/bench_cpu.json > benchmarks/results/cpu_$(date -u +%F).md

set -uo pipefail  # not -e: every phase runs even after a failure
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-540}
DATE=$(date -u +%F)
LOGS=build/gpu_suite_$DATE  # build/ is git-ignored
rm -rf "$LOGS"  # the logs are appended to: start them empty on a rerun
mkdir -p "$LOGS" benchmarks/results
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
STATUS=()
FAILED=0

remaining() { echo $((BUDGET - SECONDS)); }

# record NAME RC: remember a phase's outcome for the final report.
record() {
  local name=$1 rc=$2
  if [ "$rc" -eq 0 ]; then
    STATUS+=("ok      $name")
  else
    STATUS+=("FAILED  $name (exit $rc)")
    FAILED=1
  fi
}

# run_logged NAME LIMIT_S LOG CMD...: run CMD under a time limit, output to the terminal and LOG.
run_logged() {
  local name=$1 limit=$2 log=$3
  shift 3
  echo "=== $name (limit ${limit}s, $(remaining)s of the suite left) ==="
  if [ "$limit" -lt 10 ]; then
    echo "no time left for $name" | tee -a "$log"
    record "$name" 124
    return
  fi
  timeout -s INT -k 30 "$limit" "$@" 2>&1 | tee -a "$log"
  record "$name" "${PIPESTATUS[0]}"
}

# 1. wheels ------------------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "=== wheels: $(ls .whl) ==="
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  record wheels $?
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# 2. build -------------------------------------------------------------------------------------
if [ "${SUITE_SKIP_BUILD:-0}" = 1 ]; then
  echo "=== build: skipped (SUITE_SKIP_BUILD=1) ==="
else
  limit=$(( $(remaining) - 200 ))  # leave room for env, tests and the CUDA benchmarks
  [ "$limit" -gt 330 ] && limit=330
  [ "$limit" -lt 60 ] && limit=60
  echo "=== build (limit ${limit}s; full log in $LOGS/build.log) ==="
  MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 \
    timeout -k 30 "$limit" "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e . \
    >"$LOGS/build.log" 2>&1
  rc=$?
  grep -F "[htc_fast setup]" "$LOGS/build.log"
  [ "$rc" -ne 0 ] && tail -n 60 "$LOGS/build.log"
  record build "$rc"
  echo "build took ${SECONDS}s since the suite started"
fi

# 3. env ---------------------------------------------------------------------------------------
run_logged env 60 "$LOGS/env.txt" "$PY" -c "
import platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'
print('python', platform.python_version(), '| torch', torch.__version__,
      '| cuda', torch.version.cuda, '| gpu', gpu)"
run_logged htc_fast.env 60 "$LOGS/env.txt" "$PY" -m htc_fast.env

# 4. tests -------------------------------------------------------------------------------------
# Leave ~170 s for the CUDA benchmarks and the summary.
run_logged tests $(( $(remaining) - 170 )) "$LOGS/tests.log" "$PY" -m pytest tests -q

# 5. benchmarks --------------------------------------------------------------------------------
# CUDA first: it is what this machine is for. The CPU cases then use whatever time is left.
JSONS=()
run_logged "bench cuda" $(( $(remaining) - 25 )) "$LOGS/bench.log" \
  "$PY" -m pytest benchmarks/ -q --bench-devices=cuda --benchmark-json="$LOGS/bench_cuda.json"
[ -s "$LOGS/bench_cuda.json" ] && JSONS+=("$LOGS/bench_cuda.json")
if [ "$(remaining)" -gt 120 ]; then
  run_logged "bench cpu" $(( $(remaining) - 20 )) "$LOGS/bench.log" \
    "$PY" -m pytest benchmarks/ -q --bench-devices=cpu --benchmark-json="$LOGS/bench_cpu.json"
  [ -s "$LOGS/bench_cpu.json" ] && JSONS+=("$LOGS/bench_cpu.json")
else
  STATUS+=("skipped bench cpu (only $(remaining)s left)")
fi

# 6. summary -----------------------------------------------------------------------------------
SUMMARY=benchmarks/results/gpu_$DATE.md
if [ ${#JSONS[@]} -gt 0 ]; then
  "$PY" benchmarks/summarize.py "${JSONS[@]}" >"$SUMMARY"
  rc=$?
  record summary "$rc"
  [ "$rc" -eq 0 ] && cat "$SUMMARY"
else
  echo "no benchmark JSON was written"
  record summary 1
fi

if [ -n "${OUT:-}" ]; then
  for f in "$LOGS"/build.log "$LOGS"/env.txt "$LOGS"/tests.log "$LOGS"/bench.log \
           "$LOGS"/bench_cuda.json "$LOGS"/bench_cpu.json "$SUMMARY"; do
    [ -f "$f" ] && cp "$f" "$OUT"/
  done
fi

echo
echo "=== gpu_suite: ${SECONDS}s; logs in $LOGS${OUT:+ and $OUT} ==="
printf '  %s\n' "${STATUS[@]}"
exit "$FAILED"
