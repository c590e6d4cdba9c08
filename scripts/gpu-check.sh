#!/usr/bin/env bash
# gpu-check.sh [LOG_DIR]: everything a machine with a GPU checks, in one call.
#   GPU name and driver (nvidia-smi) -> deps (install-deps.sh) -> Release build with CUDA in
#   build-gpu -> every test program (ctest) -> the CUDA backend's own tests and the GPU math and
#   GPU training tests (gpuswap_tools_tests GpuMath*:*Cuda*), counted -> `gpuswap bench alloc
#   --json` and `gpuswap demo --json` when those exist; with a GPU, the demo must have trained on
#   it (CUDA kernels), within budget and bit-identical to its unlimited run.
# Each step's full output goes to LOG_DIR (default ./gpu-check-out); stdout gets one line per
# step and a summary (also in LOG_DIR/summary.txt). Exit status 0 when the build and every test
# passed and no benchmark that exists failed.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-./gpu-check-out}
mkdir -p "$out" || { echo "gpu-check: cannot create log dir '$out'" >&2; exit 2; }
out=$(cd "$out" && pwd)
build=$root/build-gpu
jobs=$(nproc 2>/dev/null || echo 4)
: >"$out/summary.txt"
failed=0

say() { echo "$*" | tee -a "$out/summary.txt"; }
# step NAME LOG COMMAND...: runs COMMAND with its output in LOG; prints NAME's status.
step() {
  local name=$1 log=$2
  shift 2
  local start=$SECONDS
  if "$@" >"$log" 2>&1; then
    say "$(printf '%-12s ok (%ds, %s)' "$name" $((SECONDS - start)) "${log#"$out"/}")"
    return 0
  fi
  say "$(printf '%-12s FAILED (%ds): see %s' "$name" $((SECONDS - start)) "$log")"
  tail -n 20 "$log" | sed 's/^/    /'
  failed=1
  return 1
}

# --- the GPU --------------------------------------------------------------------------------
gpu_present=0
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1 && gpu_present=1
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 |
    head -n 1)
  say "gpu          ${gpu:-unknown (nvidia-smi printed nothing)}"
else
  say "gpu          nvidia-smi not found (no driver?): the CUDA tests will skip"
fi

# --- build ----------------------------------------------------------------------------------
step deps "$out/deps.log" "$root/scripts/install-deps.sh"

generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
if step configure "$out/configure.log" cmake -S "$root" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DGPUSWAP_WITH_CUDA=ON; then
  if ! grep -q "CUDA backend ON" "$out/configure.log"; then
    say "configure    FAILED: the CUDA backend is OFF (toolkit not found?): see $out/configure.log"
    failed=1
  fi
fi

built=0
if [ "$failed" -eq 0 ] && step build "$out/build.log" cmake --build "$build" -j "$jobs"; then
  built=1
fi

# --- tests ----------------------------------------------------------------------------------
if [ "$built" -eq 1 ]; then
  if step tests "$out/ctest.log" ctest --test-dir "$build" --output-on-failure -j "$jobs"; then
    grep -E "tests passed" "$out/ctest.log" | tail -n 1 | sed 's/^/             /' |
      tee -a "$out/summary.txt"
  fi

  # ctest reports a GTEST_SKIP as a pass; count the GPU tests here so that a GPU session can
  # see they ran rather than skipped.
  # gpu_tests NAME PROGRAM FILTER: runs PROGRAM's tests matching FILTER into NAME.log, counted.
  gpu_tests() {
    local name=$1 program=$build/bin/$2 filter=$3
    if [ ! -x "$program" ]; then
      say "$(printf '%-12s skipped: %s was not built' "$name" "$program")"
      return
    fi
    step "$name" "$out/$name.log" "$program" --gtest_filter="$filter"
    local ran skipped
    ran=$(grep -Eo '^\[  PASSED  \] [0-9]+' "$out/$name.log" | grep -Eo '[0-9]+$')
    skipped=$(grep -Eo '^\[  SKIPPED \] [0-9]+ test' "$out/$name.log" | grep -Eo '[0-9]+')
    say "             $name: ${ran:-0} passed, ${skipped:-0} skipped"
  }
  # The CUDA backend's conformance, then gpu_math's kernels against reference_math and training
  # on the GPU through the workload runner (TrainingMathCuda, WorkloadRunnerCuda).
  gpu_tests cuda-tests gpuswap_device_tests '*Cuda*:*cuda*'
  gpu_tests gpu-training gpuswap_tools_tests 'GpuMath*:*Cuda*'
fi

# --- benchmarks -----------------------------------------------------------------------------
gpuswap=$build/bin/gpuswap
# bench NAME ARGS...: runs `gpuswap ARGS --json`, stdout (JSON) to NAME.json, stderr to NAME.log.
bench() {
  local name=$1
  shift
  if [ "$built" -ne 1 ] || [ ! -x "$gpuswap" ]; then
    say "$(printf '%-12s skipped: %s was not built' "$name" "$gpuswap")"
    return
  fi
  if ! "$gpuswap" "$@" --help >/dev/null 2>&1; then
    say "$(printf '%-12s skipped: gpuswap has no "%s" subcommand yet' "$name" "$*")"
    return
  fi
  local start=$SECONDS
  if timeout 600 "$gpuswap" "$@" --json >"$out/$name.json" 2>"$out/$name.log"; then
    local note=""
    if command -v python3 >/dev/null 2>&1 &&
      ! python3 -m json.tool "$out/$name.json" >/dev/null 2>&1; then
      note=", but its stdout is not one JSON object"
      failed=1
    fi
    say "$(printf '%-12s ok (%ds, %s.json%s)' "$name" $((SECONDS - start)) "$name" "$note")"
  else
    local rc=$?
    say "$(printf '%-12s FAILED (%ds, exit %d): see %s' "$name" $((SECONDS - start)) "$rc" \
      "$out/$name.log")"
    tail -n 10 "$out/$name.log" | sed 's/^/    /'
    failed=1
  fi
}
bench bench-alloc bench alloc
# What mapping device pages costs: the simulator's vm_* costs are estimates until this runs.
bench bench-vmm bench vmm
bench demo demo

# The demo's verdict, from its JSON: with a GPU it must have computed there (not fallen back to
# the simulator), stayed within its budget and matched its unlimited run bit for bit.
if [ -s "$out/demo.json" ] && command -v python3 >/dev/null 2>&1; then
  if ! python3 - "$out/demo.json" "$gpu_present" >"$out/demo-verdict.txt" 2>&1 <<'PY'; then
import json, sys
d = json.load(open(sys.argv[1]))
gpu = sys.argv[2] == "1"
print(f"{d.get('device')}: math {d.get('math')}, within budget {d.get('within_budget')}, "
      f"bit-identical {d.get('bit_identical')}, step time ratio {d.get('step_time_ratio', 0):.2f}")
bad = []
if gpu and d.get("math") != "cuda_kernels":
    bad.append("a GPU is present but the demo did not compute on it (see demo.log)")
if d.get("within_budget") is not True:
    bad.append("over budget")
if d.get("bit_identical") is not True:
    bad.append("not bit-identical to the unlimited run")
for b in bad:
    print("FAILED: " + b)
sys.exit(1 if bad else 0)
PY
    failed=1
  fi
  sed 's/^/             demo: /' "$out/demo-verdict.txt" | tee -a "$out/summary.txt"
fi

# --- summary --------------------------------------------------------------------------------
if [ "$failed" -eq 0 ]; then
  say "gpu-check: PASSED (logs in $out)"
else
  say "gpu-check: FAILED (logs in $out)"
fi
exit "$failed"
