"""Quality per cost, side by side, in one run: PSNR-Y on the whole validation photos (tiled as served, each
degradation asked for) and in-process seconds per output MP on a photo crop, for each model given.

    python bench/quality_cost_bench.py rfdn=runs/pre/rfdn default=checkpoints/default default@1=checkpoints/default:1 \\
        quality=checkpoints/default:0:4 --degradations bicubic,jpeg75 --csv runs/quality-cost.csv \\
        --plot docs/model-card/quality-cost.png

A model is `LABEL=PATH[:STEPS[:ENSEMBLE]]` (default: the checkpoint's served steps, no self-ensemble); the first is
the cost baseline. Timings are in process (the network, tiling and sampling; no file I/O), the median of
`--repeats` runs after a warm-up (the models taking turns), at `--precision` (default auto: bf16 where the CPU has
it, else fp32).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hardware import cpu_summary, matmul_gflops  # bench/hardware.py, beside this script
from PIL import Image

from model.runtime import load_runtime
from model.sizing import choose_batch
from model.upscale import Upscaler, default_steps, default_tile
from training.evaluate import BICUBIC, EvalOptions, SamplerSettings, evaluate, method_key

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT.parent / "shared" / "data" / "corpus-hr" / "val"
TIMED = "skimage-coffee.png"  # the validation photo whose crop the timings run on


@dataclass
class Spec:
    label: str
    path: Path
    steps: int | None
    ensemble: int


def parse_spec(text: str) -> Spec:
    label, _, rest = text.partition("=")
    path, *opts = rest.split(":")
    steps = int(opts[0]) if opts and opts[0] != "" else None
    ensemble = int(opts[1]) if len(opts) > 1 else 1
    return Spec(label, Path(path), steps, ensemble)


@dataclass
class Timed:
    """A model ready to time: its upscaler warmed up, the steps and tile it is served at, the output MP."""
    spec: Spec
    upscaler: Upscaler
    steps: int
    tile: int
    out_mp: float

    def run(self, photo: np.ndarray) -> float:
        t0 = time.perf_counter()
        self.upscaler.upscale_rgb(photo, steps=self.steps, seed=0, ensemble=self.spec.ensemble)
        return time.perf_counter() - t0


def timing_photo(size: int) -> np.ndarray:
    """The top-left `size`-px crop of the timed validation photo (`TIMED`), RGB in [0, 1]."""
    rgb = np.asarray(Image.open(VAL / TIMED).convert("RGB"), dtype=np.float32) / 255
    return np.ascontiguousarray(rgb[:size, :size])


def prepare(specs: list[Spec], photo: np.ndarray, precision: str) -> list[Timed]:
    """Each model loaded as served (its steps unless the spec says, its tile, the tiles per call that
    `model.sizing` chooses for them) and run once on `photo`."""
    out = []
    for spec in specs:
        rt = load_runtime(spec.path, "torch", "cpu", precision=precision)
        steps = default_steps(rt.config) if spec.steps is None else spec.steps
        tile = default_tile(rt.config)
        batch = choose_batch(rt, (tile, tile)).batch
        timed = Timed(spec, Upscaler(rt, tile=tile, overlap=8, max_batch=batch), steps, tile,
                      photo.shape[0] * photo.shape[1] * rt.config.scale ** 2 / 1e6)
        timed.run(photo)  # warm-up
        out.append(timed)
    return out


def median_s_per_mp(models: list[Timed], photo: np.ndarray, repeats: int) -> list[float]:
    """In-process s per output MP of each model on `photo`, the median of `repeats` runs. The models take turns,
    one timed run each per round, so that what else the machine does falls on all of them alike."""
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for m, own in zip(models, times, strict=True):
            own.append(m.run(photo))
    return [statistics.median(own) / m.out_mp for own, m in zip(times, models, strict=True)]


def seconds_per_mp(specs: list[Spec], photo: np.ndarray, precision: str,
                   repeats: int) -> list[tuple[float, int, int]]:
    """(in-process s per output MP, steps, tile) of each model on `photo` (RGB in [0, 1]), as served."""
    models = prepare(specs, photo, precision)
    return [(s, m.steps, m.tile) for s, m in zip(median_s_per_mp(models, photo, repeats), models, strict=True)]


def quality(spec: Spec, steps: int, tile: int, degradation: str, val: Path, precision: str) -> dict[str, float]:
    opts = EvalOptions(spec.path, val, SamplerSettings(steps=(steps,), tile=tile, overlap=8, ensemble=spec.ensemble),
                       precision=precision, degradation=degradation)
    mean = evaluate(opts).mean()
    m, b = mean[method_key(steps)], mean[BICUBIC]
    return {"psnr_y": m["psnr_y"], "ssim": m["ssim"], "gain": m["psnr_y"] - b["psnr_y"],
            "flat": m.get("flat", float("nan")) / b.get("flat", float("nan"))}


def plot(rows: list[dict], degradation: str, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        x, y = row["s_per_mp"], row[f"{degradation}_psnr_y"]
        ax.scatter([x], [y], s=30)
        ax.annotate(row["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("in-process seconds per output MP (log)")
    ax.set_ylabel(f"PSNR-Y on the validation photos, {degradation} (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="LABEL=PATH[:STEPS[:ENSEMBLE]]; the first is the cost baseline")
    p.add_argument("--val", type=Path, default=VAL, help="validation HR photos (default: corpus-hr/val)")
    p.add_argument("--degradations", default="bicubic", help="comma-separated (default: bicubic)")
    p.add_argument("--size", type=int, default=384, help="side of the LR photo crop timed (default 384)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model (default 3)")
    p.add_argument("--precision", default="auto", help="fp32, bf16 or auto (default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--csv", type=Path, help="write the table's figures here")
    p.add_argument("--plot", type=Path, help="write the quality-against-cost plot here (PNG)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_spec(s) for s in args.models]
    degradations = [d for d in args.degradations.split(",") if d]
    photo = timing_photo(args.size)
    gflops = matmul_gflops(torch.float32)
    where = f"{cpu_summary()}; {torch.get_num_threads()} threads; fp32 matmul {gflops:.0f} GFLOP/s"
    print(f"{where}; timed on a {photo.shape[1]}x{photo.shape[0]} crop of {TIMED}\n")

    rows = []
    for spec, (s_mp, steps, tile) in zip(specs, seconds_per_mp(specs, photo, args.precision, args.repeats),
                                         strict=True):
        row = {"label": spec.label, "path": str(spec.path), "steps": steps, "ensemble": spec.ensemble, "tile": tile,
               "s_per_mp": s_mp}
        for d in degradations:
            for k, v in quality(spec, steps, tile, d, args.val, args.precision).items():
                row[f"{d}_{k}"] = v
        rows.append(row)
        print(f"{spec.label}: done", flush=True)

    base = rows[0]["s_per_mp"]
    head = "| model | steps | ensemble | " + " | ".join(f"{d} PSNR-Y / SSIM | {d} gain over bicubic | {d} flat"
                                                     for d in degradations) + " | s per output MP | cost ratio |"
    print("\n" + head)
    print("| --- | ---: | ---: | " + "--- | ---: | ---: | " * len(degradations) + "---: | ---: |")
    for r in rows:
        cells = " | ".join(f"{r[f'{d}_psnr_y']:.2f} / {r[f'{d}_ssim']:.4f} | {r[f'{d}_gain']:+.2f} dB | "
                           f"{r[f'{d}_flat']:.2f}" for d in degradations)
        print(f"| {r['label']} | {r['steps']} | {r['ensemble']} | {cells} | {r['s_per_mp']:.2f} "
              f"| {r['s_per_mp'] / base:.2f}x |")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if args.plot:
        plot(rows, degradations[0], args.plot, where)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
