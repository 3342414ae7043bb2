"""Does the data path keep up with training? The `real` degradation against `bicubic`, in the same run.

Two measurements per degradation kind, on the training photos of a config (default `configs/real.yaml`):

1. **Loader alone**: patches/s that the DataLoader delivers with W workers (the degradation runs in the workers;
   `bicubic` LR comes from the cache), no training.
2. **Training**: stage-2 patches/s of the real trainer (`training.train.train`) over steps 20..N of a short run,
   the same config and batch, only `data.degradation.kind` changed; the ratio real / bicubic is the figure of
   merit (1.0: the degradation costs the training nothing).

    python bench/data_bench.py --steps 120                   # about 3 minutes on 2 CPU cores
    python bench/data_bench.py --loader-only --workers 0,1,2

Needs the SPE maps of the config's training photos (`samdiffsr masks generate/embed`, or `make masks`).
Timings mean nothing while anything else runs.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from training.config import load_config
from training.data import PatchDataset, prepare_images
from training.train import train

ROOT = Path(__file__).resolve().parents[1]


def loader_rate(cfg, kind: str, workers: int, batches: int) -> float:
    d = cfg.data
    images = prepare_images(d.train_dir, d.cache_dir, cfg.model.build().scale, d.spe_dir, d.missing_spe, d.hr_patch)
    real = d.degradation.real if kind == "real" else None
    ds = PatchDataset(images, d.hr_patch, cfg.model.build().scale, d.repeat, d.augment, 0, real)
    loader = DataLoader(ds, batch_size=d.batch_size, shuffle=True, num_workers=workers, drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * d.batch_size / (time.perf_counter() - t0)


def training_rate(config: Path, kind: str, steps: int, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [*overrides, f"data.degradation.kind={kind}", f"run.steps={steps}",
                                   "run.log_every=10", "val.every=0", f"run.checkpoint_every={steps * 10}"])
        train(cfg, "diffusion", Path(tmp) / "run", progress=False)
        with (Path(tmp) / "run" / "metrics.csv").open() as f:
            rows = {int(r["step"]): float(r["elapsed_s"]) for r in csv.DictReader(f)}
    first = min(s for s in rows if s >= 20)
    return (steps - first) * cfg.data.batch_size / (rows[steps] - rows[first])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "real.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--steps", type=int, default=120, help="training steps per kind (default: 120)")
    ap.add_argument("--workers", default="1", help="loader workers to time, comma-separated (default: 1)")
    ap.add_argument("--batches", type=int, default=50, help="batches per loader timing (default: 50)")
    ap.add_argument("--loader-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(args.config, args.set)
    print(f"config {args.config.name}: batch {cfg.data.batch_size} x {cfg.data.hr_patch} px, "
          f"workers {cfg.data.workers}, torch threads {cfg.run.threads or torch.get_num_threads()}")
    print("\n| measurement | bicubic | real | real / bicubic |\n|---|---:|---:|---:|")
    for w in (int(v) for v in args.workers.split(",")):
        rates = [loader_rate(cfg, kind, w, args.batches) for kind in ("bicubic", "real")]
        print(f"| loader alone, {w} worker(s), patches/s | {rates[0]:.0f} | {rates[1]:.0f} | "
              f"{rates[1] / rates[0]:.2f} |", flush=True)
    if not args.loader_only:
        rates = [training_rate(args.config, kind, args.steps, args.set) for kind in ("bicubic", "real")]
        print(f"| stage-2 training, patches/s | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.2f} |")


if __name__ == "__main__":
    main()
