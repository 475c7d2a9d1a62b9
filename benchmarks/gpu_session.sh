#!/usr/bin/env bash
# The one command a GPU session runs (one H200 call, < 9.5 min in all; docs/gpu.md says what it measures):
#   1. benchmarks/gpu_e2e.py: the 7B-shaped model end to end (batch decode full vs PureKV 20%; per length 16k, 32k,
#      64k: vision tower, one layer's cuDNN attention, prefill of full / PureKV / ST mixed / ST union / eager SnapKV /
#      the XLA flash path; the Amdahl bound), budget 240 s, killed at 280 s;
#   2. benchmarks/gpu_kernels.py: the block-sparse kernels vs cuDNN at 7.7k / 16k / 32k (Triton 128x128, Mosaic GPU
#      64x128, warp-specialised Mosaic GPU 128x128; spatial, temporal, union split, mixed), budget 110 s, killed at 140 s;
#   3. benchmarks/quant_decode_kernel.py: decode attention over 4- and 8-bit codes, the Pallas kernel vs the XLA path
#      vs bf16 over the same slots (decides PureKVConfig.kv_decode's default on a GPU), killed at 45 s;
#   4. benchmarks/st_cost_profile.py: the ST-SpAttn cost model's profile of the Triton kernel and of the segment path
#      on this GPU (cost_profiles_gpu.json, keyed "backend@device kind": merge it into
#      purekv_jax/st_sparse/cost_profiles.json so st_select="auto" prices ST-SpAttn there), killed at 45 s each.
# A failure never stops the next step; each step rewrites its json / md after every row, so a killed step keeps
# what it measured. Outputs (12 files) go to $OUT when set (the device tool returns what is written there), else
# benchmarks/results/.
#   bash benchmarks/gpu_session.sh             (PYTHON=... picks the interpreter; default python3)
#   bash benchmarks/gpu_session.sh --smoke     (CPU dry run at tiny sizes, interpret mode: every step and row runs)
set -u
cd "$(dirname "$0")/.."
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
PY="${PYTHON:-python3}"
SMOKE=()
E2E_BUDGET=240 E2E_KILL=280 KERNEL_BUDGET=110 KERNEL_KILL=140
KERNEL_ARGS=(--blocks 128x128 --mosaic-blocks 64x128 --ws-blocks 128x128 --no-xla)
if [ "${1:-}" = "--smoke" ]; then
  SMOKE=(--smoke)
  export JAX_PLATFORMS=cpu
  E2E_BUDGET=600 E2E_KILL=900 KERNEL_BUDGET=600 KERNEL_KILL=900
  KERNEL_ARGS=(--no-xla --sizes 300)
fi
export PYTHONUNBUFFERED=1
{ date -u; echo "commit $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files";
  nvidia-smi -L 2>&1; "$PY" -c "import sys, jax; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())" 2>&1
} | tee "$DEST/gpu_session_log.txt"

timeout "$E2E_KILL" "$PY" benchmarks/gpu_e2e.py --time-budget "$E2E_BUDGET" --reps 1 --out "$DEST/gpu_e2e" \
  "${SMOKE[@]}" 2>&1 | tee "$DEST/gpu_e2e_log.txt"
echo "gpu_e2e.py exit ${PIPESTATUS[0]} (124 = killed by timeout; rows done so far are in the json/md)" \
  | tee -a "$DEST/gpu_session_log.txt"

OUT="$DEST" timeout "$KERNEL_KILL" "$PY" benchmarks/gpu_kernels.py --time-budget "$KERNEL_BUDGET" \
  --mixes "spatial,temporal,union split,mix u/s/s/t" "${KERNEL_ARGS[@]}" "${SMOKE[@]}" 2>&1 \
  | tee "$DEST/gpu_kernels_log.txt"
echo "gpu_kernels.py exit ${PIPESTATUS[0]} (124 = killed by timeout: no json/md, see the log)" \
  | tee -a "$DEST/gpu_session_log.txt"
timeout 45 "$PY" benchmarks/quant_decode_kernel.py --out "$DEST/quant_decode_kernel" "${SMOKE[@]}" 2>&1 \
  | tee "$DEST/quant_decode_kernel_log.txt"
echo "quant_decode_kernel.py exit ${PIPESTATUS[0]}" | tee -a "$DEST/gpu_session_log.txt"
for BACKEND in triton segments; do
  timeout 45 "$PY" benchmarks/st_cost_profile.py --backend "$BACKEND" --reps 3 --out "$DEST/cost_profiles_gpu.json" \
    2>&1 | tee -a "$DEST/st_cost_profile_log.txt"
  echo "st_cost_profile.py --backend $BACKEND exit ${PIPESTATUS[0]}" | tee -a "$DEST/gpu_session_log.txt"
done
ls -l "$DEST" | tee -a "$DEST/gpu_session_log.txt"
