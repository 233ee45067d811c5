#!/usr/bin/env bash
# The speed benchmarks and the demo on a GPU, in one run (as used with the project's lent GPU machine).
#
#   bash benchmarks/gpu.sh [OUT_DIR] [DEVICE]
#
# Prints (and writes under OUT_DIR): NEMt's explain/forward ratio at batch 8 and 64, every explainer's
# ms/image next to Captum's and MONAI's, and the demo run end to end on the device (its summary table
# and collapse count). PYTHON (default python3) must see torch and the package (e.g. PYTHONPATH=src).
set -uo pipefail
OUT=${1:-runs/gpu}
DEV=${2:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 120 $PY benchmarks/nemt_speed.py --device "$DEV" --batch 8 --repeats 21 2>&1 | tee "$OUT/nemt_speed_b8.txt"
timeout 120 $PY benchmarks/nemt_speed.py --device "$DEV" --batch 64 --repeats 11 2>&1 | tee "$OUT/nemt_speed_b64.txt"
timeout 240 $PY benchmarks/baselines_speed.py --device "$DEV" --images 8 --batch 256 --rise-masks 4000 2>&1 \
  | grep -v -i "warning\|to_occlude\|im\[slices\]" | tee "$OUT/baselines_speed.txt"
t0=$SECONDS
timeout 240 $PY -m nemt demo --device "$DEV" --out "${DEMO_OUT:-$OUT/demo}" --seed 0 \
  --no-progress > "$OUT/demo.log" 2>&1
echo "demo: $((SECONDS - t0)) s wall"
tail -25 "$OUT/demo.log"
cp "${DEMO_OUT:-$OUT/demo}/benchmark/summary.md" "$OUT/demo_summary.md" 2>/dev/null || true
