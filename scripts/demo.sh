#!/usr/bin/env bash
# The README's main-job command: installs what is missing, builds, and runs `gpuswap demo`
# (on the real GPU when one is present, else on the simulated device). Extra arguments go to
# the demo, e.g. scripts/demo.sh --json.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -G Ninja >/dev/null
cmake --build build -j"$(nproc)" --target gpuswap >&2
exec build/bin/gpuswap demo "$@"
