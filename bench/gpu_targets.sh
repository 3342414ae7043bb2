#!/usr/bin/env bash
# Every figure of the GPU issue in one run on the GPU host, same machine, same run (docs/benchmarks.md):
#   1. size: the largest candidate within 1.5 s per output MP whole-process (bench/gpu_size_bench.py);
#   2. quality: the GPU model against the small one on the whole validation photos, clean and JPEG 75;
#   3. throughput: 8 concurrent clients, 512x512 JPEG inputs, default settings: output MP/s and p95 latency of the
#      small model and of the GPU model (bench/load_bench.py);
#   4. the network's share of a 512 -> 2048 request in process (bench/serve_bench.py), and where the worker's
#      time goes (bench/worker_bench.py).
#
#   bash bench/gpu_targets.sh LARGE_CHECKPOINT [SMALL_CHECKPOINT]     # writes $OUT (or runs/gpu-targets)/*.md
#
# Through the device tool (carry .whl, and the large checkpoint if it is not committed):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && cp -r .whl/site/. /tmp/site/ && PYTHONPATH=/tmp/site:$PWD bash bench/gpu_targets.sh \
#     runs/windows/3/checkpoint
# The service's packages (fastapi, uvicorn, ...) must be among the wheels for step 3:
# `SERVICE_WHEELS=1 bash bench/gpu_window.sh wheels` fetches them with the training ones (3.6 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."

large=${1:?the checkpoint of the GPU model}
small=${2:-checkpoints/default}
out=${OUT:-runs/gpu-targets}
val=${VAL:-../shared/data/corpus-hr/val}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}  # DEVICE=cpu SIZE=32 CANDIDATES=a=2:8:4:8: a smoke run anywhere
size=${SIZE:-512}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
"$py" bench/gpu_size_bench.py --device "$device" --size "$size" ${CANDIDATES:+--candidates "$CANDIDATES"} \
    --csv "$out/sizes.csv" | tee "$out/sizes.md" || true
for ckpt in "$small" "$large"; do
    name=$(basename "$(dirname "$ckpt")")-$(basename "$ckpt")
    "$py" -m samdiffsr eval "$ckpt" "$val" --device "$device" --precision auto \
        --degradation bicubic,jpeg75 \
        --out "$out/eval-$name" > /dev/null
    "$py" bench/load_bench.py --checkpoint "$ckpt" --device "$device" --concurrency 8 --requests 48 \
        --sizes "${size}x$size" \
        --input-format jpeg --tile-size 0 --max-tiles-per-batch 0 --modes on --steps 1 > "$out/load-$name.md"
done
"$py" bench/serve_bench.py --checkpoint "$large" --device "$device" --size "$size" --configs torch:bf16:auto:on \
    > "$out/serve-large.md"
# Where the worker's time goes (decode, tiles, network, blending, encode) at 8 images of 512 px: what to cut next.
"$py" bench/worker_bench.py --checkpoint "$large" --device "$device" --n 8 --size "$size" > "$out/worker-large.md"
"$py" bench/png_bench.py > "$out/png.md"  # the host CPU's PNG writing, Pillow against ours
cat "$out"/eval-*/degradations.md || true
grep -h "^| on | 8 " "$out"/load-*.md || true
echo "tables in $out"
