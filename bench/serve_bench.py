"""End-to-end upscaling cost: seconds per output megapixel, where the time goes, and how well the network
uses the hardware, in one run.

For each backend, a real photo (a centre crop of `--photo`, `--size` px square) is upscaled the way the CLI and
the service do it: PNG decode, tiling, encoder, every denoiser step, stitching, PNG encode. The runtime is
wrapped to time its calls, so the table splits the time into the network and everything else. The network's
FLOPs (convolutions and matmuls, `torch.utils.flop_counter`, measured once per call shape on eager torch)
give its achieved GFLOP/s, printed next to a plain 2048x2048 matmul's GFLOP/s measured in the same run.
Then `samdiffsr upscale` of the same photo runs as a whole process (Python start-up and model load included).

Each row is one `--configs` entry, BACKEND:PRECISION:BATCH:SNUG: precision fp32, bf16 or fp16 (reduced precision
on the torch backend only), batch `auto` (what `model/sizing.py` chooses for the device) or a number, snug tiles
`on` or `off` (`model.tiling.plan_tiles(grow=...)`); the first entry is the old default. Two more
tables: seconds per tile and GFLOP/s of one denoiser call at each batch size and tile size (`--calibrate`), and
where the denoiser's work goes (overlap, padding beyond the image, padding of calls to the batch) for a few
image sizes, at the old defaults and the new ones (counted, not timed). `--device cuda` runs it all on a GPU.

    python bench/serve_bench.py                                  # the shipped model, default settings
    python bench/serve_bench.py --configs torch:fp32:auto:off,torch:fp16:auto:off --size 256 --device cuda

Timings mean nothing while anything else runs on the machine.
"""

from __future__ import annotations

import argparse
import io
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hardware import matmul_gflops  # bench/hardware.py, beside this script
from PIL import Image
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from model.imaging import decode_image, encode_image
from model.runtime import Runtime, load_runtime, resolve_device
from model.sizing import SNUG_GROW, choose_batch, denoiser_work, time_per_tile
from model.tiling import plan_tiles
from model.upscale import Upscaler, default_steps

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "corpus-hr" / "val" / "skimage-coffee.png"
CONFIGS = ("torch:fp32:16:off,torch:fp32:auto:off,torch:fp32:auto:on,torch:bf16:auto:off,torch:bf16:auto:on,"
           "torchscript:fp32:auto:off,onnx:fp32:auto:off")


class TimedRuntime:
    """A runtime whose encode/denoise calls are timed and whose FLOPs are counted (per call shape)."""

    def __init__(self, rt: Runtime, flops_of: dict[tuple, float]) -> None:
        self.rt, self.flops_of = rt, flops_of
        self.backend, self.device, self.info, self.schedule = rt.backend, rt.device, rt.info, rt.schedule
        self.precision = rt.precision
        self.seconds = self.flops = 0.0
        self._sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)

    @property
    def config(self):
        return self.rt.config

    def encode(self, img_lr: Tensor) -> tuple[Tensor, Tensor]:
        self._sync()
        t0 = time.perf_counter()
        out = self.rt.encode(img_lr)
        self._sync()
        self.seconds += time.perf_counter() - t0
        self.flops += self.flops_of[("encode", tuple(img_lr.shape))]
        return out

    def encode_image(self, img_lr: Tensor) -> Tensor:
        self._sync()
        t0 = time.perf_counter()
        out = self.rt.encode_image(img_lr)
        self._sync()
        self.seconds += time.perf_counter() - t0
        self.flops += self.flops_of[("encode_image", tuple(img_lr.shape))]
        return out

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        self._sync()
        t0 = time.perf_counter()
        out = self.rt.denoise(x, t, cond)
        self._sync()
        self.seconds += time.perf_counter() - t0
        self.flops += self.flops_of[("denoise", tuple(x.shape))]
        return out


def count_flops(net: torch.nn.Module, shapes: set[tuple]) -> dict[tuple, float]:
    """FLOPs of one encode / denoise call for each (kind, input shape), on eager torch."""
    out, dev = {}, next(net.parameters()).device
    with torch.no_grad():
        for kind, shape in shapes:
            counter = FlopCounterMode(display=False)
            with counter:
                if kind == "encode":
                    net.encode(torch.zeros(shape, device=dev))
                elif kind == "encode_image":
                    net.encode_image(torch.zeros(shape, device=dev))
                else:
                    b, _, h, w = shape
                    t = torch.zeros(b, dtype=torch.long, device=dev)
                    cond = torch.zeros(b, *net.cfg.cond_shape(h // net.cfg.scale, w // net.cfg.scale), device=dev)
                    net.denoise(torch.zeros(shape, device=dev), t, cond)
            out[(kind, shape)] = float(counter.get_total_flops())
    return out


def call_shapes(upscaler: Upscaler, h: int, w: int) -> set[tuple]:
    """Every (kind, shape) that upscaling an h x w image calls the runtime with."""
    cfg = upscaler.runtime.config
    grid = upscaler.plan(h, w)
    n, (th, tw), s = len(grid), grid.tile_shape, cfg.scale
    shapes = set()
    for start in range(0, n, upscaler.max_batch):
        b = min(upscaler.max_batch, n - start)
        shapes |= {("encode", (b, 3, th, tw)), ("encode_image", (b, 3, th, tw)), ("denoise", (b, 3, th * s, tw * s))}
    return shapes


def calibration_table(rt: Runtime, rt16: Runtime | None, tiles: list[int], batches: list[int],
                      mm32: float) -> list[str]:
    """Seconds per tile and GFLOP/s of one denoiser call, per tile size and batch, fp32 (and bf16)."""
    net = rt.net  # type: ignore[attr-defined]
    lines = ["| tile (LR px) | batch | LR px per call | fp32 ms/tile | fp32 GFLOP/s | of fp32 matmul "
             + ("| bf16 ms/tile | bf16 speed-up |" if rt16 else "|"),
             "| ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if rt16 else "")]
    for tile in tiles:
        hw = tile * rt.config.scale
        for b in batches:
            try:
                flops = count_flops(net, {("denoise", (b, 3, hw, hw))})
                per_tile = time_per_tile(rt, (tile, tile), b)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                lines.append(f"| {tile} | {b} | {b * tile * tile} | out of memory | | |" + (" | |" if rt16 else ""))
                continue
            gf = sum(flops.values()) / b / per_tile / 1e9
            row = f"| {tile} | {b} | {b * tile * tile} | {per_tile * 1e3:.3g} | {gf:.1f} | {gf / mm32:.0%} |"
            if rt16 is not None:
                per16 = time_per_tile(rt16, (tile, tile), b)
                row += f" {per16 * 1e3:.3g} | {per_tile / per16:.2f}x |"
            lines.append(row)
    return lines


def waste_table(tile: int, overlap: int, scale: int, multiple: int, batches: dict[str, int]) -> list[str]:
    """Shares of the denoiser's work for a few image sizes (counted from the tile plan, one image alone)."""
    lines = ["| image (LR) | batch, padded calls | snug tiles | tiles | useful | overlap | beyond the image "
             "| batch padding | work vs old default |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for h, w in ((48, 64), (128, 128), (256, 256), (300, 451), (512, 768)):
        old = None
        for (name, b), grow in ((("old default", 16), 1.0), *(((n, b), g) for n, b in batches.items()
                                                              for g in (1.0, SNUG_GROW))):
            grid = plan_tiles(h, w, tile, overlap, scale, multiple, fit=True, grow=grow)
            work = denoiser_work(grid, b, pad_calls=True)
            old = old or work.total
            shares = " | ".join(f"{work.share(k):.0%}" for k in ("useful", "overlap", "beyond", "batch_pad"))
            lines.append(f"| {w}x{h} | {b} ({name}) | {'on' if grow > 1 else 'off'} | {len(grid)} | {shares} "
                         f"| {work.total / old:.0%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "default"))
    p.add_argument("--photo", type=Path, default=PHOTO)
    p.add_argument("--size", type=int, default=128, help="LR size of the square centre crop (default: 128)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda")
    p.add_argument("--configs", default=CONFIGS, help="BACKEND:PRECISION:BATCH:SNUG,... (default: %(default)s)")
    p.add_argument("--steps", default="", help="comma-separated step counts (default: the checkpoint's)")
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--overlap", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--calibrate", default="32,64,96:1,2,4,8",
                   help="TILES:BATCHES of the per-call table (empty: skip it)")
    p.add_argument("--no-process", action="store_true", help="skip the whole-process `samdiffsr upscale` run")
    args = p.parse_args(argv)

    img = Image.open(args.photo).convert("RGB")
    x0, y0 = (img.width - args.size) // 2, (img.height - args.size) // 2
    crop = img.crop((x0, y0, x0 + args.size, y0 + args.size))
    buf = io.BytesIO()
    crop.save(buf, "PNG")
    png = buf.getvalue()
    out_mp = (4 * args.size) ** 2 / 1e6
    dev = str(resolve_device(args.device))

    mm32, mm16 = matmul_gflops(torch.float32, device=dev), matmul_gflops(torch.bfloat16, device=dev)
    eager = load_runtime(args.checkpoint, "torch", dev)
    cfg = eager.config
    auto = choose_batch(eager, (args.tile, args.tile))
    steps_list = [int(s) for s in args.steps.split(",")] if args.steps else [default_steps(cfg)]
    configs = [(b, pr, auto.batch if n == "auto" else int(n), sn == "on")
               for b, pr, n, sn in (c.split(":") for c in args.configs.split(","))]
    print(f"Machine: {platform.processor() or platform.machine()}, device {dev}, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}. Model: {eager.info.name}. Photo: {args.photo.name}, "
          f"{args.size}x{args.size} centre crop -> {4 * args.size}x{4 * args.size} ({out_mp:.2f} MP). Tiles "
          f"{args.tile} px, overlap {args.overlap}; batch auto = {auto}. Median of {args.repeats}.\n")
    print(f"Same run: fp32 matmul {mm32:.1f} GFLOP/s, bf16 matmul {mm16:.1f} GFLOP/s (2048x2048).\n")
    print("| backend | precision | batch | snug tiles | tiles | steps | s/image | s per output MP "
          "| outside the network | network GFLOP/s | of fp32 matmul | of bf16 matmul |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    shapes: set[tuple] = set()
    for _, _, batch, snug in configs:
        shapes |= call_shapes(Upscaler(eager, args.tile, args.overlap, batch, grow=SNUG_GROW if snug else 1.0),
                              args.size, args.size)
    flops_of = count_flops(eager.net, shapes)  # type: ignore[attr-defined]
    runtimes: dict[tuple[str, str], TimedRuntime] = {}
    for backend, precision, batch, snug in configs:
        if (backend, precision) not in runtimes:
            runtimes[backend, precision] = TimedRuntime(load_runtime(args.checkpoint, backend, dev,
                                                                     precision=precision), flops_of)
        rt = runtimes[backend, precision]
        upscaler = Upscaler(rt, args.tile, args.overlap, batch,  # type: ignore[arg-type]
                            grow=SNUG_GROW if snug else 1.0)
        n_tiles = len(upscaler.plan(args.size, args.size))
        for steps in steps_list:
            upscaler.upscale(decode_image(io.BytesIO(png)), steps=min(steps, 1))  # warm-up
            runs = []
            for _ in range(args.repeats):
                rt.seconds = rt.flops = 0.0
                t0 = time.perf_counter()
                out = upscaler.upscale(decode_image(io.BytesIO(png)), steps=steps)
                encode_image(out, "png")
                runs.append((time.perf_counter() - t0, rt.seconds, rt.flops))
            total, net_s, flops = sorted(runs)[len(runs) // 2]
            gf = flops / net_s / 1e9
            print(f"| {backend} | {precision} | {batch} | {'on' if snug else 'off'} | {n_tiles} | {steps} "
                  f"| {total:.2f} | {total / out_mp:.2f} | {1 - net_s / total:.1%} | {gf:.1f} | {gf / mm32:.0%} "
                  f"| {gf / mm16:.0%} |", flush=True)
    if args.calibrate:
        tiles, _, bs = args.calibrate.partition(":")
        rt16 = load_runtime(args.checkpoint, "torch", dev, precision="bf16") if "bf16" in args.configs else None
        print("\nOne denoiser call (eager torch), median of 3 after a warm-up:\n")
        print("\n".join(calibration_table(eager, rt16, [int(t) for t in tiles.split(",")],
                                           [int(b) for b in bs.split(",")], mm32)))
    print(f"\nWhere the denoiser's work goes (tile {args.tile}, overlap {args.overlap}, one image alone, calls "
          "padded to the batch as SAMDIFFSR_REPRODUCIBLE does):\n")
    print("\n".join(waste_table(args.tile, args.overlap, cfg.scale, cfg.lr_multiple,
                                 {"auto": auto.batch})))
    if not args.no_process:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.png", Path(tmp) / "out.png"
            src.write_bytes(png)
            cmd = [sys.executable, "-m", "samdiffsr", "upscale", str(src), str(dst), "--checkpoint",
                   args.checkpoint, "--device", dev]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            wall = time.perf_counter() - t0
        print(f"\nWhole process, `samdiffsr upscale` at its defaults: {wall:.1f} s for {out_mp:.2f} output MP = "
              f"**{wall / out_mp:.1f} s per output megapixel**.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
