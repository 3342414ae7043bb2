"""The engine: one worker thread that asks the scheduler what to do and has the model runner do it.

A request is submitted as a `Submission`: where its tiles come from (`Tiles`: prepared on demand, so only
the tiles in the active set are in memory) and its sampling parameters. Each tile becomes a
`model.sampler.Track`. The decisions (admission, fairness, deadlines, out-of-memory halving) are
`service.scheduler.Scheduler`'s, the encoder and denoiser calls `service.runner.ModelRunner`'s; the loop only

1. waits for work (and, when idle, up to `max_wait_s` for company),
2. asks the scheduler for a `StepPlan` and hands it to the runner,
3. reports what ran (`Scheduler.update`) and resolves the futures of finished and failed submissions.

Progress is published by the worker as it happens (`Submission.tiles_done`, `.steps_done`), so readers in
other threads never look into the worker's structures. Tile i of a request always samples from the generator
`(seed, i)`, and with `reproducible` every denoiser call is padded to the same batch size (and tiles are
encoded one by one), so a request's output is bit-identical whatever it was batched with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from model.runtime import Runtime
from model.sampler import SamplerName
from service.admission import Pace
from service.errors import Cancelled, ServiceError, ShuttingDown, WorkerError
from service.metrics import Metrics
from service.pipeline import TensorTiles, Tiles
from service.runner import ModelRunner, is_out_of_memory
from service.scheduler import Outcome, Scheduler, SchedulerConfig, StepPlan, StepResult
from service.submission import Submission

__all__ = ["Batcher", "SchedulerConfig", "TensorTiles", "Tiles", "is_out_of_memory"]

log = logging.getLogger(__name__)
PACE_CALLS = 64  # denoiser calls whose pace `Batcher.tile_step_s` remembers


class Batcher:
    """The engine: request handlers only `submit` and wait on the futures; the worker thread runs the loop.

    `runtimes` maps model ids to runtimes (a single runtime is served as model id ""); a submission names its
    model."""

    def __init__(self, runtimes: Runtime | Mapping[str, Runtime], config: SchedulerConfig | None = None,
                 metrics: Metrics | None = None) -> None:
        self.runtimes: dict[str, Runtime] = dict(runtimes) if isinstance(runtimes, Mapping) else {"": runtimes}
        if not self.runtimes:
            raise ValueError("the batcher needs at least one runtime")
        self.config = config or SchedulerConfig()
        self.metrics = metrics or Metrics()
        self.runner = ModelRunner(self.runtimes, self.metrics, self._record_call)
        self.scheduler = Scheduler(self.config)  # guarded by _cv
        self._cv = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._holding: set[Submission] = set()  # submissions with tracks (worker thread only)
        self._pace: dict[str, deque[float]] = {}  # model -> seconds per tile-step of recent calls (tile_step_s)
        self._best_pace: dict[str, float] = {}  # model -> the fewest seconds per tile-step since start (pace)

    # ------------------------------------------------------------------ public API (any thread)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("batcher already started")
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="samdiffsr-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    def pace(self, model: str) -> Pace:
        """`model`'s seconds per tile-step: the best since start (an idle server's) and the recent best
        (`tile_step_s`); 0 before any call."""
        recent = self.tile_step_s(model)
        return Pace(min(self._best_pace.get(model, recent), recent), recent)

    def backlog_s(self) -> float:
        """Seconds of work queued or in progress (tile-steps left at each model's recent pace): how long a new
        request would wait behind it at most."""
        with self._cv:
            left = self.scheduler.work_left()
        return sum(n * self.tile_step_s(model) for model, n in left.items())

    def tile_step_s(self, model: str) -> float:
        """The fastest a tile-step of `model` went in its last `PACE_CALLS` denoiser calls (a call's time over the
        tiles it could hold): a lower bound of a request's time, whatever else is queued (0 before any call)."""
        recent = self._pace.get(model)
        return min(recent) if recent else 0.0

    def _record_call(self, model: str, seconds: float, tiles: int) -> None:
        """A denoiser call of `tiles` tiles took `seconds` (worker thread): its pace and metrics. A call costs no
        less than a full one, so its pace is its time over the tiles it could hold."""
        pace = seconds / max(tiles, self.scheduler.batch_limit)
        self._pace.setdefault(model, deque(maxlen=PACE_CALLS)).append(pace)
        self._best_pace[model] = min(self._best_pace.get(model, pace), pace)
        self.metrics.denoiser_call.labels(model=model).observe(seconds)
        self.metrics.batch_tiles.labels(model=model).observe(tiles)

    @property
    def batch_limit(self) -> int:
        return self.scheduler.batch_limit

    def queued(self) -> int:
        with self._cv:
            return len(self.scheduler)

    def submit(self, lr_tiles: Tensor, up_tiles: Tensor | None, steps: int, sampler: SamplerName = "ddim",
               eta: float = 0.0, seed: int = 0, deadline: float | None = None, request_id: str = "",
               model: str | None = None) -> Submission:
        """Queue a submission of whole tile tensors; raises QueueFull or ShuttingDown if it cannot be taken."""
        return self.submit_tiles(TensorTiles(lr_tiles, up_tiles), steps, sampler, eta, seed, deadline, request_id,
                                 model)

    def submit_tiles(self, tiles: Tiles, steps: int, sampler: SamplerName = "ddim", eta: float = 0.0,
                     seed: int = 0, deadline: float | None = None, request_id: str = "",
                     model: str | None = None) -> Submission:
        """Queue a submission whose tiles are made on demand (see `Tiles`) for `model` (default: the first)."""
        model = next(iter(self.runtimes)) if model is None else model
        if model not in self.runtimes:
            raise ValueError(f"unknown model {model!r}; the batcher serves {sorted(self.runtimes)}")
        sub = Submission(n_tiles=tiles.n_tiles, steps=steps, tile_shape=tiles.tile_shape, deadline=deadline,
                  request_id=request_id, tiles=tiles, sampler=sampler, eta=eta, seed=seed, model=model)
        with self._cv:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down and accepts no new requests",
                                   retry_after_s=self.config.retry_after_s)
            self.scheduler.add(sub)  # QueueFull
            self.metrics.queue_depth.labels(model=sub.model).inc()
            self._cv.notify_all()
        return sub

    def cancel(self, sub: Submission, reason: str = "cancelled") -> None:
        """Drop a submission now (client gone, deadline passed): its queue slot is free at once and its
        future fails with Cancelled; the worker discards its tiles at its next iteration."""
        sub.cancel(reason)
        with self._cv:
            removed = self.scheduler.remove(sub)
        if removed:
            self._settle(sub, error=Cancelled(reason))

    def fail_all(self, err: ServiceError) -> int:
        """Fail every unfinished submission with `err` now (the worker goes on); returns how many."""
        with self._cv:
            subs = self.scheduler.requests
            for sub in subs:
                self.scheduler.remove(sub)
            self._cv.notify_all()
        for sub in subs:
            self._settle(sub, error=err)
        return len(subs)

    def abort(self, err: ServiceError) -> int:
        """Stop accepting submissions and fail every unfinished one with `err` (the drain deadline passed)."""
        with self._cv:
            self._accepting = False
        return self.fail_all(err)

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting submissions and wait (up to `timeout` s) for the accepted ones to finish."""
        with self._cv:
            self._accepting = False
            return self._cv.wait_for(lambda: not len(self.scheduler) or not self.alive, timeout)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the worker; submissions still unfinished fail with ShuttingDown."""
        with self._cv:
            self._accepting = False
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self.fail_all(ShuttingDown("the server shut down before this request finished",
                                   retry_after_s=self.config.retry_after_s))

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                if not len(self.scheduler):
                    self.metrics.tiles_in_flight.set(0)
                self._cv.wait_for(lambda: len(self.scheduler) or self._stopping)
                if self._stopping:
                    return
                wait = self.scheduler.wait_s(time.monotonic())
                if wait > 0:  # idle: give other requests a moment to join the first call
                    self._cv.wait(wait)
                    continue
                plan = self.scheduler.schedule()
                self._mark_started(plan)
            for sub, err in plan.failed:
                self._settle(sub, error=err)
            try:
                result = self.runner.execute(plan)
            except Exception as e:  # a bug in the worker itself: fail what it was doing, go on
                log.exception("batcher iteration failed")
                subs = {sub for sub, _ in plan.encode} | {sub for sub, _ in plan.step}
                result = StepResult(failed=[(sub, WorkerError(f"internal error in the batching worker: {e}"))
                                            for sub in subs])
            self._holding.update(sub for sub, _ in result.encoded if sub.tracks)
            with self._cv:
                outcome = self.scheduler.update(plan, result)
                active = self.scheduler.active_tiles()
            self._resolve(outcome)
            self.metrics.tiles_in_flight.set(active)

    def _mark_started(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for sub, _ in plan.encode:
            if sub.started is None:  # under _cv: exactly once, see _settle
                sub.started = now
                self.metrics.queue_depth.labels(model=sub.model).dec()
                self.metrics.queue_wait.labels(model=sub.model).observe(now - sub.submitted)

    def _resolve(self, outcome: Outcome) -> None:
        if outcome.batch_limit_changed:
            log.info("batch limit now %d tiles", self.scheduler.batch_limit)
        for sub, err in outcome.failed:
            self._settle(sub, error=err)
        for sub in outcome.completed:
            try:
                value = sub.tiles.result()
            except Exception as e:
                log.exception("assembling request %s failed", sub.request_id)
                self._settle(sub, error=WorkerError(f"assembling the output failed: {type(e).__name__}: {e}"))
            else:
                self._settle(sub, value=value)
        with self._cv:
            gone = [sub for sub in self._holding if sub not in self.scheduler]
        for sub in gone:  # cancelled or failed: drop its tiles' state now
            sub.tracks.clear()
            self._holding.discard(sub)

    def _settle(self, sub: Submission, value: Any = None, error: ServiceError | None = None) -> None:
        """Resolve a submission already removed from the scheduler (whoever removed it calls this, once)."""
        with self._cv:
            if sub.started is None:
                sub.started = sub.submitted
                self.metrics.queue_depth.labels(model=sub.model).dec()
            self._cv.notify_all()
        sub.finished = time.monotonic()
        if error is not None:
            sub.future.set_exception(error)
        else:
            sub.future.set_result(value)
