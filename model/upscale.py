"""Upscale images of any size: the one path from an LR image to its SR image (tiled or whole).

The CLI, the service (whose batcher runs the sampling between `prepare` and `assemble`), evaluation
and training validation all go through `Upscaler`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from model.config import ModelConfig
from model.imaging import DecodedImage, with_rgb
from model.inputs import lr_inputs, uses_up
from model.runtime import Runtime
from model.sampler import SamplerName, sample, start_tracks, track_images
from model.tiling import TileGrid, extract_tiles, pad_to, plan_tiles, stitch

DEFAULT_STEPS = 20
DEFAULT_TILE = 64
# Self-ensemble members: (vertical, horizontal) flips. The first n are used for `ensemble=n`; flips keep every
# tile's shape, so the members of an image share its tile grid (and, in the service, calls).
FLIPS: tuple[tuple[bool, bool], ...] = ((False, False), (False, True), (True, False), (True, True))
ENSEMBLES = (1, 2, 4)


def default_steps(cfg: ModelConfig) -> int:
    return int(cfg.extras.get("default_steps", DEFAULT_STEPS))


def default_tile(cfg: ModelConfig) -> int:
    """The LR tile size the model is served with unless told otherwise: its `extras['default_tile']`, else 64.
    A model whose activations per LR pixel are few (an LR-space denoiser) takes larger tiles: less overlap."""
    return int(cfg.extras.get("default_tile", DEFAULT_TILE))


def sized_for(cfg: ModelConfig) -> str | None:
    """The device type the model was sized for (`extras['device']`: `cpu` or `cuda`), None where it names none.
    A service's `auto` default prefers a model sized for its own device (service/registry.py)."""
    device = cfg.extras.get("device")
    return None if device is None else str(device)


def default_sampler(cfg: ModelConfig) -> SamplerName:
    return cfg.extras.get("default_sampler", "ddim")


def ensemble_flips(n: int) -> tuple[tuple[bool, bool], ...]:
    """The flips of an `n`-member self-ensemble (1: the image alone, 2: and its mirror, 4: all four flips)."""
    if n not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {', '.join(map(str, ENSEMBLES))}, got {n}")
    return FLIPS[:n]


def flip(a: np.ndarray, flips: tuple[bool, bool]) -> np.ndarray:
    """An (H, W, ...) array flipped vertically and/or horizontally (a view; each flip is its own inverse)."""
    vertical, horizontal = flips
    return a[::-1 if vertical else 1, ::-1 if horizontal else 1]


class Upscaler:
    """Upscale images tile by tile; tiles of one image are sampled together in batches.

    `tile=0` samples each image whole (one tile, padded to a square of the model's size multiple).
    `fit=True` gives thin or small images tiles that fit them, `grow` > 1 tiles sized to each image
    (`model.tiling.plan_tiles`)."""

    def __init__(self, runtime: Runtime, tile: int = 64, overlap: int = 8, max_batch: int = 16,
                 fit: bool = False, grow: float = 1.0) -> None:
        cfg = runtime.config
        if tile:
            plan_tiles(1, 1, tile, overlap, cfg.scale, cfg.lr_multiple)  # validates tile and overlap
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.runtime = runtime
        self.tile, self.overlap, self.max_batch, self.fit, self.grow = tile, overlap, max_batch, fit, grow

    def plan(self, height: int, width: int) -> TileGrid:
        cfg = self.runtime.config
        if not self.tile:
            m = cfg.lr_multiple
            return plan_tiles(height, width, -(-max(height, width) // m) * m, 0, cfg.scale, m)
        return plan_tiles(height, width, self.tile, self.overlap, cfg.scale, cfg.lr_multiple, self.fit, self.grow)

    def prepare(self, rgb: np.ndarray, with_up: bool | None = None) -> tuple[TileGrid, Tensor, Tensor | None]:
        """(H, W, 3) RGB in [0, 1] -> the tile grid, encoder-input tiles and up(LR) tiles (both in [-1, 1]).

        up(LR) is None unless sampling uses it (`model.inputs.uses_up`) or `with_up` asks for it."""
        cfg = self.runtime.config
        grid = self.plan(*rgb.shape[:2])
        img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()
        # Pad first, so that up(LR) sees the same borders whatever the tiling, and images smaller than
        # bicubic's reflection padding (e.g. 1x1) work.
        img = pad_to(img, grid.padded_height, grid.padded_width)
        img_lr, img_lr_up = lr_inputs(img[None], cfg, uses_up(cfg) if with_up is None else with_up)
        up_tiles = None if img_lr_up is None else extract_tiles(img_lr_up[0], grid, cfg.scale)
        return grid, extract_tiles(img_lr[0], grid), up_tiles

    def assemble(self, grid: TileGrid, sr_tiles: Tensor) -> np.ndarray:
        """SR tiles (N, 3, T, T) in [-1, 1] (`model.sampler.track_images`), on any device -> (scale*H, scale*W, 3)
        RGB in [0, 1] on the CPU."""
        hr = stitch(sr_tiles.float(), grid).clamp_(-1, 1).add_(1).div_(2)
        return hr.permute(1, 2, 0).contiguous().cpu().numpy()  # (H, W, 3) in one copy, as numpy wants it

    def to_image(self, image: DecodedImage, rgb: np.ndarray) -> DecodedImage:
        """The upscaled RGB of `image` as a decoded image of its kind (gray stays gray, alpha upscaled)."""
        if image.grayscale:
            rgb = np.repeat(rgb.mean(axis=2, keepdims=True), 3, axis=2)
        return with_rgb(image, rgb, self.runtime.config.scale)

    def upscale_rgb(
        self, rgb: np.ndarray, steps: int | None = None, sampler: SamplerName | None = None, eta: float = 0.0,
        seed: int = 0, on_step: Callable[[int], None] | None = None, ensemble: int = 1,
        on_tiles: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """(H, W, 3) float RGB in [0, 1] -> (scale*H, scale*W, 3). `steps=0` is the encoder's own x4 output.

        `ensemble` > 1 upscales the image's flips too (`ensemble_flips`) and averages them flipped back: about
        `ensemble` times the work for a higher PSNR. Member m's tile j draws its noise as tile m * n_tiles + j,
        as in the service. `on_step(n)` follows each denoiser call of n tiles, `on_tiles(n)` each batch of n tiles
        finished (every member's count)."""
        steps = default_steps(self.runtime.config) if steps is None else steps
        sampler = sampler or default_sampler(self.runtime.config)
        members = []
        for m, f in enumerate(ensemble_flips(ensemble)):
            one = self._upscale_one(np.ascontiguousarray(flip(rgb, f)), steps, sampler, eta, seed, on_step, m,
                                    on_tiles)
            members.append(flip(one, f))
        return members[0] if ensemble == 1 else np.mean(members, axis=0, dtype=np.float32)

    def _upscale_one(self, rgb: np.ndarray, steps: int, sampler: SamplerName, eta: float, seed: int,
                     on_step: Callable[[int], None] | None, member: int,
                     on_tiles: Callable[[int], None] | None = None) -> np.ndarray:
        rt, cfg = self.runtime, self.runtime.config
        grid, lr_tiles, up_tiles = self.prepare(rgb)
        out = []
        for start in range(0, len(grid), self.max_batch):
            idx = range(start, min(start + self.max_batch, len(grid)))
            if steps == 0:  # the encoder's image is the answer: no condition, no track
                out.append(rt.encode_image(lr_tiles[idx.start:idx.stop]))
            else:
                cond, sr = rt.encode(lr_tiles[idx.start:idx.stop])
                up = None if up_tiles is None else up_tiles[idx.start:idx.stop]
                noise_idx = [member * len(grid) + i for i in idx]
                tracks = start_tracks(cfg, cond, sr, up, noise_idx, steps, sampler, eta, seed)
                sample(rt.denoise, rt.schedule, tracks, on_step, cfg.prediction)
                out.append(track_images(tracks, cfg, cpu=False))  # stitched where they are, copied out once
            if on_tiles is not None:
                on_tiles(len(idx))
        return self.assemble(grid, torch.cat(out))

    def upscale(self, image: DecodedImage, steps: int | None = None, sampler: SamplerName | None = None,
                eta: float = 0.0, seed: int = 0, on_step: Callable[[int], None] | None = None,
                ensemble: int = 1, on_tiles: Callable[[int], None] | None = None) -> DecodedImage:
        """Upscale a decoded image to exactly `scale` times its size (alpha upscaled separately)."""
        rgb = self.upscale_rgb(image.rgb, steps, sampler, eta, seed, on_step, ensemble, on_tiles)
        return self.to_image(image, rgb)
