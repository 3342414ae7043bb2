"""A request's work outside the model: decoded image -> LR tiles, and final SR tiles -> image.

Both ends are `model.upscale.Upscaler`'s own (`prepare`, `assemble`, `to_image`), so the service and
`samdiffsr upscale` produce the same images; the sampling in between is the batcher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from model.imaging import DecodedImage
from model.tiling import TileGrid
from model.upscale import Upscaler

Shape = tuple[int, int]


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


class Tiles(Protocol):
    """A job's tiles: made on demand, and handed back one by one when sampled (worker thread only)."""

    n_tiles: int
    tile_shape: Shape  # LR (height, width) of every tile

    def inputs(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        """Encoder input (n, 3, h, w) and bicubic up(LR) (n, 3, s*h, s*w) of tiles `idx`, in [-1, 1]."""
        ...

    def put(self, i: int, sr: Tensor) -> None:
        """Tile i's final SR image (3, s*h, s*w) in [-1, 1]."""
        ...

    def result(self) -> Any:
        """What the job's future resolves to, once every tile was put."""
        ...


class TensorTiles:
    """Tiles given as whole tensors; the job resolves to the stacked (N, 3, T, T) SR tiles."""

    def __init__(self, lr_tiles: Tensor, up_tiles: Tensor) -> None:
        if lr_tiles.ndim != 4 or lr_tiles.shape[0] < 1 or lr_tiles.shape[1] != 3:
            raise ValueError(f"lr_tiles must be (N>=1, 3, h, w), got {tuple(lr_tiles.shape)}")
        if up_tiles.shape[0] != lr_tiles.shape[0]:
            raise ValueError("up_tiles must hold one tile per LR tile")
        self.lr, self.up = lr_tiles, up_tiles
        self.n_tiles = int(lr_tiles.shape[0])
        self.tile_shape = (int(lr_tiles.shape[2]), int(lr_tiles.shape[3]))
        self.out: dict[int, Tensor] = {}

    def inputs(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        return self.lr[idx[0]:idx[-1] + 1], self.up[idx[0]:idx[-1] + 1]  # indices are consecutive

    def put(self, i: int, sr: Tensor) -> None:
        self.out[i] = sr

    def result(self) -> Tensor:
        return torch.stack([self.out.pop(i) for i in range(self.n_tiles)])
