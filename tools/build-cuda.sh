#!/usr/bin/env bash
# Builds obim with the `cuda` feature on a machine without a GPU or a system
# CUDA, with the toolchain recipe in ../shared/cuda (CUDA 13.0 compiler and
# libraries from PyPI wheels, a link-only stub libcuda). The binary runs on a
# machine with an NVIDIA driver (CUDA 13); here it starts only with the stub
# on LD_LIBRARY_PATH, and `--device cuda` then fails with a clear error.
#
#   bash tools/build-cuda.sh            # target/release/obim, ~15 min on 2 cores the first time
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=../shared/cuda/setup-nvcc.sh
[ -f "$recipe" ] || { echo "build-cuda: $recipe is missing (the CUDA toolchain recipe)" >&2; exit 2; }
# The stub libcuda exports the driver symbols cudarc declares: fetch it first.
cargo fetch --locked
eval "$(bash "$recipe" .cuda-venv)"
cargo build --locked --release --features cuda
bin=${CARGO_TARGET_DIR:-target}/release/obim
echo "build-cuda: built $bin ($(du -h "$bin" | cut -f1))"
# Smoke test without a GPU: the stub driver answers every call with an error.
LD_LIBRARY_PATH="$CUDA_ROOT/lib/stubs-runtime:$LD_LIBRARY_PATH" "$bin" --version
if LD_LIBRARY_PATH="$CUDA_ROOT/lib/stubs-runtime:$LD_LIBRARY_PATH" \
    "$bin" eval examples/demo/base --data examples/demo/data/add/test.jsonl --limit 1 --device cuda 2>&1; then
  echo "build-cuda: --device cuda ran; is there a GPU here?"
else
  echo "build-cuda: --device cuda refused without a GPU, as expected"
fi
