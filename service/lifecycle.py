"""The service instance: its models, its engine, its memory budget and its life cycle.

`Service.start` loads the models (unless given), sizes their tiles and batches, starts the engine
(`service.batcher`) and warms every model up in the background; `check_accepting` says whether a request may
come in (ready, not draining); `begin_drain` / `stop` end it. It imports no route: the routers reach it through
`service.deps`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

import torch

from model.repository import RegistryError, sources
from model.runtime import Runtime
from model.sizing import SNUG_GROW, choose_batch
from model.upscale import default_tile
from service.admission import MB, MemoryBudget
from service.batcher import Batcher, SchedulerConfig
from service.errors import NotReady, ShuttingDown, WorkerStopped
from service.intake import Door
from service.metrics import Metrics
from service.registry import Registry, load_models, serve_model
from service.settings import Settings
from service.submission import Submission

log = logging.getLogger(__name__)
WARMUP_TIMEOUT_S = 600.0


class Service:
    """The served models (`service.registry.Registry`), the engine that runs them, the memory budget and the
    life cycle: start, warm-up, readiness, drain, stop. Routes see it only through `service.deps`."""

    def __init__(self, settings: Settings, metrics: Metrics, runtimes: Mapping[str, Runtime] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtimes = dict(runtimes or {})  # loaded in start() when not given
        self.registry = Registry()  # filled in start()
        self.batcher: Batcher | None = None
        self.ready = threading.Event()
        self.warmup_error: str | None = None
        self.draining = False
        self.drain_deadline: float | None = None  # time.monotonic() value, once draining
        self.on_drain: list[Callable[[], object]] = []
        self.budget = MemoryBudget(settings.memory_budget_mb * MB, settings.retry_after_s, settings.max_queue)
        self.door = Door(settings, metrics, self.budget, self.check_accepting)  # what taking an upload needs

    def start(self) -> None:
        """Load the models (unless given), start the worker, warm up in the background."""
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        if not self.runtimes:
            self.runtimes = load_models(sources(s.models, s.checkpoint, s.models_dir), s.backend, s.device,
                                        s.torch_threads, s.precision)
        tiles = {mid: s.tile_size or default_tile(rt.config) for mid, rt in self.runtimes.items()}
        sizings = {mid: choose_batch(rt, (tiles[mid], tiles[mid]), s.max_tiles_per_batch)
                   for mid, rt in self.runtimes.items()}
        # One batch limit for the worker: the smallest that suits every model (calls never mix models).
        batch = min(z.batch for z in sizings.values())
        # Snug tiles (each image's tiles sized to it) cut an image's padding work, but tiles of different images
        # then rarely share a call: by default they are on only where a call takes one tile anyway.
        snug = batch == 1 if s.snug_tiles is None else s.snug_tiles
        grow = SNUG_GROW if snug else 1.0
        self.registry = Registry({
            mid: serve_model(mid, rt, sizings[mid], tiles[mid], s.tile_overlap, grow, s.default_steps, batch)
            for mid, rt in self.runtimes.items()}, s.default_model or "")
        weights = sum(m.weight_bytes for m in self.registry.models.values())
        if weights >= self.budget.limit:
            raise RegistryError(f"the models' weights ({weights / MB:,.0f} MiB) do not fit in "
                                f"SAMDIFFSR_MEMORY_BUDGET_MB ({s.memory_budget_mb} MiB)")
        self.budget.limit -= weights  # what the requests in progress may take
        self.batcher = Batcher(self.runtimes, SchedulerConfig(
            max_batch_tiles=batch, max_active_tiles=max(batch, s.active_tiles(batch)),
            max_wait_s=s.max_batch_wait_ms / 1000, max_queue=s.max_queue, continuous=s.continuous_batching,
            reproducible=s.reproducible, retry_after_s=s.retry_after_s), self.metrics)
        self.batcher.start()
        self.door.registry, self.door.engine = self.registry, self.batcher
        self.metrics.set_models([(m.id, m.runtime.info.name, m.runtime.backend, str(m.runtime.device))
                                 for m in self.registry.models.values()])
        self.metrics.track_gpu_memory(str(next(iter(self.runtimes.values())).device))
        threading.Thread(target=self._warmup, name="samdiffsr-warmup", daemon=True).start()
        for m in self.registry.models.values():
            rt = m.runtime
            log.info("serving %r: %s (%s %s on %s), tile %d, %s, default %d %s steps", m.id, rt.info.name,
                     rt.backend, getattr(rt, "precision", "fp32"), rt.device, m.upscaler.tile, m.sizing, m.steps,
                     m.sampler)
        log.info("%d tiles per denoiser call; default model %s", batch, self.registry.default)

    def _warmup(self) -> None:
        """One full-size tile of every model through the worker, so the first request does not pay for set-up."""
        assert self.batcher is not None
        try:
            for m in self.registry.models.values():
                scale, tile = m.runtime.config.scale, m.upscaler.tile
                sub = self.batcher.submit(torch.zeros(1, 3, tile, tile),
                                          torch.zeros(1, 3, tile * scale, tile * scale),
                                          steps=min(2, m.runtime.config.timesteps), request_id="warmup", model=m.id)
                sub.future.result(WARMUP_TIMEOUT_S)
        except Exception as e:
            self.warmup_error = f"warm-up failed: {e}"
            log.error(self.warmup_error)
            return
        self.ready.set()
        log.info("model warmed up; ready")

    def begin_drain(self) -> None:
        """Stop taking new requests (SIGTERM); requests in flight go on until the drain deadline, when
        they are answered 503 shutting_down. `on_drain` hooks run once (the job store cancels its jobs: their
        results would die with the process)."""
        if self.drain_deadline is None:
            for hook in self.on_drain:
                hook()
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s
            timer = threading.Timer(self.settings.drain_timeout_s, self._drain_expired)
            timer.daemon = True
            timer.start()
        self.draining = True

    def _drain_expired(self) -> None:
        if self.batcher is not None:
            n = self.batcher.abort(ShuttingDown("the server's drain deadline passed before this request finished",
                                                retry_after_s=self.settings.retry_after_s))
            log.warning("drain deadline: %d requests still in progress are answered 503", n)

    def cancel(self, sub: Submission, reason: str) -> None:
        """Take a submission off the engine (a no-op once it has finished)."""
        if self.batcher is not None:
            self.batcher.cancel(sub, reason)

    def check_alive(self) -> None:
        """WorkerStopped unless the engine's worker thread runs (or has not started yet)."""
        if self.batcher is not None and not self.batcher.alive:
            raise WorkerStopped("the batching worker has stopped", retry_after_s=self.settings.retry_after_s)

    def stop(self) -> None:
        self.draining = True
        if self.batcher is not None:
            if not self.batcher.drain(self.settings.drain_timeout_s):
                log.warning("drain timeout: %d requests still in progress are failed", self.batcher.queued())
            self.batcher.stop()

    def check_accepting(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down and accepts no new requests",
                               retry_after_s=self.settings.retry_after_s)
        if not self.ready.is_set():
            raise NotReady(self.warmup_error or "the model is still loading or warming up",
                           retry_after_s=self.settings.retry_after_s)
