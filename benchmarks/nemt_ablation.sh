#!/usr/bin/env bash
# NEMt ablation on BUSI (128 px, the ResNet-18 of `nemt train`): one lever at a time against the default,
# then the localisation table of all of them next to Grad-CAM(++) and reference maps.
#   bash benchmarks/nemt_ablation.sh MODEL_DIR DATA OUT_DIR [variant ...]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-runs/busi-r18}; DATA=${2:-../shared/data/busi}; OUT=${3:-runs/ablation}; shift 3 || true
declare -A V=(
  [default]=""
  [adamw]="--optimizer adamw --lr 3e-3"
  [occl-mean]="--occlusion mean"
  [init-0.5]="--init-keep 0.5"
  [logit]="--quantity logit"
  [area-target-0.1]="--area-target 0.1"
  [no-smoothing]="--no-smoothing"
  [kernel-5]="--kernel-size 5"
  [epochs-6]="--epochs 6"
  [inpaint]="--occlusion inpaint"
  [inpaint-adamw]="--occlusion inpaint --optimizer adamw --lr 3e-3"
  [inpaint-epochs-6]="--occlusion inpaint --epochs 6"
  [inpaint-sigma-16]="--occlusion inpaint --blur-sigma 16"
)
variants=("$@"); [ ${#variants[@]} -gt 0 ] || variants=(default adamw occl-mean init-0.5 logit area-target-0.1 no-smoothing kernel-5 epochs-6)
mkdir -p "$OUT"
dirs=()
for v in "${variants[@]}"; do
  if [ ! -f "$OUT/$v/explainer.json" ]; then
    start=$(date +%s)
    .venv/bin/nemt fit --model "$MODEL" --data "$DATA" --out "$OUT/$v" --seed 0 --no-progress ${V[$v]} > "$OUT/$v.log" 2>&1
    echo "$v: fit $(( $(date +%s) - start )) s" | tee -a "$OUT/fit_times.txt"
  fi
  dirs+=("$OUT/$v")
done
.venv/bin/python benchmarks/nemt_localisation.py --model "$MODEL" --data "$DATA" \
  --explainers "$(IFS=,; echo "${dirs[*]}")" --json "$OUT/localisation.json" --markdown "$OUT/localisation.md"
