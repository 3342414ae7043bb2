"""Split an LR image into equal, overlapping tiles and blend their upscaled versions back.

Every tile has the same LR size, so tiles of any images batch together. With `fit=True` a dimension
of the image of at most half a tile gets tiles only as large as it (rounded up to the network's size
multiple), longer along the other axis for the same area: a 1x20000 strip is 10 tiles of 2x2048, not
358 of 64x64. Images smaller than a tile, or of sizes the network cannot take, are padded
(reflection where possible); the output
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
    tile_w: int = 0  # LR tile width when it differs from `tile` (the height)

    @property
    def tile_shape(self) -> tuple[int, int]:
        """LR (height, width) of every tile."""
        return self.tile, self.tile_w or self.tile

    @property
    def padded_height(self) -> int:
        return max(self.height, self.tile)

    @property
    def padded_width(self) -> int:
        return max(self.width, self.tile_shape[1])

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


def _fitted(height: int, width: int, tile: int, multiple: int) -> tuple[int, int]:
    """Tile (height, width): a side of at most half a tile shrinks to the image, the other grows to keep
    the area of a square tile (never beyond the image)."""
    def up(n: int) -> int:  # at least 4: bicubic up(LR) needs 3 pixels
        return -(-max(n, 4) // multiple) * multiple

    th, tw = (up(n) if up(n) <= tile // 2 else tile for n in (height, width))
    if th < tile and tw == tile:
        tw = max(tile, min(up(width), tile * tile // th // multiple * multiple))
    elif tw < tile and th == tile:
        th = max(tile, min(up(height), tile * tile // tw // multiple * multiple))
    return th, tw


def _snug(size: int, tile: int, overlap: int, multiple: int, grow: float) -> int:
    """The smallest tile side, at most `grow` x `tile`, that covers `size` with the fewest tiles (so that the
    last tile is not shifted back over its neighbour: less overlap computed twice)."""
    longest = max(tile, int(tile * grow) // multiple * multiple)
    n = -(-(size - overlap) // (longest - overlap))
    return min(longest, -(-(-(-(size - overlap) // n) + overlap) // multiple) * multiple)


def plan_tiles(height: int, width: int, tile: int = 64, overlap: int = 8, scale: int = 4,
               multiple: int = 2, fit: bool = False, grow: float = 1.0) -> TileGrid:
    """Plan tiles of `tile` x `tile` LR pixels covering a `height` x `width` LR image (`fit`: see above).

    `grow` > 1 sizes the tiles of each image to it ("snug"): a side longer than a tile gets tiles of up to
    `grow` x `tile` that cover it with the fewest tiles and the least overlap (a 128-px side: 2 tiles of 68,
    not 3 of 64). Tiles of different images then differ in size (they batch together only when equal)."""
    if height < 1 or width < 1:
        raise ValueError("image must be at least 1x1")
    if tile % multiple:
        raise ValueError(f"tile size must be a multiple of {multiple}")
    if not 0 <= overlap < tile // 2 + 1 or overlap >= tile:
        raise ValueError("overlap must be in [0, tile/2]")
    th, tw = _fitted(height, width, tile, multiple) if fit else (tile, tile)
    if grow > 1:
        th = _snug(height, tile, overlap, multiple, grow) if th == tile and height > tile else th
        tw = _snug(width, tile, overlap, multiple, grow) if tw == tile and width > tile else tw
    return TileGrid(height, width, th, overlap, scale, _offsets(height, th, overlap), _offsets(width, tw, overlap),
                    0 if tw == th else tw)


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
    th, tw = (n * factor for n in grid.tile_shape)
    return torch.stack([img[:, y * factor:y * factor + th, x * factor:x * factor + tw] for y, x in grid.origins])


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


def blend_ramps(grid: TileGrid) -> tuple[list[Tensor], list[Tensor]]:
    """1-D HR weights of each tile row and column; tile (r, c) weighs `wy[r][:, None] * wx[c][None, :]`."""
    s, (th, tw) = grid.scale, grid.tile_shape
    wy = [_ramp(th * s, a * s, b * s) for a, b in _overlaps(grid.ys, th)]
    wx = [_ramp(tw * s, a * s, b * s) for a, b in _overlaps(grid.xs, tw)]
    return wy, wx


def stitch(hr_tiles: Tensor, grid: TileGrid) -> Tensor:
    """Blend (N, C, tile*s, tile*s) upscaled tiles into one (C, height*s, width*s) image.

    The grid is a product of tile rows and columns, so the sum of the weights at a pixel is the product of the
    row ramps' sum and the column ramps' sum: it is summed in 1-D, and each tile is weighed in place."""
    if hr_tiles.shape[0] != len(grid):
        raise ValueError(f"expected {len(grid)} tiles, got {hr_tiles.shape[0]}")
    s, (th, tw) = grid.scale, (n * grid.scale for n in grid.tile_shape)
    dev, dtype = hr_tiles.device, hr_tiles.dtype
    wy, wx = ([w.to(dev, dtype) for w in ramps] for ramps in blend_ramps(grid))
    acc = torch.zeros(hr_tiles.shape[1], grid.padded_height * s, grid.padded_width * s, dtype=dtype, device=dev)
    norm_y = torch.zeros(acc.shape[1], dtype=dtype, device=dev)
    norm_x = torch.zeros(acc.shape[2], dtype=dtype, device=dev)
    for r, y in enumerate(grid.ys):
        norm_y[y * s:y * s + th] += wy[r]
    for c, x in enumerate(grid.xs):
        norm_x[x * s:x * s + tw] += wx[c]
    cols = len(grid.xs)
    for i, (tile, (y, x)) in enumerate(zip(hr_tiles, grid.origins, strict=True)):
        r, c = divmod(i, cols)
        acc[:, y * s:y * s + th, x * s:x * s + tw].addcmul_(tile, wy[r][:, None] * wx[c][None, :])
    hr = acc[:, :grid.height * s, :grid.width * s]
    return hr.div_(norm_y[:grid.height * s, None] * norm_x[None, :grid.width * s])
