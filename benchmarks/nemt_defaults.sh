#!/usr/bin/env bash
# Do `nemt fit`'s defaults carry to data nobody tuned them on? (issue 11, "defaults that carry")
#
# For each data set: train a small classifier, fit NEMt with the defaults (no flag), and report the
# collapse guard's figures on the validation split (share of empty maps per class) and, where there is
# ground truth, NEMt against the random map on the test split. Run from the repository root:
#
#   bash benchmarks/nemt_defaults.sh [OUT=runs/defaults] [SEED=0]
#
# Data: 3D phantoms (written here, 800 volumes of 32^3 voxels) and BreastMNIST (../shared/data/medmnist, labels only,
# 28 px; skipped when absent). The 2D phantoms are the demo's (scripts/demo.sh), BUSI and XAI-TRIS
# have their own sections in docs/results.md. The chest radiograph samples (7 images) are too few to
# train a classifier on, and no pretrained weights may be downloaded: not covered.
set -euo pipefail
OUT=${1:-runs/defaults}
SEED=${2:-0}
N=${NEMT:-.venv/bin/nemt}
mkdir -p "$OUT"
M=relevance_mass,relevance_rank,pointing_game

echo "== 3D phantoms (32^3, 800 volumes, smallcnn)"
[ -f "$OUT/ph3d/manifest.csv" ] || $N data phantoms "$OUT/ph3d" --dims 3 --size 32 --n 800 --seed "$SEED"
$N train --data "$OUT/ph3d/manifest.csv" --out "$OUT/ph3d-model" --arch smallcnn --size 32x32x32 --epochs 30 \
  --seed "$SEED" --no-progress > "$OUT/ph3d-train.log"
$N fit --model "$OUT/ph3d-model" --data "$OUT/ph3d/manifest.csv" --out "$OUT/ph3d-nemt" --seed "$SEED" \
  --no-progress > "$OUT/ph3d-fit.log"
$N benchmark --model "$OUT/ph3d-model" --data "$OUT/ph3d/manifest.csv" --explainer "$OUT/ph3d-nemt" \
  --methods nemt,random --metrics $M --out "$OUT/ph3d-bench" --seed "$SEED" --no-progress > "$OUT/ph3d-bench.log"
grep -h "target " "$OUT/ph3d-fit.log" || true
cat "$OUT/ph3d-bench/summary.md"

BM=../shared/data/medmnist/breastmnist.npz
if [ -f "$BM" ]; then
  echo "== BreastMNIST (28 px, smallcnn; labels only: the guard's figures)"
  $N train --data "$BM" --out "$OUT/bmnist-model" --arch smallcnn --size 28 --epochs 20 --seed "$SEED" \
    --no-progress > "$OUT/bmnist-train.log"
  $N fit --model "$OUT/bmnist-model" --data "$BM" --out "$OUT/bmnist-nemt" --seed "$SEED" --no-progress \
    > "$OUT/bmnist-fit.log"
  grep -h "target " "$OUT/bmnist-fit.log" || true
else
  echo "== BreastMNIST: $BM not found, skipped"
fi
