"""A request as the engine holds it: the scheduler's `Ticket` plus where its tiles come from, how to sample them,
the future its answer resolves, and the progress the worker publishes."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

from torch import Tensor

from model.sampler import SamplerName, Track
from service.pipeline import Tiles
from service.scheduler import Ticket


@dataclass(eq=False, kw_only=True)
class Submission(Ticket):
    """One request's tiles and sampling parameters. `future` resolves to `tiles.result()` (for
    `Batcher.submit`: (N, 3, T, T) SR tiles in [-1, 1] on the CPU) or to a ServiceError. The worker thread
    owns `tracks` and publishes `tiles_done` and `steps_done` (denoiser steps of its tiles) as they change."""

    tiles: Tiles
    sampler: SamplerName = "ddim"
    eta: float = 0.0
    seed: int = 0
    future: Future = field(default_factory=Future)
    started: float | None = None  # first tile admitted
    finished: float | None = None
    tracks: dict[int, Track] = field(default_factory=dict)
    tiles_done: int = 0
    steps_done: int = 0

    def __post_init__(self) -> None:
        self.future.set_running_or_notify_cancel()  # only the batcher resolves it

    def put(self, i: int, sr: Tensor) -> None:
        """Tile `i` is finished (worker thread)."""
        self.tiles.put(i, sr)
        self.tiles_done += 1
