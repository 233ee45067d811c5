#!/usr/bin/env bash
# NEMt ablation on BUSI (128 px, the ResNet-18 of `nemt train`): levers one at a time against a paper-like
# base (Prodigy, blurred-image occlusion, 3 epochs), then the localisation table of all of them next to
# Grad-CAM(++), a centred Gaussian of the same mean value, and reference maps.
# This is the ablation of the paper's objective (--objective paper), kept to reproduce docs/results.md's table;
# its best variant (inpaint-adamw-e10-cosine) was the default of `nemt fit` before the nested objective.
# The guard is off (--allow-collapse): collapsed variants are part of the table.
#   bash benchmarks/nemt_ablation.sh MODEL_DIR DATA OUT_DIR [variant ...]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-runs/busi-r18}; DATA=${2:-../shared/data/busi}; OUT=${3:-runs/ablation}; shift 3 || true
# every variant is the paper-like base plus the flags of one lever (later flags win)
BASE="--objective paper --allow-collapse --occlusion blur --optimizer prodigy --schedule constant --epochs 3"
declare -A V=(
  [base]=""
  [adamw]="--optimizer adamw --lr 3e-3"
  [occl-mean]="--occlusion mean"
  [init-0.5]="--init-keep 0.5"
  [logit]="--quantity logit"
  [area-target-0.1]="--area-target 0.1"
  [no-smoothing]="--no-smoothing"
  [kernel-5]="--kernel-size 5"
  [epochs-6]="--epochs 6"
  [inpaint]="--occlusion inpaint"
  [inpaint-sigma-16]="--occlusion inpaint --blur-sigma 16"
  [inpaint-adamw]="--occlusion inpaint --optimizer adamw --lr 3e-3"
  [inpaint-adamw-lr1e-3]="--occlusion inpaint --optimizer adamw --lr 1e-3"
  [inpaint-adamw-at0.1]="--occlusion inpaint --optimizer adamw --lr 3e-3 --area-target 0.1"
  [inpaint-adamw-e6]="--occlusion inpaint --optimizer adamw --lr 3e-3 --epochs 6"
  [inpaint-adamw-e10]="--occlusion inpaint --optimizer adamw --lr 3e-3 --epochs 10"
  [inpaint-adamw-e6-cosine]="--occlusion inpaint --optimizer adamw --lr 3e-3 --epochs 6 --schedule cosine"
  [inpaint-adamw-e10-cosine]="--occlusion inpaint --optimizer adamw --lr 3e-3 --epochs 10 --schedule cosine"
  [default-seed1]="--occlusion inpaint --optimizer adamw --lr 3e-3 --epochs 10 --schedule cosine --seed 1"
  [default-half-decoder]="--occlusion inpaint --optimizer adamw --lr 3e-3 --epochs 10 --schedule cosine --decoder-channels 128,64,32,16,8"
)
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(base adamw occl-mean init-0.5 logit area-target-0.1 no-smoothing kernel-5 epochs-6
  inpaint inpaint-sigma-16 inpaint-adamw inpaint-adamw-lr1e-3 inpaint-adamw-at0.1 inpaint-adamw-e6
  inpaint-adamw-e10 inpaint-adamw-e6-cosine inpaint-adamw-e10-cosine default-seed1 default-half-decoder)
mkdir -p "$OUT"
dirs=()
for v in "${variants[@]}"; do
  if [ ! -f "$OUT/$v/explainer.json" ]; then
    start=$(date +%s)
    .venv/bin/nemt fit --model "$MODEL" --data "$DATA" --out "$OUT/$v" --no-progress --seed 0 $BASE ${V[$v]} > "$OUT/$v.log" 2>&1
    echo "$v: fit $(( $(date +%s) - start )) s" | tee -a "$OUT/fit_times.txt"
  fi
  dirs+=("$OUT/$v")
done
.venv/bin/python benchmarks/nemt_localisation.py --model "$MODEL" --data "$DATA" \
  --explainers "$(IFS=,; echo "${dirs[*]}")" --json "$OUT/localisation.json" --markdown "$OUT/localisation.md"
