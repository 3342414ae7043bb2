"""Split an LR image into equal, overlapping tiles and blend their upscaled versions back.

Every tile has the same LR size, so tiles of any images batch together. Images smaller than a
tile, or of sizes the network cannot take, are padded (reflection where possible); the output
is cropped back to exactly `scale` times the input. Overlaps are blended with linear ramps, so
there are no visible seams.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class TileGrid:
    height: int  # LR size of the image
    width: int
    tile: int  # LR tile size
    overlap: int  # LR overlap between neighbouring tiles
    scale: int
    ys: tuple[int, ...]  # LR top offsets of the tile rows (in the padded image)
    xs: tuple[int, ...]  # LR left offsets of the tile columns

    @property
    def padded_height(self) -> int:
        return max(self.height, self.tile)

    @property
    def padded_width(self) -> int:
        return max(self.width, self.tile)

    @property
    def origins(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)


def _offsets(size: int, tile: int, overlap: int) -> tuple[int, ...]:
    if size <= tile:
        return (0,)
    stride = tile - overlap
    n = -(-(size - overlap) // stride)  # ceil
    offs = [min(i * stride, size - tile) for i in range(n)]
    return tuple(dict.fromkeys(offs))


def plan_tiles(height: int, width: int, tile: int = 64, overlap: int = 8, scale: int = 4,
               multiple: int = 2) -> TileGrid:
    """Plan tiles of `tile` x `tile` LR pixels covering a `height` x `width` LR image."""
    if height < 1 or width < 1:
        raise ValueError("image must be at least 1x1")
    if tile % multiple:
        raise ValueError(f"tile size must be a multiple of {multiple}")
    if not 0 <= overlap < tile // 2 + 1 or overlap >= tile:
        raise ValueError("overlap must be in [0, tile/2]")
    return TileGrid(height, width, tile, overlap, scale, _offsets(height, tile, overlap),
                    _offsets(width, tile, overlap))


def pad_to(img: Tensor, height: int, width: int) -> Tensor:
    """Pad a (..., C, H, W) image at the bottom/right to at least height x width."""
    ph, pw = max(0, height - img.shape[-2]), max(0, width - img.shape[-1])
    if ph == 0 and pw == 0:
        return img
    squeeze = img.ndim == 3
    x = img[None] if squeeze else img
    # Reflection needs pad < size; fall back to replication for tiny images.
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x[0] if squeeze else x


def extract_tiles(img: Tensor, grid: TileGrid, factor: int = 1) -> Tensor:
    """Tiles of a (C, H, W) image at `factor` times LR resolution (1: the LR image, scale: its up(LR))."""
    img = pad_to(img, grid.padded_height * factor, grid.padded_width * factor)
    t = grid.tile * factor
    return torch.stack([img[:, y * factor:y * factor + t, x * factor:x * factor + t] for y, x in grid.origins])


def _ramp(n: int, before: int, after: int) -> Tensor:
    """1-D weights: rising over the first `before` samples, falling over the last `after`."""
    w = torch.ones(n)
    if before > 0:
        w[:before] = torch.minimum(w[:before], (torch.arange(before) + 0.5) / before)
    if after > 0:
        w[n - after:] = torch.minimum(w[n - after:], ((torch.arange(after) + 0.5) / after).flip(0))
    return w


def _overlaps(offsets: tuple[int, ...], tile: int) -> list[tuple[int, int]]:
    """For each tile along one axis: LR overlap with the previous and with the next tile."""
    shared = [tile - (b - a) for a, b in pairwise(offsets)]
    return [(shared[i - 1] if i > 0 else 0, shared[i] if i < len(shared) else 0) for i in range(len(offsets))]


def blend_weights(grid: TileGrid) -> list[Tensor]:
    """Per-tile HR weight maps: complementary linear ramps across each overlap, flat elsewhere."""
    s, t = grid.scale, grid.tile * grid.scale
    wy = [_ramp(t, a * s, b * s) for a, b in _overlaps(grid.ys, grid.tile)]
    wx = [_ramp(t, a * s, b * s) for a, b in _overlaps(grid.xs, grid.tile)]
    return [wy[i][:, None] * wx[j][None, :] for i in range(len(grid.ys)) for j in range(len(grid.xs))]


def stitch(hr_tiles: Tensor, grid: TileGrid) -> Tensor:
    """Blend (N, C, tile*s, tile*s) upscaled tiles into one (C, height*s, width*s) image."""
    if hr_tiles.shape[0] != len(grid):
        raise ValueError(f"expected {len(grid)} tiles, got {hr_tiles.shape[0]}")
    s, t = grid.scale, grid.tile * grid.scale
    c = hr_tiles.shape[1]
    acc = torch.zeros(c, grid.padded_height * s, grid.padded_width * s, dtype=hr_tiles.dtype,
                      device=hr_tiles.device)
    norm = torch.zeros(1, *acc.shape[1:], dtype=hr_tiles.dtype, device=hr_tiles.device)
    for tile, w, (y, x) in zip(hr_tiles, blend_weights(grid), grid.origins, strict=True):
        w = w.to(acc)
        acc[:, y * s:y * s + t, x * s:x * s + t] += tile * w
        norm[:, y * s:y * s + t, x * s:x * s + t] += w
    return (acc / norm)[:, :grid.height * s, :grid.width * s]
