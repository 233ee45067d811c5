#!/usr/bin/env bash
# 3D end to end at 64^3 (issue 18): phantom volumes, a 3D classifier, NEMt, and its localisation against
# Grad-CAM++ and the random map on the test split. Run from the repository root:
#
#   bash benchmarks/volumes64.sh [OUT=runs/vol64b] [SEED=0] [FIT_EPOCHS=3]
#
# Budget on this project's 2-core CPU: data 2 min, training about 80 min on one thread (20 epochs of 560
# volumes, smallcnn of width 8: the default width 16 costs 1.6x), NEMt 13-14 min an epoch on 2 threads. The
# fit runs FIT_EPOCHS epochs of batch 8 (default 3, not `nemt fit`'s 10 epochs of 16: 10 would take hours
# here); with a GPU, add --device cuda to train and fit and use FIT_EPOCHS=10. A killed run resumes when the
# same command is run again.
set -euo pipefail
OUT=${1:-runs/vol64b}
SEED=${2:-0}
FIT_EPOCHS=${3:-3}
N=${NEMT:-.venv/bin/nemt}
M=relevance_mass,relevance_rank,pointing_game
mkdir -p "$OUT"
[ -f "$OUT/data/manifest.csv" ] || $N data phantoms "$OUT/data" --dims 3 --size 64 --n 800 --seed "$SEED"
$N train --data "$OUT/data/manifest.csv" --out "$OUT/model" --arch smallcnn --arch-param width=8 --size 64x64x64 \
  --epochs 20 --batch-size 8 --seed "$SEED" --no-progress > "$OUT/train.log"
$N fit --model "$OUT/model" --data "$OUT/data/manifest.csv" --out "$OUT/nemt-s$SEED" --epochs "$FIT_EPOCHS" \
  --batch-size 8 --seed "$SEED" --no-progress > "$OUT/fit-s$SEED.log"
$N benchmark --model "$OUT/model" --data "$OUT/data/manifest.csv" --explainer "$OUT/nemt-s$SEED" \
  --methods nemt,gradcam++,random --metrics $M --out "$OUT/bench-s$SEED" --seed "$SEED" --no-progress \
  > "$OUT/bench-s$SEED.log"
grep -h "target " "$OUT/fit-s$SEED.log" || true
cat "$OUT/bench-s$SEED/summary.md"
