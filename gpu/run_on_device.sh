#!/usr/bin/env bash
# On a GPU machine, from the checkout root:  OUT=/some/dir bash gpu/run_on_device.sh
# Installs this checkout (no dependencies, no network) and runs refattn.gpu.device_run:
# compile check, selfcheck (forward and paged decode kernels), pytest tests/gpu,
# compute-sanitizer memcheck + racecheck (paged decode cases included), benchmark (forward
# TFLOP/s vs PyTorch SDPA, then paged decode KV-read GB/s vs the device's copy bandwidth). JSON records and logs land in $OUT; a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-run}"
mkdir -p "$OUT"
if ! python -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    echo "install failed:"; tail -20 "$OUT/install.log"; exit 1
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
exec python -m refattn.gpu.device_run --out "$OUT" "$@"
