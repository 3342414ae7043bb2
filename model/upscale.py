"""Upscale whole images of any size: model inputs, tiles, batched sampling, blending."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from bicubic_pytorch import core as bicubic
from torch import Tensor

from model.config import ModelConfig
from model.diffusion import res2img
from model.imaging import DecodedImage, with_rgb
from model.runtime import Runtime
from model.sampler import SamplerName, Track, new_track, step_tracks
from model.tiling import TileGrid, extract_tiles, pad_to, plan_tiles, stitch

DEFAULT_STEPS = 20


def lr_inputs(rgb01: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """(B, 3, h, w) RGB in [0, 1] -> (img_lr, img_lr_up), both in [-1, 1], as the model was trained.

    up(LR) is MATLAB-style bicubic on LR * 255 / `cfg.lr_up_divisor` (256 for original checkpoints).
    """
    img_lr = rgb01 * 2 - 1
    up = bicubic.imresize(rgb01 * (255.0 / cfg.lr_up_divisor), scale=cfg.scale)
    return img_lr, up * 2 - 1


def default_steps(cfg: ModelConfig) -> int:
    return int(cfg.extras.get("default_steps", DEFAULT_STEPS))


def default_sampler(cfg: ModelConfig) -> SamplerName:
    return cfg.extras.get("default_sampler", "ddim")


class Upscaler:
    """Upscale images tile by tile; tiles of one image are sampled together in batches."""

    def __init__(self, runtime: Runtime, tile: int = 64, overlap: int = 8, max_batch: int = 16) -> None:
        cfg = runtime.config
        plan_tiles(1, 1, tile, overlap, cfg.scale, cfg.lr_multiple)  # validates tile and overlap
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.runtime = runtime
        self.tile, self.overlap, self.max_batch = tile, overlap, max_batch

    def plan(self, height: int, width: int) -> TileGrid:
        cfg = self.runtime.config
        return plan_tiles(height, width, self.tile, self.overlap, cfg.scale, cfg.lr_multiple)

    def prepare(self, rgb: np.ndarray) -> tuple[TileGrid, Tensor, Tensor]:
        """(H, W, 3) RGB in [0, 1] -> the tile grid, encoder-input tiles and up(LR) tiles (both in [-1, 1])."""
        cfg = self.runtime.config
        grid = self.plan(*rgb.shape[:2])
        img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()
        # Pad first, so that up(LR) sees the same borders whatever the tiling, and images smaller than
        # bicubic's reflection padding (e.g. 1x1) work.
        img = pad_to(img, grid.padded_height, grid.padded_width)
        img_lr, img_lr_up = lr_inputs(img[None], cfg)
        return grid, extract_tiles(img_lr[0], grid), extract_tiles(img_lr_up[0], grid, cfg.scale)

    def assemble(self, grid: TileGrid, up_tiles: Tensor, x0: Tensor) -> np.ndarray:
        """Final residual tiles (N, 3, T, T) -> (scale*H, scale*W, 3) RGB in [0, 1]."""
        cfg = self.runtime.config
        tiles = res2img(x0.to(up_tiles), up_tiles, cfg.res_rescale, cfg.clip_input)
        hr = stitch(tiles, grid)
        return ((hr.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()

    def to_image(self, image: DecodedImage, rgb: np.ndarray) -> DecodedImage:
        """The upscaled RGB of `image` as a decoded image of its kind (gray stays gray, alpha upscaled)."""
        if image.grayscale:
            rgb = np.repeat(rgb.mean(axis=2, keepdims=True), 3, axis=2)
        return with_rgb(image, rgb, self.runtime.config.scale)

    def upscale_rgb(
        self, rgb: np.ndarray, steps: int | None = None, sampler: SamplerName | None = None, eta: float = 0.0,
        seed: int = 0, on_step: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """(H, W, 3) float RGB in [0, 1] -> (scale*H, scale*W, 3)."""
        rt, cfg = self.runtime, self.runtime.config
        steps = steps or default_steps(cfg)
        sampler = sampler or default_sampler(cfg)
        grid, lr_tiles, up_tiles = self.prepare(rgb)
        x0 = torch.empty_like(up_tiles)
        for start in range(0, len(grid), self.max_batch):
            idx = range(start, min(start + self.max_batch, len(grid)))
            cond = rt.encode(lr_tiles[idx.start:idx.stop])
            tracks = [new_track(cond[j], cfg.timesteps, steps, sampler, eta, seed, i)
                      for j, i in enumerate(idx)]
            self._run(tracks, on_step)
            x0[idx.start:idx.stop] = torch.stack([tr.x for tr in tracks]).cpu()
        return self.assemble(grid, up_tiles, x0)

    def _run(self, tracks: list[Track], on_step: Callable[[int], None] | None) -> None:
        active = tracks
        while active:
            step_tracks(self.runtime.denoise, self.runtime.schedule, active)
            if on_step is not None:
                on_step(len(active))
            active = [tr for tr in active if not tr.done]

    def upscale(self, image: DecodedImage, steps: int | None = None, sampler: SamplerName | None = None,
                eta: float = 0.0, seed: int = 0, on_step: Callable[[int], None] | None = None) -> DecodedImage:
        """Upscale a decoded image to exactly `scale` times its size (alpha upscaled separately)."""
        return self.to_image(image, self.upscale_rgb(image.rgb, steps, sampler, eta, seed, on_step))
