#!/usr/bin/env bash
# The equal-budget comparison of pretrained encoders under the refiner (configs/refine.yaml, encoder frozen): one arm
# per encoder, trained one after another for the same minutes on the same data (one thread each), then the same
# evaluation on the whole validation photos, tiled as served, at steps 0 (the encoder alone) and 1 (the refiner).
#   bash bench/encoder_compare.sh [MINUTES=20] [OUT=runs/compare] [ENCODERS="rfdn rlfn safmn"]
# Resumes: an arm whose run stopped early goes on where it was, up to its minutes.
set -euo pipefail
minutes=${1:-20}
out=${2:-runs/compare}
encoders=${3:-rfdn rlfn safmn}
mkdir -p "$out"
for enc in $encoders; do
  samdiffsr train diffusion --config configs/refine.yaml --out "$out/$enc" --no-progress --minutes "$minutes" \
    --set model.overrides.encoder="$enc" >"$out/$enc.log" 2>&1
done
for enc in $encoders; do
  samdiffsr eval "$out/$enc/checkpoint" ../shared/data/corpus-hr/val --steps 0,1 --tile 128 --overlap 8 \
    --out "$out/$enc/eval" >"$out/$enc.eval.log" 2>&1
  echo "$enc: $(grep -c . "$out/$enc/metrics.csv") log rows; $(grep 'steps=1 |' "$out/$enc.eval.log" | head -1)"
done
