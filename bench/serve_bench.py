"""End-to-end upscaling cost: seconds per output megapixel, where the time goes, and how well the network
uses the hardware, in one run.

For each backend, a real photo (a centre crop of `--photo`, `--size` px square) is upscaled the way the CLI and
the service do it: PNG decode, tiling, encoder, every denoiser step, stitching, PNG encode. The runtime is
wrapped to time its calls, so the table splits the time into the network and everything else. The network's
FLOPs (convolutions and matmuls, `torch.utils.flop_counter`, measured once per call shape on eager torch)
give its achieved GFLOP/s, printed next to a plain 2048x2048 matmul's GFLOP/s measured in the same run.
Then `samdiffsr upscale` of the same photo runs as a whole process (Python start-up and model load included).

    python bench/serve_bench.py                                  # the shipped model, default settings
    python bench/serve_bench.py --backends torch --steps 0,2 --size 128

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
from model.runtime import BACKENDS, Runtime, load_runtime
from model.upscale import Upscaler, default_steps

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "corpus-hr" / "val" / "skimage-coffee.png"


class TimedRuntime:
    """A runtime whose encode/denoise calls are timed and whose FLOPs are counted (per call shape)."""

    def __init__(self, rt: Runtime, flops_of: dict[tuple, float]) -> None:
        self.rt, self.flops_of = rt, flops_of
        self.backend, self.device, self.info, self.schedule = rt.backend, rt.device, rt.info, rt.schedule
        self.seconds = self.flops = 0.0

    @property
    def config(self):
        return self.rt.config

    def encode(self, img_lr: Tensor) -> tuple[Tensor, Tensor]:
        t0 = time.perf_counter()
        out = self.rt.encode(img_lr)
        self.seconds += time.perf_counter() - t0
        self.flops += self.flops_of[("encode", tuple(img_lr.shape))]
        return out

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        t0 = time.perf_counter()
        out = self.rt.denoise(x, t, cond)
        self.seconds += time.perf_counter() - t0
        self.flops += self.flops_of[("denoise", tuple(x.shape))]
        return out


def count_flops(net: torch.nn.Module, shapes: set[tuple], cond_channels: int) -> dict[tuple, float]:
    """FLOPs of one encode / denoise call for each (kind, input shape), on eager torch."""
    out = {}
    with torch.no_grad():
        for kind, shape in shapes:
            counter = FlopCounterMode(display=False)
            with counter:
                if kind == "encode":
                    net.encode(torch.zeros(shape))
                else:
                    b, _, h, w = shape
                    t, cond = torch.zeros(b, dtype=torch.long), torch.zeros(b, cond_channels, h, w)
                    net.denoise(torch.zeros(shape), t, cond)
            out[(kind, shape)] = float(counter.get_total_flops())
    return out


def call_shapes(upscaler: Upscaler, h: int, w: int) -> set[tuple]:
    """Every (kind, shape) that upscaling an h x w image calls the runtime with."""
    cfg = upscaler.runtime.config
    n, t, s = len(upscaler.plan(h, w)), upscaler.plan(h, w).tile, cfg.scale
    shapes = set()
    for start in range(0, n, upscaler.max_batch):
        b = min(upscaler.max_batch, n - start)
        shapes |= {("encode", (b, 3, t, t)), ("denoise", (b, 3, t * s, t * s))}
    return shapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "default"))
    p.add_argument("--photo", type=Path, default=PHOTO)
    p.add_argument("--size", type=int, default=256, help="LR size of the square centre crop (default: 256)")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--steps", default="", help="comma-separated step counts (default: the checkpoint's)")
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--overlap", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-process", action="store_true", help="skip the whole-process `samdiffsr upscale` run")
    args = p.parse_args(argv)

    img = Image.open(args.photo).convert("RGB")
    x0, y0 = (img.width - args.size) // 2, (img.height - args.size) // 2
    crop = img.crop((x0, y0, x0 + args.size, y0 + args.size))
    buf = io.BytesIO()
    crop.save(buf, "PNG")
    png = buf.getvalue()
    out_mp = (4 * args.size) ** 2 / 1e6

    mm32, mm16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    eager = load_runtime(args.checkpoint, "torch", "cpu")
    steps_list = [int(s) for s in args.steps.split(",")] if args.steps else [default_steps(eager.config)]
    print(f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}. Model: {eager.info.name}. Photo: {args.photo.name}, {args.size}x{args.size} "
          f"centre crop -> {4 * args.size}x{4 * args.size} ({out_mp:.2f} MP). Tiles {args.tile} px, overlap "
          f"{args.overlap}, {args.batch} per call. Median of {args.repeats}.\n")
    print("| backend | steps | s/image | s per output MP | network share | network GFLOP/s | of fp32 matmul "
          "| of bf16 matmul |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    upscaler0 = Upscaler(eager, args.tile, args.overlap, args.batch)
    shapes = call_shapes(upscaler0, args.size, args.size)
    flops_of = count_flops(eager.net, shapes, eager.config.hidden_size)  # type: ignore[attr-defined]
    for backend in args.backends.split(","):
        rt = TimedRuntime(load_runtime(args.checkpoint, backend, "cpu"), flops_of)
        upscaler = Upscaler(rt, args.tile, args.overlap, args.batch)  # type: ignore[arg-type]
        for steps in steps_list:
            upscaler.upscale(decode_image(io.BytesIO(png)), steps=steps)  # warm-up
            runs = []
            for _ in range(args.repeats):
                rt.seconds = rt.flops = 0.0
                t0 = time.perf_counter()
                out = upscaler.upscale(decode_image(io.BytesIO(png)), steps=steps)
                encode_image(out, "png")
                runs.append((time.perf_counter() - t0, rt.seconds, rt.flops))
            total, net_s, flops = sorted(runs)[len(runs) // 2]
            gf = flops / net_s / 1e9
            print(f"| {backend} | {steps} | {total:.2f} | {total / out_mp:.2f} | {net_s / total:.0%} | {gf:.1f} "
                  f"| {gf / mm32:.0%} | {gf / mm16:.0%} |")
    print(f"\nSame run: fp32 matmul {mm32:.1f} GFLOP/s, bf16 matmul {mm16:.1f} GFLOP/s (2048x2048).")
    if not args.no_process:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.png", Path(tmp) / "out.png"
            src.write_bytes(png)
            cmd = [str(Path(sys.executable).parent / "samdiffsr"), "upscale", str(src), str(dst), "--checkpoint",
                   args.checkpoint]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            wall = time.perf_counter() - t0
        print(f"Whole process, `samdiffsr upscale` at its defaults: {wall:.1f} s for {out_mp:.2f} output MP = "
              f"**{wall / out_mp:.1f} s per output megapixel**.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
