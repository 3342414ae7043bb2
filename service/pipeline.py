"""A request's work outside the model: decoded image -> tiles on demand, finished tiles -> output canvas.

`ImageTiles` makes a tile's encoder input and bicubic up(LR) only when the batcher admits it, and
blends each finished SR tile straight into an 8-bit (or 16-bit) `Canvas`, a band of rows at a time, so a
request holds its decoded image, the tiles in the active set, a float band a few tiles high and the
canvas, never a float copy of every tile. The values are those of `model.upscale.Upscaler` (`prepare`,
`assemble`, `to_image`): the service and `samdiffsr upscale` produce the same images.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from model.imaging import DecodedImage, encode_pixels, quantize, resize_alpha
from model.inputs import lr_inputs, uses_up
from model.tiling import TileGrid, blend_ramps, pad_to
from model.upscale import Upscaler, ensemble_flips, flip

Shape = tuple[int, int]
MARGIN = 4  # LR context around a tile for its up(LR): bicubic reaches 2 pixels, so the tile is exact


class Tiles(Protocol):
    """A job's tiles: made on demand, and handed back one by one when sampled (worker thread only)."""

    n_tiles: int
    tile_shape: Shape  # LR (height, width) of every tile

    def inputs(self, idx: list[int]) -> tuple[Tensor, Tensor | None]:
        """Encoder input (n, 3, h, w) and bicubic up(LR) (n, 3, s*h, s*w) of tiles `idx`, in [-1, 1];
        up(LR) is None for models that do not use it (`model.inputs.uses_up`)."""
        ...

    def put(self, i: int, sr: Tensor) -> None:
        """Tile i's final SR image (3, s*h, s*w) in [-1, 1], on the model's device."""
        ...

    def result(self) -> Any:
        """What the job's future resolves to, once every tile was put."""
        ...


class TensorTiles:
    """Tiles given as whole tensors; the job resolves to the stacked (N, 3, T, T) SR tiles."""

    def __init__(self, lr_tiles: Tensor, up_tiles: Tensor | None) -> None:
        if lr_tiles.ndim != 4 or lr_tiles.shape[0] < 1 or lr_tiles.shape[1] != 3:
            raise ValueError(f"lr_tiles must be (N>=1, 3, h, w), got {tuple(lr_tiles.shape)}")
        if up_tiles is not None and up_tiles.shape[0] != lr_tiles.shape[0]:
            raise ValueError("up_tiles must hold one tile per LR tile")
        self.lr, self.up = lr_tiles, up_tiles
        self.n_tiles = int(lr_tiles.shape[0])
        self.tile_shape = (int(lr_tiles.shape[2]), int(lr_tiles.shape[3]))
        self.out: dict[int, Tensor] = {}

    def inputs(self, idx: list[int]) -> tuple[Tensor, Tensor | None]:
        i, j = idx[0], idx[-1] + 1  # indices are consecutive
        return self.lr[i:j], None if self.up is None else self.up[i:j]

    def put(self, i: int, sr: Tensor) -> None:
        self.out[i] = sr.cpu()

    def result(self) -> Tensor:
        return torch.stack([self.out.pop(i) for i in range(self.n_tiles)])


class Canvas:
    """The output image, filled as tiles finish: float sums only for the rows some tile still touches.

    The sums live where the tiles come from (on a GPU, blending a 256-px tile on the CPU took longer than its
    denoiser step); finished rows are quantised there and copied out as bytes."""

    def __init__(self, grid: TileGrid, grayscale: bool = False, depth: int = 8) -> None:
        self.grid, self.grayscale, self.depth = grid, grayscale, depth
        s = grid.scale
        self.height, self.width = grid.height * s, grid.width * s
        shape = (self.height, self.width) if grayscale else (self.height, self.width, 3)
        self.pixels = np.zeros(shape, dtype=np.uint16 if depth == 16 else np.uint8)
        self.wy, self.wx = blend_ramps(grid)
        self._cols = len(grid.xs)
        self._left = [self._cols] * len(grid.ys)  # tiles not yet put, per tile row
        self._row = 0  # first tile row with a tile not yet put
        self._top = 0  # HR row where the float band starts
        self._acc = torch.zeros(3, 0, grid.padded_width * s)
        self._norm = torch.zeros(1, 0, grid.padded_width * s)

    @property
    def complete(self) -> bool:
        return self._row == len(self.grid.ys)

    @property
    def band_bytes(self) -> int:
        return (self._acc.numel() + self._norm.numel()) * 4

    def add(self, i: int, sr: Tensor) -> None:
        """Blend finished tile i ((3, s*h, s*w) in [-1, 1]) in; rows no other tile touches become pixels."""
        g, s = self.grid, self.grid.scale
        r, c = divmod(i, self._cols)
        y, x = g.ys[r] * s - self._top, g.xs[c] * s
        h, w = sr.shape[-2:]
        if self._acc.device != sr.device:  # the first tile: sums and weights move to its device
            self._acc, self._norm = self._acc.to(sr.device), self._norm.to(sr.device)
            self.wy, self.wx = [w.to(sr.device) for w in self.wy], [w.to(sr.device) for w in self.wx]
        if y + h > self._acc.shape[1]:
            grow = y + h - self._acc.shape[1]
            self._acc = torch.cat([self._acc, self._acc.new_zeros(3, grow, self._acc.shape[2])], 1)
            self._norm = torch.cat([self._norm, self._norm.new_zeros(1, grow, self._norm.shape[2])], 1)
        wgt = self.wy[r][:, None] * self.wx[c][None, :]
        self._acc[:, y:y + h, x:x + w] += sr.float() * wgt
        self._norm[:, y:y + h, x:x + w] += wgt
        self._left[r] -= 1
        while self._row < len(g.ys) and self._left[self._row] == 0:
            self._row += 1
        final = g.ys[self._row] * s if self._row < len(g.ys) else g.padded_height * s
        if final > self._top:
            self._flush(final - self._top)

    def _flush(self, n: int) -> None:
        rows = min(n, self.height - self._top)
        if rows > 0:
            hr = (self._acc[:, :rows, :self.width] / self._norm[:, :rows, :self.width]).clamp_(-1, 1).add_(1).div_(2)
            if self.grayscale or self.depth != 8:
                rgb = hr.permute(1, 2, 0).cpu().numpy()
                value = rgb.mean(axis=2) if self.grayscale else rgb
                self.pixels[self._top:self._top + rows] = quantize(value, self.depth)
            else:  # `quantize`'s float ops, in place where the sums are: the same bytes, copied out as bytes
                q = hr.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
                self.pixels[self._top:self._top + rows] = q.permute(1, 2, 0).cpu().numpy()
        self._acc, self._norm = self._acc[:, n:].clone(), self._norm[:, n:].clone()
        self._top += n


class ImageTiles:
    """The tiles of one decoded image, made on demand and blended into its canvas (see `Tiles`)."""

    def __init__(self, upscaler: Upscaler, image: DecodedImage, grid: TileGrid, fmt: str = "png") -> None:
        self.cfg = upscaler.runtime.config
        self.with_up = uses_up(self.cfg)
        self.grid = grid
        self.n_tiles, self.tile_shape = len(grid), grid.tile_shape
        img = torch.from_numpy(np.ascontiguousarray(image.rgb)).permute(2, 0, 1).float()  # a view
        self.lr = pad_to(img, grid.padded_height, grid.padded_width)
        sixteen = image.bit_depth == 16 and image.grayscale and image.alpha is None and fmt == "png"
        self.canvas = Canvas(grid, image.grayscale, 16 if sixteen else 8)

    def inputs(self, idx: list[int]) -> tuple[Tensor, Tensor | None]:
        pairs = [self._tile(i) for i in idx]
        lr = torch.stack([p[0] for p in pairs])
        return lr, torch.stack([p[1] for p in pairs]) if self.with_up else None

    def _tile(self, i: int) -> tuple[Tensor, Tensor | None]:
        g, s = self.grid, self.cfg.scale
        (th, tw), (r, c) = g.tile_shape, divmod(i, len(g.xs))
        y, x = g.ys[r], g.xs[c]
        y0, x0 = max(0, y - MARGIN), max(0, x - MARGIN)
        crop = self.lr[:, y0:min(self.lr.shape[1], y + th + MARGIN), x0:min(self.lr.shape[2], x + tw + MARGIN)]
        lr, up = lr_inputs(crop[None], self.cfg, self.with_up)
        dy, dx = y - y0, x - x0
        lr_tile = lr[0, :, dy:dy + th, dx:dx + tw].clone()
        return lr_tile, None if up is None else up[0, :, dy * s:(dy + th) * s, dx * s:(dx + tw) * s].clone()

    def put(self, i: int, sr: Tensor) -> None:
        self.canvas.add(i, sr)

    def result(self) -> Canvas:
        if not self.canvas.complete:
            raise RuntimeError("the canvas is missing tiles")
        return self.canvas


class EnsembleTiles:
    """A self-ensemble's tiles (`model.upscale.ensemble_flips`): member m's tile j is tile m * n + j, so its
    noise is the CLI's; the result is the members' canvases flipped back and averaged, in the first one."""

    def __init__(self, members: list[ImageTiles], flips: tuple[tuple[bool, bool], ...]) -> None:
        self.members, self.flips = members, flips
        self.per_member = members[0].n_tiles  # flips keep the grid: every member has the same tiles
        self.n_tiles, self.tile_shape = self.per_member * len(members), members[0].tile_shape

    def inputs(self, idx: list[int]) -> tuple[Tensor, Tensor | None]:
        parts = [self.members[m].inputs([i % self.per_member for i in group])
                 for m, group in itertools.groupby(idx, key=lambda i: i // self.per_member)]
        ups = [p[1] for p in parts]
        return torch.cat([p[0] for p in parts]), None if ups[0] is None else torch.cat(ups)  # type: ignore[arg-type]

    def put(self, i: int, sr: Tensor) -> None:
        self.members[i // self.per_member].put(i % self.per_member, sr)

    def result(self) -> Canvas:
        canvases = [m.result() for m in self.members]
        total = sum(flip(c.pixels, f).astype(np.float32) for c, f in zip(canvases, self.flips, strict=True))
        first = canvases[0]
        first.pixels = np.round(total / len(canvases)).astype(first.pixels.dtype)
        return first


@dataclass
class Prepared:
    """A decoded image and its tile grid; `tiles` makes its tiles on demand."""

    image: DecodedImage
    grid: TileGrid
    upscaler: Upscaler = field(repr=False)

    def tiles(self, fmt: str = "png", ensemble: int = 1) -> ImageTiles | EnsembleTiles:
        """The image's tiles, or with `ensemble` > 1 those of the image and of its flips."""
        if ensemble == 1:
            return ImageTiles(self.upscaler, self.image, self.grid, fmt)
        flips = ensemble_flips(ensemble)
        members = [ImageTiles(self.upscaler, replace(self.image, rgb=flip(self.image.rgb, f)), self.grid, fmt)
                   for f in flips]
        return EnsembleTiles(members, flips)

    @property
    def lr_tiles(self) -> Tensor:
        """All encoder-input tiles at once (N, 3, h, w) in [-1, 1] (memory grows with the image)."""
        return self.upscaler.prepare(self.image.rgb)[1]

    @property
    def up_tiles(self) -> Tensor:
        """All bicubic up(LR) tiles at once (N, 3, s*h, s*w) in [-1, 1] (memory grows with the image)."""
        up = self.upscaler.prepare(self.image.rgb, with_up=True)[2]
        assert up is not None
        return up


def prepare(upscaler: Upscaler, image: DecodedImage) -> Prepared:
    return Prepared(image, upscaler.plan(image.height, image.width), upscaler)


def finish(upscaler: Upscaler, prep: Prepared, sr_tiles: Tensor) -> DecodedImage:
    """Final SR tiles (N, 3, T, T) in [-1, 1] -> the upscaled image (exactly `scale` times the input)."""
    return upscaler.to_image(prep.image, upscaler.assemble(prep.grid, sr_tiles))


def encode_canvas(canvas: Canvas, image: DecodedImage, fmt: str = "png", quality: int = 95) -> bytes:
    """The finished canvas of `image` as PNG, JPEG or WebP bytes; alpha (upscaled) kept in PNG and WebP."""
    pix = canvas.pixels  # (H, W) gray, 8- or 16-bit, or (H, W, 3) RGB
    if image.alpha is not None and fmt != "jpeg":
        alpha = quantize(resize_alpha(image.alpha, canvas.grid.scale), 8)
        pix = np.dstack((pix, alpha))  # gray + alpha (the canvas is 8-bit where there is alpha) or RGBA
    return encode_pixels(pix, fmt, quality)
