"""How many tiles one denoiser call should take on this device: one rule for the CLI and the service.

- CPU: a denoiser call of about `CPU_LR_PIXELS_PER_CALL` LR pixels is fastest per tile (larger calls spill the
  activations out of the caches; README, "Serving efficiency"), so the batch is that budget over the tile's
  area: one 64x64 tile, four 32x32 tiles. `calibrate_batch` measures it instead (the benchmark uses it).
- CUDA: the memory of one tile is measured (batch 1 and 2, eager torch) and the free memory shared out with a
  safety margin, capped at `GPU_MAX_BATCH`; then the calls are timed at the powers of two up to that cap, and the
  smallest batch within `GPU_KNEE_TOLERANCE` of the fastest per tile wins. On an H200, 32 tiles of 64 px ran at
  90% of the per-tile speed of 128, and a call of 128 took 52 ms: the service pads every call to the batch in
  its reproducible mode, so a small request paid for 128 tiles. Where the memory estimate is wrong the service's
  scheduler halves the batch after an out-of-memory error, as before.

A batch given explicitly (`--batch`, `SAMDIFFSR_MAX_TILES_PER_BATCH`) always wins. `SNUG_GROW` is how far a tile
may grow so that an image needs fewer tiles (the CLI's default; the service's `SAMDIFFSR_SNUG_TILES`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from model.runtime import Runtime
from model.tiling import TileGrid

log = logging.getLogger(__name__)

CPU_LR_PIXELS_PER_CALL = 64 * 64
GPU_MAX_BATCH = 128
GPU_MEMORY_FRACTION = 0.7  # of the free memory, for the denoiser's activations
GPU_KNEE_TOLERANCE = 0.15  # the smallest batch at most this much slower per tile than the fastest
FALLBACK_GPU_BATCH = 16  # when the memory cannot be measured (ONNX Runtime, TorchScript)
SNUG_GROW = 1.25  # snug tiles (`model.tiling.plan_tiles(grow=...)`) are at most this much longer than a tile


@dataclass(frozen=True)
class Sizing:
    """Tiles per denoiser call, and where that number came from."""

    batch: int
    source: str  # "setting", "cpu rule", "gpu memory", "gpu default", "calibrated"

    def __str__(self) -> str:
        return f"{self.batch} tiles per call ({self.source})"


def _inputs(runtime: Runtime, n: int, th: int, tw: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg, dev = runtime.config, runtime.device
    h, w = th * cfg.scale, tw * cfg.scale
    return (torch.zeros(n, 3, h, w, device=dev), torch.full((n,), cfg.timesteps // 2, dtype=torch.long, device=dev),
            torch.zeros(n, *cfg.cond_shape(th, tw), device=dev))


def gpu_batch(runtime: Runtime, tile_shape: tuple[int, int]) -> Sizing:
    """The most tiles whose denoiser activations fit in the free accelerator memory (measured)."""
    dev = runtime.device
    if runtime.backend != "torch":
        return Sizing(FALLBACK_GPU_BATCH, "gpu default")
    per_call = []
    for n in (1, 2):
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        runtime.denoise(*_inputs(runtime, n, *tile_shape))
        torch.cuda.synchronize(dev)
        per_call.append(torch.cuda.max_memory_allocated(dev) - base)
    per_tile = max(per_call[1] - per_call[0], per_call[0] // 2, 1)
    free, _total = torch.cuda.mem_get_info(dev)
    fit = max(1, min(GPU_MAX_BATCH, int(free * GPU_MEMORY_FRACTION // per_tile)))
    candidates = tuple(2**k for k in range(fit.bit_length()))  # 1, 2, 4, ... up to what fits
    knee, _ = calibrate_batch(runtime, tile_shape, candidates, GPU_KNEE_TOLERANCE)
    return Sizing(knee.batch, f"gpu: timed, {fit} fit in memory at {per_tile / 2**20:.0f} MiB per tile")


def cpu_batch(tile_shape: tuple[int, int]) -> Sizing:
    th, tw = tile_shape
    return Sizing(max(1, CPU_LR_PIXELS_PER_CALL // max(1, th * tw)), "cpu rule")


def choose_batch(runtime: Runtime, tile_shape: tuple[int, int], override: int | None = None) -> Sizing:
    """Tiles per denoiser call for LR tiles of `tile_shape` on the runtime's device (`override` wins). A tile of
    no size (0: each image whole) is one tile per image, flips included (they are upscaled one after another)."""
    if override is not None:
        if override < 1:
            raise ValueError("the batch must be at least 1 tile")
        return Sizing(override, "setting")
    if tile_shape[0] * tile_shape[1] == 0:
        return Sizing(1, "untiled: one tile per image")
    if runtime.device.type == "cuda":
        try:
            return gpu_batch(runtime, tile_shape)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return Sizing(1, "gpu memory: one tile barely fits")
    return cpu_batch(tile_shape)


def time_per_tile(runtime: Runtime, tile_shape: tuple[int, int], batch: int, repeats: int = 3) -> float:
    """Median seconds per tile of one denoiser call of `batch` tiles (after one warm-up call)."""
    x, t, c = _inputs(runtime, batch, *tile_shape)
    runtime.denoise(x, t, c)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runtime.denoise(x, t, c)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] / batch


def calibrate_batch(runtime: Runtime, tile_shape: tuple[int, int], candidates: tuple[int, ...] = (1, 2, 4, 8),
                    tolerance: float = 0.05) -> tuple[Sizing, dict[int, float]]:
    """Measure seconds per tile at each candidate batch; the smallest batch within `tolerance` of the best wins
    (smaller calls give lower latency and less padding)."""
    per_tile = {b: time_per_tile(runtime, tile_shape, b) for b in candidates}
    best = min(per_tile.values())
    batch = min(b for b, s in per_tile.items() if s <= best * (1 + tolerance))
    return Sizing(batch, "calibrated"), per_tile


@dataclass(frozen=True)
class Work:
    """Denoiser work of one image, in LR pixels per step: what the image needs and what else is computed."""

    useful: int  # the image's own pixels, once each
    overlap: int  # image pixels computed again by neighbouring tiles
    beyond: int  # padding outside the image (images smaller than a tile, or of odd sizes)
    batch_pad: int  # zero tiles that pad the last call of a request alone to the full batch (reproducible mode)

    @property
    def total(self) -> int:
        return self.useful + self.overlap + self.beyond + self.batch_pad

    def share(self, part: str) -> float:
        return getattr(self, part) / self.total


def denoiser_work(grid: TileGrid, batch: int, pad_calls: bool) -> Work:
    """Where the denoiser's work goes for one image sampled alone, `batch` tiles per call."""
    th, tw = grid.tile_shape
    inside = sum(max(0, min(grid.height, y + th) - y) * max(0, min(grid.width, x + tw) - x)
                 for y, x in grid.origins)
    n = len(grid)
    padded = (-n) % batch if pad_calls else 0
    return Work(grid.height * grid.width, inside - grid.height * grid.width, n * th * tw - inside,
                padded * th * tw)
