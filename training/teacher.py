"""Distillation targets: a teacher model's upscale of every training image's cached LR, cached beside it.

A student learns from `weight * teacher + (1 - weight) * HR` (`training.data.PatchDataset`): the teacher (a
stronger, costlier model, e.g. a fusion of networks with its flips averaged) carries what its networks learned on
far more data than the training photos, which the photos alone do not teach a small network again.

The teacher upscales each whole LR image once, tiled as served, and the result is cached as uint8 (as the HR is),
keyed by the teacher's weights, its settings and the LR cache file, so later runs reuse it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import WEIGHTS
from model.pretrained import sha256_of
from model.runtime import load_runtime, resolve_device, resolve_precision
from model.sizing import choose_batch
from model.upscale import Upscaler
from training.data import CachedImage

log = logging.getLogger(__name__)


def teacher_key(checkpoint: Path, steps: int | None, ensemble: int, tile: int, precision: str) -> str:
    """What identifies a teacher's outputs: its weights' bytes and how it was run."""
    ident = f"{sha256_of(checkpoint / WEIGHTS)}|steps={steps}|ensemble={ensemble}|tile={tile}|{precision}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


@torch.no_grad()
def teacher_targets(images: list[CachedImage], checkpoint: str | Path, steps: int | None = None, ensemble: int = 4,
                    tile: int = 256, precision: str = "fp32", device: str = "auto") -> list[Path]:
    """The teacher's x`scale` image of each image's cached LR (uint8 .npy, the HR's shape), one path per image,
    computed where not cached yet, at `steps` (None: the teacher's default steps), with `ensemble` flips averaged."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / WEIGHTS).is_file():
        raise FileNotFoundError(f"teacher {checkpoint}: not a checkpoint directory (no {WEIGHTS})")
    precision = resolve_precision(precision, resolve_device(device))
    key = teacher_key(checkpoint, steps, ensemble, tile, precision)
    paths = [item.hr_path.with_name(item.hr_path.name.removesuffix(".hr.npy") + f".teacher-{key}.npy")
             for item in images]
    todo = [(item, p) for item, p in zip(images, paths, strict=True) if not p.exists()]
    if not todo:
        return paths
    runtime = load_runtime(checkpoint, "torch", device, precision=precision)
    upscaler = Upscaler(runtime, tile=tile, overlap=8, max_batch=choose_batch(runtime, (tile, tile)).batch)
    log.info("teacher %s (ensemble %d, %d-px tiles, %s): %d of %d training images to upscale", checkpoint,
             ensemble, tile, precision, len(todo), len(images))
    for i, (item, dst) in enumerate(todo):
        hr, lr = item.load()
        sr01 = upscaler.upscale_rgb(np.asarray(lr, np.float32) / 255, steps, ensemble=ensemble)
        if sr01.shape != hr.shape:
            raise ValueError(f"{item.stem}: the teacher's image is {sr01.shape}, the HR {hr.shape}")
        tmp = dst.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, np.round(np.clip(sr01, 0, 1) * 255).astype(np.uint8))
        tmp.replace(dst)
        if (i + 1) % 20 == 0:
            log.info("teacher: %d / %d images", i + 1, len(todo))
    return paths
