"""A request's work outside the model: decoded image -> LR tiles, and final SR tiles -> image.

Both ends are `model.upscale.Upscaler`'s own (`prepare`, `assemble`, `to_image`), so the service and
`samdiffsr upscale` produce the same images; the sampling in between is the batcher's.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from model.imaging import DecodedImage
from model.tiling import TileGrid
from model.upscale import Upscaler


@dataclass
class Prepared:
    image: DecodedImage
    grid: TileGrid
    lr_tiles: Tensor  # (N, 3, t, t) encoder input in [-1, 1]
    up_tiles: Tensor  # (N, 3, t*s, t*s) up(LR) tiles in [-1, 1]


def prepare(upscaler: Upscaler, image: DecodedImage) -> Prepared:
    return Prepared(image, *upscaler.prepare(image.rgb))


def finish(upscaler: Upscaler, prep: Prepared, sr_tiles: Tensor) -> DecodedImage:
    """Final SR tiles (N, 3, T, T) in [-1, 1] -> the upscaled image (exactly `scale` times the input)."""
    return upscaler.to_image(prep.image, upscaler.assemble(prep.grid, sr_tiles))
