"""Time the PNG writer the CLI and the service use (`model.imaging.png_bytes`) against Pillow's at the settings it
replaced (zlib level 1, run-length matching), on a photo and on a flat graphic, best of N in one process.

    python bench/png_bench.py [--size 2048] [--repeats 5] [--photo OUT.png]

The photo is a corpus photo upscaled to `size` x `size` with Pillow's bicubic, unless `--photo` names an image
(e.g. a `samdiffsr upscale` output); the graphic is two flat colours and a gentle gradient.
"""

from __future__ import annotations

import argparse
import io
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from model.imaging import png_bytes

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus-hr" / "val" / "skimage-chelsea.png"


def pillow_png(pix: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pix).save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buf.getvalue()


def best_of(fn: Callable[[np.ndarray], bytes], pix: np.ndarray, repeats: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        size = len(fn(pix))
        times.append(time.perf_counter() - t0)
    return min(times), size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--photo", type=Path, help="an image to encode instead of the upscaled corpus photo")
    args = p.parse_args(argv)

    s = args.size
    photo = Image.open(args.photo or PHOTO).convert("RGB")
    if args.photo is None:
        photo = photo.resize((s, s), Image.Resampling.BICUBIC)
    graphic = np.zeros((s, s, 3), np.uint8)
    graphic[:, s // 2:] = (200, 60, 30)
    graphic[s // 2:, :, 2] = np.linspace(0, 255, s, dtype=np.uint8)[None, :]
    images = {f"photo {photo.width}x{photo.height}": np.asarray(photo), f"graphic {s}x{s}": graphic}

    print("| image | Pillow, level 1, Z_RLE (s / kB) | png_bytes: libpng, level 1, Z_RLE, Paeth (s / kB) | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for name, pix in images.items():
        (t_pil, n_pil), (t_new, n_new) = best_of(pillow_png, pix, args.repeats), best_of(png_bytes, pix, args.repeats)
        print(f"| {name} | {t_pil:.3f} / {n_pil / 1e3:,.1f} | {t_new:.3f} / {n_new / 1e3:,.1f} "
              f"| {t_pil / t_new:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
