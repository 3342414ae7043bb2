"""Training data: a folder of HR images (+ SPE maps) -> random aligned HR / LR / SPE patches.

Each image is decoded once and cached as `.npy` files (HR and its degraded LR, both uint8), keyed
by the file's path, size and mtime, so epochs (and later runs) never re-decode JPEGs or re-run the
bicubic degradation; workers memory-map the cache. A patch is a pure function of (seed, epoch,
index), which makes a resumed run draw exactly the patches the uninterrupted run would have drawn.

Bad data is reported, not fatal: an unreadable image is logged and skipped; an image without an
SPE map is skipped, or given an all-zero map ("no structure") with `missing_spe="zeros"`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from model.imaging import decode_image, list_images
from model.inputs import lr_inputs
from training.degrade import crop_to_multiple, degrade_named, make_lr
from training.realworld import RealDegradation, degrade_real

log = logging.getLogger(__name__)

CACHE_VERSION = "1"


@dataclass(frozen=True)
class CachedImage:
    """One preprocessed image: HR (H, W, 3) and LR (H/s, W/s, 3) uint8 arrays, and its SPE map path."""

    stem: str
    hr_path: Path
    lr_path: Path
    spe_path: Path | None  # None: all-zero map

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        return np.load(self.hr_path, mmap_mode="r"), np.load(self.lr_path, mmap_mode="r")


def random_crops(images: list[CachedImage], count: int, lr_size: int, scale: int,
                 rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`count` random crops of `lr_size` LR pixels a side, each of a random image: (HR, LR) uint8 views."""
    for _ in range(count):
        hr, lr = images[int(rng.integers(len(images)))].load()
        y, x = (int(rng.integers(s - lr_size + 1)) for s in lr.shape[:2])
        yield (hr[y * scale:(y + lr_size) * scale, x * scale:(x + lr_size) * scale],
               lr[y:y + lr_size, x:x + lr_size])


def _cache_key(path: Path, scale: int) -> str:
    st = path.stat()
    ident = f"{CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|x{scale}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def preprocess_image(path: Path, cache_dir: Path, scale: int) -> tuple[Path, Path]:
    """Decode an image, crop it to a multiple of `scale`, degrade it, and cache HR/LR as uint8 .npy.

    Returns the two cache paths; reuses them when they already exist for this file version.
    Raises `model.imaging.ImageDecodeError` for an unreadable image.
    """
    key = _cache_key(path, scale)
    hr_path = cache_dir / f"{path.stem}-{key}.hr.npy"
    lr_path = cache_dir / f"{path.stem}-{key}.lr.npy"
    if hr_path.exists() and lr_path.exists():
        return hr_path, lr_path
    decoded = decode_image(path)
    hr01 = crop_to_multiple(decoded.rgb, scale)
    if hr01.shape[0] < scale or hr01.shape[1] < scale:
        raise ValueError(f"{path}: image {decoded.width}x{decoded.height} is too small")
    hr_u8 = np.round(np.clip(hr01, 0, 1) * 255).astype(np.uint8)
    hr_t = torch.from_numpy(hr_u8).permute(2, 0, 1).float() / 255
    lr01 = make_lr(hr_t, scale).permute(1, 2, 0).numpy()
    lr_u8 = np.round(lr01 * 255).astype(np.uint8)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for arr, dst in ((hr_u8, hr_path), (lr_u8, lr_path)):
        tmp = dst.with_suffix(f".tmp{id(arr)}.npy")
        np.save(tmp, arr)
        tmp.replace(dst)
    return hr_path, lr_path


def prepare_images(
    image_dir: str | Path, cache_dir: str | Path, scale: int, spe_dir: str | Path | None = None,
    missing_spe: Literal["skip", "zeros"] = "skip", min_hr: int = 0,
) -> list[CachedImage]:
    """Preprocess every image of a folder into the cache; skip (and log) what cannot be used.

    With `spe_dir`, each image needs `<spe_dir>/<stem>.npy`; without one it is skipped or, with
    `missing_spe="zeros"`, trained with no structure. `spe_dir=None` means no SPE maps at all.
    Images smaller than `min_hr` pixels on a side (after cropping) are skipped.
    """
    cache = Path(cache_dir)
    items: list[CachedImage] = []
    for path in list_images(image_dir):
        spe_path: Path | None = None
        if spe_dir is not None:
            cand = Path(spe_dir) / f"{path.stem}.npy"
            if cand.is_file():
                spe_path = cand
            elif missing_spe == "zeros":
                log.warning("%s: no SPE map %s; using an all-zero map (no structure)", path.name, cand)
            else:
                log.warning("%s: no SPE map %s; skipping the image", path.name, cand)
                continue
        try:
            hr_path, lr_path = preprocess_image(path, cache, scale)
        except Exception as e:  # unreadable / truncated / too small: report and go on
            log.warning("%s: skipped, cannot be used: %s", path.name, e)
            continue
        hr = np.load(hr_path, mmap_mode="r")
        if min(hr.shape[:2]) < min_hr:
            log.warning("%s: skipped, %dx%d is smaller than the %d-pixel patch",
                        path.name, hr.shape[1], hr.shape[0], min_hr)
            continue
        if spe_path is not None:
            spe = np.load(spe_path, mmap_mode="r")
            if spe.ndim != 2 or spe.shape[0] < hr.shape[0] or spe.shape[1] < hr.shape[1] \
                    or spe.shape[0] - hr.shape[0] >= scale or spe.shape[1] - hr.shape[1] >= scale:
                msg = f"SPE map {spe_path} has shape {spe.shape}, image is {hr.shape[:2]} (after cropping)"
                if missing_spe == "zeros":
                    log.warning("%s: %s; using an all-zero map", path.name, msg)
                    spe_path = None
                else:
                    log.warning("%s: %s; skipping the image", path.name, msg)
                    continue
        items.append(CachedImage(path.stem, hr_path, lr_path, spe_path))
    return items


def augment(arrays: list[np.ndarray], flip: bool, rot: int) -> list[np.ndarray]:
    """The same horizontal flip and rotation by rot*90 degrees for HWC / HW arrays."""
    out = []
    for a in arrays:
        if flip:
            a = a[:, ::-1]
        a = np.rot90(a, rot, axes=(0, 1))
        out.append(np.ascontiguousarray(a))
    return out


class PatchDataset(Dataset):
    """Random aligned patches. Item i of epoch e is image i % len(images), drawn with seed (seed, e, i).

    The LR patch is the cached bicubic one, or with `real` set, the HR patch degraded by
    `training.realworld.degrade_real` with the same seeded generator (after the crop and augmentation draws).
    With `teachers` (one cached teacher image per image, `training.teacher`), the target `hr` is
    `teacher_weight` times the teacher's patch plus the rest of the HR patch (the LR is still made from the HR).
    Returns a dict: `hr` (3, P, P) and `lr` (3, P/s, P/s) float32 in [0, 1], `spe` (1, P, P) float32
    (zeros when the image has no map), `index`.
    """

    def __init__(self, images: list[CachedImage], hr_patch: int, scale: int, repeat: int = 1,
                 augment: bool = True, seed: int = 0, real: RealDegradation | None = None,
                 teachers: list[Path] | None = None, teacher_weight: float = 0.0) -> None:
        if not images:
            raise ValueError("no usable training images")
        if hr_patch % scale:
            raise ValueError(f"hr_patch {hr_patch} must be a multiple of the scale {scale}")
        if teachers is not None and len(teachers) != len(images):
            raise ValueError(f"{len(teachers)} teacher images for {len(images)} training images")
        self.images, self.hr_patch, self.scale = images, hr_patch, scale
        self.repeat, self.augment, self.seed, self.real = repeat, augment, seed, real
        self.teachers, self.teacher_weight = teachers, teacher_weight
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images) * self.repeat

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        i = index % len(self.images)
        item = self.images[i]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        hr, lr = item.load()
        s, lp = self.scale, self.hr_patch // self.scale
        h, w = lr.shape[:2]
        if h < lp or w < lp:
            raise ValueError(f"{item.stem}: LR {w}x{h} is smaller than the {lp}-pixel patch")
        y, x = int(rng.integers(0, h - lp + 1)), int(rng.integers(0, w - lp + 1))
        lr_p = lr[y:y + lp, x:x + lp]
        hr_p = hr[y * s:(y + lp) * s, x * s:(x + lp) * s]
        if item.spe_path is not None:
            spe = np.load(item.spe_path, mmap_mode="r")
            spe_p = np.asarray(spe[y * s:(y + lp) * s, x * s:(x + lp) * s], dtype=np.float32)
        else:
            spe_p = np.zeros(hr_p.shape[:2], np.float32)
        arrays = [hr_p, lr_p, spe_p]
        if self.teachers is not None:
            arrays.append(np.load(self.teachers[i], mmap_mode="r")[y * s:(y + lp) * s, x * s:(x + lp) * s])
        flip, rot = (bool(rng.integers(2)), int(rng.integers(4))) if self.augment else (False, 0)
        hr_p, lr_p, spe_p, *teacher_p = augment(arrays, flip, rot)
        if self.real is not None and rng.random() >= self.real.clean_prob:  # else the cached bicubic LR
            lr_p = degrade_real(hr_p, s, self.real, rng)
        target = torch.from_numpy(hr_p).permute(2, 0, 1).float() / 255
        if teacher_p:
            teacher = torch.from_numpy(teacher_p[0]).permute(2, 0, 1).float() / 255
            target = torch.lerp(target, teacher, self.teacher_weight)
        return {
            "hr": target,
            "lr": torch.from_numpy(lr_p).permute(2, 0, 1).float() / 255,
            "spe": torch.from_numpy(spe_p)[None],
            "index": torch.tensor(index),
        }


def model_inputs(batch: dict[str, Tensor], cfg, device: torch.device | str,
                 with_up: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
    """(img_lr, img_lr_up, img_hr) in [-1, 1], with the same conventions as inference
    (`model.inputs.lr_inputs`). `with_up=False` skips the bicubic up(LR) (None), for objectives without it."""
    lr = batch["lr"].to(device, non_blocking=True)
    img_lr, img_lr_up = lr_inputs(lr, cfg, with_up)
    img_hr = batch["hr"].to(device, non_blocking=True) * 2 - 1
    return img_lr, img_lr_up, img_hr


def val_pairs(image_dir: str | Path, cache_dir: str | Path, scale: int, crop: int,
              max_images: int, degradation: str = "bicubic") -> list[tuple[str, Tensor, Tensor]]:
    """Centre crops (at most `crop` HR pixels a side) of validation images: (stem, hr01, lr01), the LR made by the
    named evaluation degradation (`training.degrade.degrade_named`, seeded by the image's position)."""
    out = []
    for item in prepare_images(image_dir, cache_dir, scale)[:max_images]:
        hr, lr = item.load()
        lc = crop // scale
        h, w = lr.shape[:2]
        ch, cw = min(lc, h), min(lc, w)
        y, x = (h - ch) // 2, (w - cw) // 2
        lr_c = np.array(lr[y:y + ch, x:x + cw])
        hr_c = np.array(hr[y * scale:(y + ch) * scale, x * scale:(x + cw) * scale])
        if degradation != "bicubic":
            lr_c = np.round(degrade_named(hr_c / 255, degradation, scale, seed=len(out)) * 255).astype(np.uint8)
        out.append((item.stem, torch.from_numpy(hr_c).permute(2, 0, 1).float() / 255,
                    torch.from_numpy(lr_c).permute(2, 0, 1).float() / 255))
    return out
