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
