"""What fixed and snug tiles cost on a mix of photo sizes, as the service tiles them (`fit=True`, one tile per call
unless `--batch`), in process: seconds per output MP and the LR area computed over the images' own.

    python bench/tiling_bench.py checkpoints/fast --tiles 128,256 [--steps 0] [--images 14] [--sides 150,700]

Each (tile, fixed or snug) runs in a fresh process, so each pays for its own first calls at every new tile shape
(oneDNN sets up its kernels per shape) as a server meeting new image sizes does, after one warm-up tile as the
service's own warm-up. The images are crops of a corpus photo with sides drawn from `--sides` (seeded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus-hr" / "val" / "plasma-grey.png"


def sizes(n: int, seed: int, low: int, high: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(low, high)), int(rng.integers(low, high))) for _ in range(n)]


def one(args: argparse.Namespace) -> dict:
    """One configuration in this process: total seconds and computed area over the images' own."""
    from model.imaging import DecodedImage, decode_image
    from model.runtime import load_runtime
    from model.sizing import SNUG_GROW
    from model.upscale import Upscaler, default_steps

    rt = load_runtime(args.checkpoint, "torch", "cpu", precision="auto")
    steps = default_steps(rt.config) if args.steps is None else args.steps
    up = Upscaler(rt, tile=args.tile, overlap=args.overlap, max_batch=args.batch, fit=True,
                  grow=SNUG_GROW if args.snug else 1.0)
    src = decode_image(args.photo).rgb

    def crop(h: int, w: int) -> DecodedImage:
        return DecodedImage(rgb=np.ascontiguousarray(src[:h, :w]))

    up.upscale(crop(args.tile, args.tile), steps=steps)  # the service's warm-up: one full tile
    seconds = area = pixels = 0
    for h, w in sizes(args.images, args.seed, *args.sides):
        h, w = min(h, src.shape[0]), min(w, src.shape[1])
        t0 = time.perf_counter()
        up.upscale(crop(h, w), steps=steps, seed=0)
        seconds += time.perf_counter() - t0
        grid = up.plan(h, w)
        area += len(grid) * grid.tile_shape[0] * grid.tile_shape[1]
        pixels += h * w
    return {"seconds": seconds, "output_mp": pixels * rt.config.scale ** 2 / 1e6, "area": area / pixels,
            "steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--tiles", default="64,128", help="comma-separated LR tile sizes (default 64,128)")
    p.add_argument("--overlap", type=int, default=8)
    p.add_argument("--batch", type=int, default=1, help="tiles per call (default 1: the CPU's)")
    p.add_argument("--steps", type=int, help="default: the checkpoint's")
    p.add_argument("--images", type=int, default=14)
    p.add_argument("--sides", type=lambda v: tuple(int(n) for n in v.split(",")), default=(150, 700),
                   help="LOW,HIGH: the range the crops' sides are drawn from (default 150,700)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--photo", type=Path, default=PHOTO)
    p.add_argument("--tile", type=int, help=argparse.SUPPRESS)  # one configuration, in a child process
    p.add_argument("--snug", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tile:
        print(json.dumps(one(args)))
        return 0

    common = [args.checkpoint, "--overlap", str(args.overlap), "--batch", str(args.batch), "--images",
              str(args.images), "--seed", str(args.seed), "--sides", ",".join(map(str, args.sides)),
              "--photo", str(args.photo), *(["--steps", str(args.steps)] if args.steps is not None else [])]
    print(f"{args.checkpoint}: {args.images} crops of {args.photo.name}, sides {args.sides[0]}-{args.sides[1]} px "
          f"(seed {args.seed}), overlap {args.overlap}, {args.batch} tile(s) per call\n")
    print("| tile | tiles | steps | s / output MP | area computed / image's | time vs fixed |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for tile in (int(t) for t in args.tiles.split(",")):
        fixed = None
        for snug in (False, True):
            cmd = [sys.executable, __file__, *common, "--tile", str(tile), *(["--snug"] if snug else [])]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            fixed = fixed or r["seconds"]
            print(f"| {tile} | {'snug' if snug else 'fixed'} | {r['steps']} | {r['seconds'] / r['output_mp']:.3f} "
                  f"| {r['area']:.2f}x | {r['seconds'] / fixed:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
