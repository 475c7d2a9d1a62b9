#!/usr/bin/env bash
# The one command a GPU session runs (one H200 call, < 8 min in all):
#   1. benchmarks/gpu_generate.py: generate end to end (full / PureKV / ST-SpAttn / paper), budget 205 s, killed at 250 s;
#   2. benchmarks/gpu_kernels.py: the block-sparse kernels vs cuDNN (Triton 128x64 + 128x128, Mosaic GPU; no XLA
#      fallback rows, recorded before; union one pass and union split), budget 185 s, killed at 230 s.
# generate runs first: it has never been timed on the GPU, the kernels have. A failure never stops the next step.
# Outputs and logs go to $OUT when set (the device tool returns what is written there), else benchmarks/results/.
#   bash benchmarks/gpu_session.sh            (PYTHON=... to pick the interpreter; default python3)
set -u
cd "$(dirname "$0")/.."
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
PY="${PYTHON:-python3}"
{ date -u; nvidia-smi -L 2>&1; "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1; } | tee "$DEST/gpu_session_log.txt"

timeout 250 "$PY" benchmarks/gpu_generate.py --time-budget 205 --out "$DEST/gpu_generate" 2>&1 | tee "$DEST/gpu_generate_log.txt"
echo "gpu_generate.py exit ${PIPESTATUS[0]} (124 = killed by timeout; rows done so far are in the json/md)" | tee -a "$DEST/gpu_session_log.txt"

OUT="$DEST" timeout 230 "$PY" benchmarks/gpu_kernels.py --time-budget 185 --blocks 128x64,128x128 --no-xla 2>&1 | tee "$DEST/gpu_kernels_log.txt"
echo "gpu_kernels.py exit ${PIPESTATUS[0]} (124 = killed by timeout: no json/md, see the log)" | tee -a "$DEST/gpu_session_log.txt"
ls -l "$DEST" | tee -a "$DEST/gpu_session_log.txt"
