"""A request's work outside the model: decoded image -> LR tiles, and final residual tiles -> image.

Only composes model/ functions (`Upscaler.plan`, `lr_inputs`, `extract_tiles`, `res2img`,
`pad_to`, `stitch`, `with_rgb`) in the order `model.upscale.Upscaler.upscale_rgb` uses them, so the service
and `samdiffsr upscale` produce the same images; the sampling in between is the batcher's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.diffusion import res2img
from model.imaging import DecodedImage, with_rgb
from model.tiling import TileGrid, extract_tiles, pad_to, stitch
from model.upscale import Upscaler, lr_inputs


@dataclass
class Prepared:
    image: DecodedImage
    grid: TileGrid
    lr_tiles: Tensor  # (N, 3, t, t) encoder input in [-1, 1]
    up_tiles: Tensor  # (N, 3, t*s, t*s) up(LR) tiles in [-1, 1]


def prepare(upscaler: Upscaler, image: DecodedImage) -> Prepared:
    cfg = upscaler.runtime.config
    grid = upscaler.plan(image.height, image.width)
    img = torch.from_numpy(np.ascontiguousarray(image.rgb)).permute(2, 0, 1).float()
    # Pad first, as Upscaler.upscale_rgb does: up(LR) then sees the same borders, and images smaller
    # than bicubic's reflection padding (e.g. 1x1) work.
    img = pad_to(img, grid.padded_height, grid.padded_width)
    img_lr, img_lr_up = lr_inputs(img[None], cfg)
    return Prepared(image, grid, extract_tiles(img_lr[0], grid), extract_tiles(img_lr_up[0], grid, cfg.scale))


def finish(upscaler: Upscaler, prep: Prepared, x0: Tensor) -> DecodedImage:
    """Final residual tiles (N, 3, T, T) -> the upscaled image (exactly `scale` times the input)."""
    cfg = upscaler.runtime.config
    tiles = res2img(x0.to(prep.up_tiles), prep.up_tiles, cfg.res_rescale, cfg.clip_input)
    hr = stitch(tiles, prep.grid)
    rgb = ((hr.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    if prep.image.grayscale:
        rgb = np.repeat(rgb.mean(axis=2, keepdims=True), 3, axis=2)
    return with_rgb(prep.image, rgb, cfg.scale)
