#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, and runs every test.
#   scripts/test.sh            full run: the suite, then ASan+UBSan (whole suite) and TSan
#                              (concurrency and stress tests) builds, as CI does
#   scripts/test.sh --quick    the suite only (a developer's inner loop)
# Build trees: build/ (the README's), build/asan/, build/tsan/.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    *) echo "usage: scripts/test.sh [--quick]" >&2; exit 2 ;;
  esac
done

scripts/install-deps.sh
jobs=$(nproc)

configure_and_build() {  # dir, extra cmake args...
  local dir=$1; shift
  cmake -S . -B "$dir" -G Ninja -DGPUSWAP_WARNINGS_AS_ERRORS=ON "$@" >/dev/null
  cmake --build "$dir" -j"$jobs"
}

echo "== build and test (build/)" >&2
configure_and_build build -DGPUSWAP_BUILD_BENCHMARKS=ON
ctest --test-dir build -j"$jobs" --output-on-failure --timeout 900

[ "$quick" = 1 ] && exit 0

# Sanitizer builds. Stress tests scale their operation counts down (GPUSWAP_STRESS_SCALE) so
# the instrumented runs fit CI's time; every code path still runs.
echo "== ASan+UBSan: whole suite (build/asan/)" >&2
configure_and_build build/asan -DGPUSWAP_SANITIZE=address -DGPUSWAP_BUILD_BENCHMARKS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo
GPUSWAP_STRESS_SCALE=0.2 ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build/asan -j"$jobs" --output-on-failure --timeout 1800

echo "== TSan: the simulated device (its stream threads), concurrency, ordering and stress tests (build/tsan/)" >&2
configure_and_build build/tsan -DGPUSWAP_SANITIZE=thread -DGPUSWAP_BUILD_BENCHMARKS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo
GPUSWAP_STRESS_SCALE=0.1 TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
  ctest --test-dir build/tsan -j"$jobs" --output-on-failure --timeout 1800 \
  -R '(sim_device|sim_vm|device_conformance|[Ss]tress|[Oo]rdering|[Cc]oncurren|[Dd]eterminism|[Tt]hread|swap_engine|recorder|caching_allocator_release|trace_output)'
