"""Cost per output pixel of checkpoints side by side, in one run: network GFLOP per output MP as served (tiles and
their overlap included), in-process seconds per output MP, and whole-process `samdiffsr upscale` seconds per
output MP of a photo, with the same-run matmul as the yardstick and each checkpoint's time as a ratio of the
first's.

    python bench/efficiency_bench.py checkpoints/default@ae71ae1 checkpoints/default [--size 512] [--repeats 3]

A checkpoint is a directory, or `PATH@REV`: that directory as git revision REV has it (today's default against
the tree's), optionally named `LABEL=...` for the table and `--csv` (which `python -m training.costplot` reads).
Runs alternate between the checkpoints, so a drift of the machine hits them alike; the median counts.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hardware import matmul_gflops  # bench/hardware.py, beside this script
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from model.imaging import decode_image
from model.runtime import load_runtime
from model.sizing import SNUG_GROW, choose_batch
from model.upscale import Upscaler, default_steps, default_tile

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "corpus-hr" / "val" / "skimage-chelsea.png"


def parse_spec(spec: str) -> tuple[str, str]:
    """`[LABEL=]PATH[@REV]` -> (its label: LABEL, else the whole spec; `PATH[@REV]`)."""
    label, sep, source = spec.partition("=")
    return (label, source) if sep else (spec, spec)


def materialize(source: str, tmp: Path) -> Path:
    """`PATH` as is, or `PATH@REV` written out of git into `tmp`."""
    path, _, rev = source.partition("@")
    if not rev:
        return Path(path)
    out = tmp / f"{Path(path).name}@{rev}"
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, path], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out), "--strip-components", str(len(Path(path).parts))],
                   input=archive, check=True)
    return out


def photo_crop(size: int, out: Path, photo: Path = PHOTO) -> Path:
    """A `size` x `size` crop of a real photo (the photo repeated side by side where it is smaller)."""
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    reps = (-(-size // rgb.shape[0]), -(-size // rgb.shape[1]), 1)
    Image.fromarray(np.tile(rgb, reps)[:size, :size]).save(out)
    return out


def network_gflop(upscaler: Upscaler, img, steps: int) -> float:
    """The network's GFLOP for one image as served (counted by torch's FLOP counter)."""
    with FlopCounterMode(display=False) as counter:
        upscaler.upscale(img, steps=steps, seed=0)
    return counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories or PATH@REV; the first is the baseline")
    p.add_argument("--size", type=int, default=512, help="LR photo side in pixels (default 512)")
    p.add_argument("--repeats", type=int, default=3, help="whole-process runs per checkpoint (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in process (default: torch's)")
    p.add_argument("--photo", type=Path, default=PHOTO, help="the photo to crop (default: a corpus photo)")
    p.add_argument("--csv", type=Path, help="also write the table's figures to this CSV")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: in process and `samdiffsr upscale --device`")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        specs = [parse_spec(spec) for spec in args.checkpoints]
        ckpts = [materialize(source, tmp) for _, source in specs]
        src = photo_crop(args.size, tmp / "in.png", args.photo)
        img = decode_image(src)
        out_mp = (args.size * 4) ** 2 / 1e6
        gflops = matmul_gflops(torch.float32, device=args.device)
        where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
            f"{torch.get_num_threads()} threads"
        print(f"same-run fp32 matmul: {gflops:.0f} GFLOP/s; {where}; "
              f"input {args.size}x{args.size} ({src.name} from {args.photo.name}), output {out_mp:.2f} MP\n")

        rows = []
        for (label, _), ckpt in zip(specs, ckpts, strict=True):
            rt = load_runtime(ckpt, "torch", args.device, precision="auto")
            steps = default_steps(rt.config)
            tile = default_tile(rt.config)  # as `samdiffsr upscale` serves it
            batch = choose_batch(rt, (tile, tile), None).batch
            upscaler = Upscaler(rt, tile=tile, overlap=8, max_batch=batch, grow=SNUG_GROW)
            gflop = network_gflop(upscaler, img, steps)
            upscaler.upscale(img, steps=steps, seed=0)  # warm-up
            t0 = time.perf_counter()
            upscaler.upscale(img, steps=steps, seed=0)
            in_process = time.perf_counter() - t0
            rows.append({"spec": label, "ckpt": ckpt, "steps": steps, "tile": tile, "gflop": gflop,
                         "in_process": in_process, "whole": []})

        for _ in range(args.repeats):  # alternate, so that a drift of the machine hits every checkpoint alike
            for row in rows:
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "samdiffsr", "upscale", str(src), str(tmp / "out.png"),
                                "--checkpoint", str(row["ckpt"]), "--device", args.device], check=True,
                               capture_output=True, cwd=ROOT)
                row["whole"].append(time.perf_counter() - t0)

        for row in rows:
            row["whole_s_per_mp"] = statistics.median(row["whole"]) / out_mp
        base = rows[0]["whole_s_per_mp"]
        print("| checkpoint | steps | tile | network GFLOP / output MP | in-process s / MP | whole-process s / MP "
              "| runs (s) | ratio to the first |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
        for row in rows:
            runs = ", ".join(f"{t:.2f}" for t in row["whole"])
            print(f"| {row['spec']} | {row['steps']} | {row['tile']} | {row['gflop'] / out_mp:.0f} "
                  f"| {row['in_process'] / out_mp:.2f} | {row['whole_s_per_mp']:.2f} | {runs} "
                  f"| {row['whole_s_per_mp'] / base:.3f} |")
        if args.csv:
            with args.csv.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["label", "steps", "gflop_per_mp", "in_process_s_per_mp", "whole_s_per_mp", "ratio"])
                for row in rows:
                    w.writerow([row["spec"], row["steps"], round(row["gflop"] / out_mp, 1),
                                round(row["in_process"] / out_mp, 3), round(row["whole_s_per_mp"], 3),
                                round(row["whole_s_per_mp"] / base, 4)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
