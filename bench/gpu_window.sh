#!/usr/bin/env bash
# One training window of a model on a GPU lent for minutes (docs/training.md, "Training in GPU windows").
#
# The machine gets a copy of the repository and what is carried (64 MiB in all, the tracked files included) and
# returns at most 8 files of 16 MiB from $OUT; it starts bare each time. So a window carries a shard of the training
# photos with their masks (`make masks`; the SPE maps are made on the GPU host from them: 28 times larger) and
# the last window's exported folder, and returns the new one.
#
#   bash bench/gpu_window.sh wheels                   # here, once: the Python packages the GPU image lacks -> .whl/
#   bash bench/gpu_window.sh pack SHARD SHARDS [PREV] # here: photos SHARD, SHARD+SHARDS, ... and PREV -> .window/
#   bash bench/gpu_window.sh run [MINUTES] [CONFIG]   # on the GPU (the device tool, carrying .whl and .window):
#       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#         .whl/*.whl && cp -r .whl/site/. /tmp/site/ && PYTHONPATH=/tmp/site:$PWD bash bench/gpu_window.sh run 11
#
# `run` writes to $OUT: checkpoint/ (fp16 weights), state/ (the exact state, when it fits the transfer), metrics.csv,
# window.json (steps/s, patches/s, data wait, GPU busy time, peak memory) and train.log. Copy $OUT back to
# runs/windows/N, and `pack` the next window with runs/windows/N as PREV.
set -euo pipefail
cd "$(dirname "$0")/.."

CORPUS=${CORPUS:-../shared/data/corpus-hr}
MASKS=${MASKS:-runs/masks/train-json}
WINDOW=${WINDOW:-.window}
# What comes back from the device tool: 8 files; checkpoint/ (2), metrics.csv, window.json, train.log and
# state.json leave 2 state shards of 15 MiB.
MAX_STATE_MIB=${MAX_STATE_MIB:-30}

wheels() {
    # The GPU image has torch, numpy, Pillow, scipy, scikit-image, PyYAML, tqdm, tensorboard, httpx, anyio and
    # prometheus-client; not these. SERVICE_WHEELS=1 adds the service's (bench/gpu_targets.sh starts servers).
    local names=(pydantic pydantic-core annotated-types typing-inspection bicubic-pytorch pycocotools
                 rotary-embedding-torch)
    [[ -n "${SERVICE_WHEELS:-}" ]] && names+=(fastapi starlette annotated-doc uvicorn python-multipart
                                               pydantic-settings python-dotenv)
    local where=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
                 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    python3 -m pip download "${where[@]}" -d .whl "${names[@]}"
    # imagecodecs writes the service's PNGs; its wheel (28 MB, every codec) would not travel, its PNG codec
    # (4 MB) does: unpacked into .whl/site, which the GPU host copies beside the installed wheels.
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download "${where[@]}" -d "$tmp" imagecodecs
    rm -rf .whl/site && mkdir -p .whl/site
    unzip -q "$tmp"/imagecodecs-*.whl -d .whl/site 'imagecodecs/__init__.py' 'imagecodecs/imagecodecs.py' \
        'imagecodecs/_shared*' 'imagecodecs/_png*' 'imagecodecs.libs/libpng*'
    rm -rf "$tmp"
    du -sh .whl
}

pack() {
    local shard=${1:?SHARD} shards=${2:?SHARDS} prev=${3:-}
    rm -rf "$WINDOW"
    mkdir -p "$WINDOW/photos" "$WINDOW/masks"
    local i=0 name
    for photo in "$CORPUS"/train/*.png; do
        name=$(basename "$photo" .png)
        if (( i % shards == shard )) && [[ -f "$MASKS/$name.json" ]]; then
            cp "$photo" "$WINDOW/photos/" && cp "$MASKS/$name.json" "$WINDOW/masks/"
        fi
        i=$((i + 1))
    done
    cp -r "$CORPUS/val" "$WINDOW/val"
    if [[ -n "$prev" ]]; then
        mkdir -p "$WINDOW/prev"
        cp -r "$prev/checkpoint" "$WINDOW/prev/"
        [[ -f "$prev/state/state.json" ]] && cp -r "$prev/state" "$WINDOW/prev/"
        [[ -f "$prev/metrics.csv" ]] && cp "$prev/metrics.csv" "$WINDOW/prev/"
    fi
    local tracked window wheels total
    tracked=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
    window=$(du -sb "$WINDOW" | cut -f1)
    wheels=$(du -sb .whl 2>/dev/null | cut -f1 || echo 0)
    total=$(( (tracked + window + wheels) / 1048576 ))
    echo "$(ls "$WINDOW/photos" | wc -l) photos; .window $((window / 1048576)) MiB, .whl $((wheels / 1048576)) MiB," \
        "tracked files $((tracked / 1048576)) MiB: $total MiB of the 64 that may travel"
    if (( total > 63 )); then
        echo "too large to travel: fewer photos (more SHARDS), or a PREV whose state was not exported" >&2
        return 1
    fi
}

run() {
    local minutes=${1:-11} config=${2:-configs/large.yaml} out=${OUT:?OUT: the folder that comes back}
    local work start=()
    work=$(mktemp -d)  # the run directory, SPE maps and LR cache: fresh, as on a machine that starts bare
    if [[ -f "$WINDOW/prev/state/state.json" ]]; then
        start=(--resume-from "$WINDOW/prev")          # exact: the last window's state
    elif [[ -f "$WINDOW/prev/checkpoint/config.json" ]]; then
        start=(--set "run.init=$WINDOW/prev/checkpoint")  # its weights, with a fresh optimiser
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -m samdiffsr masks embed "$WINDOW/photos" "$WINDOW/masks" "$work/spe" --no-progress
    python3 -m samdiffsr train diffusion --config "$config" --out "$work/run" --minutes "$minutes" \
        --set "data.train_dir=$WINDOW/photos" --set "data.val_dir=$WINDOW/val" --set "data.spe_dir=$work/spe" \
        --set "data.cache_dir=$work/cache" "${start[@]}" --export "$out" --export-max-state-mib "$MAX_STATE_MIB" \
        --no-progress 2>&1 | tee "$out/train.log"
    python3 -c 'import sys; from pathlib import Path; from training.window import check_transfer
print("\n".join(check_transfer(Path(sys.argv[1]), 8, 16)) or "the output fits the transfer: 8 files of 16 MiB")' "$out"
}

"${1:?wheels, pack or run}" "${@:2}"
