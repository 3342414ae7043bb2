"""The degradation that makes LR training/evaluation inputs from HR images.

MATLAB-style antialiased bicubic downscaling (``imresize(hr, 1/scale)``), as in SRDiff / SAM-DiffSR,
computed with the `bicubic-pytorch` package, then quantised to 8 bits like an LR image stored as PNG.
Training (`training.dataset`) and evaluation (`training.evaluate`) both use `make_lr`, so the model is
evaluated on exactly the degradation it was trained for.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def crop_to_multiple(hr: np.ndarray | Tensor, multiple: int) -> np.ndarray | Tensor:
    """Crop an HxW(xC) array / (..., H, W) tensor at the bottom/right to sizes divisible by `multiple`."""
    if isinstance(hr, Tensor):
        h, w = hr.shape[-2:]
        return hr[..., : h - h % multiple, : w - w % multiple]
    h, w = hr.shape[:2]
    return hr[: h - h % multiple, : w - w % multiple]


def make_lr(hr: Tensor, scale: int = 4, quantize: bool = True) -> Tensor:
    """Downscale HR images in [0, 1] ((3,H,W) or (B,3,H,W), H and W divisible by `scale`) by `scale`.

    MATLAB `imresize` bicubic with antialiasing; with `quantize` the result is rounded to 8-bit levels.
    Returns float32 in [0, 1] of size (H/scale, W/scale).
    """
    from bicubic_pytorch import core

    if hr.dim() not in (3, 4):
        raise ValueError(f"expected a (3,H,W) or (B,3,H,W) tensor, got shape {tuple(hr.shape)}")
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not divisible by {scale}: crop_to_multiple first")
    lr = core.imresize(hr.float(), sizes=(h // scale, w // scale))
    lr = lr.clamp(0, 1)
    if quantize:
        lr = torch.round(lr * 255) / 255
    return lr


def make_lr_numpy(hr: np.ndarray, scale: int = 4, quantize: bool = True) -> np.ndarray:
    """`make_lr` for one HxWx3 float array in [0, 1] (returns h x w x 3 float32)."""
    t = torch.from_numpy(np.ascontiguousarray(hr, dtype=np.float32)).permute(2, 0, 1)
    return make_lr(t, scale, quantize).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------------
# Named, fixed degradations for evaluation (`samdiffsr eval --degradation NAME`): each is a pure function of the
# HR image and a seed, so every number of the model card can be reproduced with one command.

EVAL_DEGRADATIONS = ("bicubic", "jpeg90", "jpeg75", "jpeg50", "noise10", "blur", "real")


def degrade_named(hr: np.ndarray, name: str, scale: int = 4, seed: int = 0) -> np.ndarray:
    """LR (h, w, 3) float32 in [0, 1], 8-bit levels, from HR (H, W, 3) in [0, 1] by the named degradation:

    - `bicubic`: `make_lr` (MATLAB antialiased bicubic), the paper's setting;
    - `jpeg90` / `jpeg75` / `jpeg50`: that LR saved as JPEG at the quality (Pillow, 4:2:0) and decoded;
    - `noise10`: that LR plus Gaussian noise of sigma 10/255, independent per channel (seeded);
    - `blur`: HR blurred by a Gaussian of sigma 1.2 (HR pixels, 9x9 kernel), then `make_lr`;
    - `real`: `training.realworld.degrade_real` with its default (Real-ESRGAN) settings, seeded.
    """
    if name not in EVAL_DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; choose from {', '.join(EVAL_DEGRADATIONS)}")
    if name == "real":
        from training.realworld import RealDegradation, degrade_real

        u8 = np.round(np.clip(hr, 0, 1) * 255).astype(np.uint8)
        return degrade_real(u8, scale, RealDegradation(), np.random.default_rng(seed)).astype(np.float32) / 255
    if name == "blur":
        from training.realworld import anisotropic_kernel, filter2d

        t = torch.from_numpy(np.ascontiguousarray(hr, dtype=np.float32)).permute(2, 0, 1)[None]
        hr = filter2d(t, anisotropic_kernel(9, 1.2, 1.2, 0.0))[0].permute(1, 2, 0).numpy()
    lr = make_lr_numpy(hr, scale)
    if name.startswith("jpeg"):
        from training.realworld import jpeg_u8

        u8 = np.round(np.clip(lr, 0, 1) * 255).astype(np.uint8)
        return jpeg_u8(u8, int(name.removeprefix("jpeg"))).astype(np.float32) / 255
    if name == "noise10":
        noise = np.random.default_rng(seed).standard_normal(lr.shape).astype(np.float32) * (10 / 255)
        return (np.round(np.clip(lr + noise, 0, 1) * 255) / 255).astype(np.float32)
    return lr
