#!/usr/bin/env bash
# The equal-budget architecture ablation (configs/ablation.yaml): four arms, two at a time (one core each), the
# same minutes each, then the same evaluation on the whole validation photos, tiled as served.
#   bash bench/ablation.sh [OUT=runs/ablation]
# Resumes: an arm whose run stopped early goes on where it was, up to its minutes.
set -euo pipefail
out=${1:-runs/ablation}
lr_denoiser=(--set model.overrides.denoiser_space=lr --set model.overrides.hidden_size=48)
rlfb_encoder=(--set model.overrides.encoder=rlfb --set model.overrides.rrdb_num_feat=48
              --set model.overrides.rrdb_num_block=6)
declare -A arms=(
  [hr-rrdb]=""
  [lr-rlfb]="${lr_denoiser[*]} ${rlfb_encoder[*]}"
  [lr-rrdb]="${lr_denoiser[*]}"
  [hr-rlfb]="${rlfb_encoder[*]}"
)
train() {  # ARM
  # shellcheck disable=SC2086
  samdiffsr train diffusion --config configs/ablation.yaml --out "$out/$1" --no-progress ${arms[$1]} \
    >"$out/$1.log" 2>&1
}
mkdir -p "$out"
for pair in "hr-rrdb lr-rlfb" "lr-rrdb hr-rlfb"; do
  read -r a b <<<"$pair"
  train "$a" & train "$b" & wait
done
for arm in hr-rrdb lr-rlfb lr-rrdb hr-rlfb; do
  samdiffsr eval "$out/$arm/checkpoint" ../shared/data/corpus-hr/val --steps 0,1,2 --tile 64 --overlap 8 --precision auto \
    --out "$out/$arm/eval" >"$out/$arm.eval.log" 2>&1
done
