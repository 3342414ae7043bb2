"""Where the service's batching worker spends its time: the network against everything else it does.

Many images (`--n` crops of `--photo`, `--size` px square) are submitted at once to the service's own `Batcher`
(no HTTP), the way the app does it (`service.pipeline.prepare`, `submit_tiles`); the script waits for all of
them, then PNG-encodes them as the request handlers would. It prints the wall time, the network's share
(the runtime's encoder and denoiser calls, synchronised on CUDA) and the number of network calls, then the time of
the worker's phases. The phases are timed by wrapping the functions the worker calls (`start_tracks`,
`track_images`, `Canvas.add`, the tiles' inputs); the wrappers cost a little time themselves.

On a GPU the network is fast and what the worker does around it decides the throughput: this is the benchmark
for that (README, "Serving efficiency", *On a GPU*).

    python bench/worker_bench.py                                   # CPU, the shipped model, default batch
    python bench/worker_bench.py --device cuda --n 32 --size 256 --repro 0

Timings mean nothing while anything else runs on the machine.
"""

from __future__ import annotations

import argparse
import io
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import service.pipeline
import service.runner
from model.imaging import decode_image
from model.runtime import load_runtime
from model.sizing import choose_batch
from model.upscale import Upscaler
from service.batcher import Batcher, SchedulerConfig

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "corpus-hr" / "val" / "skimage-coffee.png"


def timed(owner: Any, name: str, label: str, seconds: dict[str, float], sync: Callable[[], None] | None = None,
          calls: dict[str, int] | None = None) -> None:
    """Replace `owner.name` with a wrapper that adds its time to `seconds[label]` (synchronising first if given)."""
    fn = getattr(owner, name)

    def wrapper(*args: Any, **kw: Any) -> Any:
        if sync:
            sync()
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        if sync:
            sync()
        seconds[label] += time.perf_counter() - t0
        if calls is not None:
            calls[label] += 1
        return out

    setattr(owner, name, wrapper)


def crops(photo: Path, n: int, size: int) -> list[bytes]:
    """`n` different size x size crops of `photo`, as PNG bytes."""
    img = Image.open(photo).convert("RGB")
    if img.width < size or img.height < size:
        raise SystemExit(f"{photo} is smaller than {size} px")
    out = []
    for i in range(n):
        x0, y0 = (i * 37) % (img.width - size + 1), (i * 53) % (img.height - size + 1)
        buf = io.BytesIO()
        img.crop((x0, y0, x0 + size, y0 + size)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "default"))
    p.add_argument("--photo", type=Path, default=PHOTO)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--precision", default="auto", help="fp32, bf16, fp16 or auto")
    p.add_argument("--n", type=int, default=8, help="images submitted at once (default: 8)")
    p.add_argument("--size", type=int, default=128, help="LR side of each image (default: 128)")
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--overlap", type=int, default=8)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--batch", type=int, default=0, help="tiles per denoiser call (0: model/sizing.py's choice)")
    p.add_argument("--repro", type=int, choices=[0, 1], default=1, help="SAMDIFFSR_REPRODUCIBLE (default: 1)")
    args = p.parse_args(argv)

    rt = load_runtime(args.checkpoint, "torch", args.device, precision=args.precision)
    sizing = choose_batch(rt, (args.tile, args.tile), args.batch or None)
    upscaler = Upscaler(rt, args.tile, args.overlap, sizing.batch)
    sync = (lambda: torch.cuda.synchronize(rt.device)) if rt.device.type == "cuda" else (lambda: None)
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    timed(rt, "encode", "network: encoder", seconds, sync, calls)
    timed(rt, "denoise", "network: denoiser", seconds, sync, calls)
    timed(service.runner, "start_tracks", "start_tracks (start noise)", seconds)
    timed(service.runner, "track_images", "track_images (copy out)", seconds)
    timed(service.pipeline.Canvas, "add", "Canvas.add (blend in)", seconds)
    timed(service.pipeline.ImageTiles, "inputs", "ImageTiles.inputs (cut tiles)", seconds)
    pngs = crops(args.photo, args.n, args.size)

    batcher = Batcher(rt, SchedulerConfig(max_batch_tiles=sizing.batch, max_queue=args.n,
                                        reproducible=bool(args.repro)))
    batcher.start()

    def run() -> float:
        t0 = time.perf_counter()
        preps = [service.pipeline.prepare(upscaler, decode_image(io.BytesIO(png))) for png in pngs]
        tiles = [prep.tiles() for prep in preps]  # made first, so that the submissions follow each other closely
        jobs = [batcher.submit_tiles(t, steps=args.steps, seed=i) for i, t in enumerate(tiles)]
        wait([job.future for job in jobs])
        for job, prep in zip(jobs, preps, strict=True):
            service.pipeline.encode_canvas(job.future.result(), prep.image)
        return time.perf_counter() - t0

    try:
        run()  # warm-up
        seconds.clear()
        calls.clear()
        wall = run()
    finally:
        batcher.stop()
    n_tiles = args.n * len(upscaler.plan(args.size, args.size))
    net = seconds["network: encoder"] + seconds["network: denoiser"]
    print(f"Device {rt.device}, precision {rt.precision}, {sizing}, reproducible {bool(args.repro)}; {args.n} images "
          f"of {args.size}x{args.size} ({n_tiles} tiles of {args.tile} px), {args.steps} step(s).\n")
    print(f"Wall {wall:.3f} s (decode, worker, PNG encode); network {net:.3f} s = {net / wall:.0%}, in "
          f"{calls['network: encoder']} encoder and {calls['network: denoiser']} denoiser calls.\n")
    print("| part | s | of wall |\n| --- | ---: | ---: |")
    for label, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {s:.3f} | {s / wall:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
