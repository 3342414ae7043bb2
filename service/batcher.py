"""The batching worker: one thread that owns the runtimes (one per served model) and executes the scheduler's
plans.

A request is submitted as a `Job`: where its tiles come from (`Tiles`: prepared on demand, so only
the tiles in the active set are in memory) and its sampling parameters. Each tile becomes a
`model.sampler.Track`. The decisions (admission, fairness, deadlines, out-of-memory halving) are
`service.scheduler.Scheduler`'s; the worker loop only

1. waits for work (and, when idle, up to `max_wait_s` for company),
2. asks the scheduler for a `StepPlan`, encodes the tiles it names (`runtime.encode` of each job's model) and
   advances the tiles it names (all of one model) with ONE denoiser call (`model.sampler.step_tracks`),
   checking that every call returns one result per input,
3. reports what ran (`Scheduler.update`) and resolves the futures of finished and failed jobs; a
   finished tile goes to its job's `Tiles.put` at once.

Tile i of a request always samples from the generator `(seed, i)`, and with `reproducible` every
denoiser call is padded to the same batch size (and tiles are encoded one by one), so a request's
output is bit-identical whatever it was batched with. On an accelerator out-of-memory error the
scheduler halves the batch limit and the step is retried; any other error fails only the affected jobs.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from model.runtime import Runtime
from model.sampler import SamplerName, Track, start_tracks, step_tracks, track_images
from service.admission import Pace
from service.errors import Cancelled, ServiceError, ShuttingDown, WorkerError
from service.metrics import Metrics
from service.pipeline import TensorTiles, Tiles
from service.scheduler import BatcherConfig, Item, Outcome, Request, Scheduler, StepPlan, StepResult

__all__ = ["Batcher", "BatcherConfig", "Job", "TensorTiles", "Tiles", "is_out_of_memory"]

log = logging.getLogger(__name__)
PACE_CALLS = 64  # denoiser calls whose pace `Batcher.tile_step_s` remembers

_ORT_OOM = re.compile(r"Failed to allocate memory|out of memory|BFCArena|smaller than requested bytes",
                      re.IGNORECASE)


def is_out_of_memory(err: BaseException) -> bool:
    """torch's accelerator OOM, or an ONNX Runtime allocation failure."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return type(err).__module__.startswith("onnxruntime") and bool(_ORT_OOM.search(str(err)))


@dataclass(eq=False, kw_only=True)
class Job(Request):
    """One request's tiles and sampling parameters. `future` resolves to `tiles.result()` (for
    `Batcher.submit`: (N, 3, T, T) SR tiles in [-1, 1] on the CPU) or to a ServiceError."""

    tiles: Tiles
    sampler: SamplerName = "ddim"
    eta: float = 0.0
    seed: int = 0
    future: Future = field(default_factory=Future)
    started: float | None = None  # first tile admitted
    finished: float | None = None
    tracks: dict[int, Track] = field(default_factory=dict)  # owned by the worker thread

    def __post_init__(self) -> None:
        self.future.set_running_or_notify_cancel()  # only the batcher resolves it


class Batcher:
    """The worker: owns the runtimes; request handlers only `submit` jobs and wait on their futures.

    `runtimes` maps model ids to runtimes (a single runtime is served as model id ""); a job names its model."""

    def __init__(self, runtimes: Runtime | Mapping[str, Runtime], config: BatcherConfig | None = None,
                 metrics: Metrics | None = None) -> None:
        self.runtimes: dict[str, Runtime] = dict(runtimes) if isinstance(runtimes, Mapping) else {"": runtimes}
        if not self.runtimes:
            raise ValueError("the batcher needs at least one runtime")
        self.config = config or BatcherConfig()
        self.metrics = metrics or Metrics()
        self.scheduler = Scheduler(self.config)  # guarded by _cv
        self._cv = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._holding: set[Job] = set()  # jobs with tracks (worker thread only)
        self._padding: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
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

    @property
    def runtime(self) -> Runtime:
        """The first model's runtime (the only one when a single runtime was given)."""
        return next(iter(self.runtimes.values()))

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

    def _record_pace(self, model: str, seconds: float) -> None:
        self._pace.setdefault(model, deque(maxlen=PACE_CALLS)).append(seconds)
        self._best_pace[model] = min(self._best_pace.get(model, seconds), seconds)

    @property
    def batch_limit(self) -> int:
        return self.scheduler.batch_limit

    def queued(self) -> int:
        with self._cv:
            return len(self.scheduler)

    def submit(self, lr_tiles: Tensor, up_tiles: Tensor | None, steps: int, sampler: SamplerName = "ddim",
               eta: float = 0.0, seed: int = 0, deadline: float | None = None, request_id: str = "",
               model: str | None = None) -> Job:
        """Queue a job of whole tile tensors; raises QueueFull or ShuttingDown if it cannot be taken."""
        return self.submit_tiles(TensorTiles(lr_tiles, up_tiles), steps, sampler, eta, seed, deadline, request_id,
                                 model)

    def submit_tiles(self, tiles: Tiles, steps: int, sampler: SamplerName = "ddim", eta: float = 0.0,
                     seed: int = 0, deadline: float | None = None, request_id: str = "",
                     model: str | None = None) -> Job:
        """Queue a job whose tiles are made on demand (see `Tiles`) for `model` (default: the first)."""
        model = next(iter(self.runtimes)) if model is None else model
        if model not in self.runtimes:
            raise ValueError(f"unknown model {model!r}; the batcher serves {sorted(self.runtimes)}")
        job = Job(n_tiles=tiles.n_tiles, steps=steps, tile_shape=tiles.tile_shape, deadline=deadline,
                  request_id=request_id, tiles=tiles, sampler=sampler, eta=eta, seed=seed, model=model)
        with self._cv:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down and accepts no new requests",
                                   retry_after_s=self.config.retry_after_s)
            self.scheduler.add(job)  # QueueFull
            self.metrics.queue_depth.labels(model=job.model).inc()
            self._cv.notify_all()
        return job

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Drop a job now (client gone, deadline passed): its queue slot is free at once and its
        future fails with Cancelled; the worker discards its tiles at its next iteration."""
        job.cancel(reason)
        with self._cv:
            removed = self.scheduler.remove(job)
        if removed:
            self._settle(job, error=Cancelled(reason))

    def fail_all(self, err: ServiceError) -> int:
        """Fail every unfinished job with `err` now (the worker goes on); returns how many."""
        with self._cv:
            jobs = self.scheduler.requests
            for job in jobs:
                self.scheduler.remove(job)
            self._cv.notify_all()
        for job in jobs:
            self._settle(job, error=err)
        return len(jobs)

    def abort(self, err: ServiceError) -> int:
        """Stop accepting jobs and fail every unfinished one with `err` (the drain deadline passed)."""
        with self._cv:
            self._accepting = False
        return self.fail_all(err)

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting jobs and wait (up to `timeout` s) for the accepted ones to finish."""
        with self._cv:
            self._accepting = False
            return self._cv.wait_for(lambda: not len(self.scheduler) or not self.alive, timeout)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the worker; jobs still unfinished fail with ShuttingDown."""
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
            for job, err in plan.failed:
                self._settle(job, error=err)
            try:
                result = self._execute(plan)
            except Exception as e:  # a bug in the worker itself: fail what it was doing, go on
                log.exception("batcher iteration failed")
                jobs = {job for job, _ in plan.encode} | {job for job, _ in plan.step}
                result = StepResult(failed=[(job, WorkerError(f"internal error in the batching worker: {e}"))
                                            for job in jobs])
            with self._cv:
                outcome = self.scheduler.update(plan, result)
                active = self.scheduler.active_tiles()
            self._resolve(outcome)
            self.metrics.tiles_in_flight.set(active)

    def _mark_started(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for job, _ in plan.encode:
            if job.started is None:  # under _cv: exactly once, see _settle
                job.started = now
                self.metrics.queue_depth.labels(model=job.model).dec()
                self.metrics.queue_wait.labels(model=job.model).observe(now - job.submitted)

    def _resolve(self, outcome: Outcome) -> None:
        if outcome.batch_limit_changed:
            log.info("batch limit now %d tiles", self.scheduler.batch_limit)
        for job, err in outcome.failed:
            self._settle(job, error=err)
        for job in outcome.completed:
            try:
                value = job.tiles.result()
            except Exception as e:
                log.exception("assembling request %s failed", job.request_id)
                self._settle(job, error=WorkerError(f"assembling the output failed: {type(e).__name__}: {e}"))
            else:
                self._settle(job, value=value)
        with self._cv:
            gone = [job for job in self._holding if job not in self.scheduler]
        for job in gone:  # cancelled or failed: drop its tiles' state now
            job.tracks.clear()
            self._holding.discard(job)

    def _settle(self, job: Job, value: Any = None, error: ServiceError | None = None) -> None:
        """Resolve a job already removed from the scheduler (whoever removed it calls this, once)."""
        with self._cv:
            if job.started is None:
                job.started = job.submitted
                self.metrics.queue_depth.labels(model=job.model).dec()
            self._cv.notify_all()
        job.finished = time.monotonic()
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(value)

    # ------------------------------------------------------------------ executing a plan

    def _execute(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        by_group: dict[tuple, list[tuple[Job, list[int]]]] = defaultdict(list)
        for job, idx in plan.encode:
            by_group[job.group].append((job, idx))  # type: ignore[arg-type]
        for group in by_group.values():
            self._encode(group, plan.encode_chunk, plan.pad_encode, result)
        items = [(job, i) for job, i in plan.step if i in job.tracks]  # an encode may have failed
        if items:
            self._step(items, plan.pad_to, result)
        return result

    def _encode(self, group: list[tuple[Job, list[int]]], chunk: int, pad: bool, result: StepResult) -> None:
        """Encode the admitted tiles of `group` (requests of one model and tile shape) together, `chunk` tiles per
        call: with many requests in flight each admits a few tiles, and an encoder call per request left a GPU idle.
        A failure that is not out-of-memory is retried request by request, so only the faulty ones fail."""
        rt = self.runtimes[group[0][0].model]
        try:
            inputs = [job.tiles.inputs(idx) for job, idx in group]
            lr = torch.cat([tiles for tiles, _ in inputs])
            parts = [self._encode_call(rt, lr[s:s + chunk], chunk if pad else 0) for s in range(0, len(lr), chunk)]
            cond = torch.cat([c for c, _ in parts])
            sr = torch.cat([r for _, r in parts])
            _check_count("encoder", len(lr), cond, sr)
        except Exception as e:
            if is_out_of_memory(e):
                self._out_of_memory()
                result.encode_oom.extend(group)
            elif len(group) > 1:
                for one in group:
                    self._encode([one], chunk, pad, result)
            else:
                job = group[0][0]
                log.error("encoder failed for request %s: %r", job.request_id, e)
                result.failed.append((job, WorkerError(f"encoder failed: {type(e).__name__}: {e}")))
            return
        start = 0
        for (job, idx), (_, up) in zip(group, inputs, strict=True):
            own = slice(start, start + len(idx))
            start += len(idx)
            tracks = start_tracks(rt.config, cond[own], sr[own], up, idx, job.steps, job.sampler, job.eta, job.seed)
            if job.steps == 0:  # the encoder's output is the answer
                for i, img in zip(idx, track_images(tracks, rt.config, cpu=False), strict=True):
                    job.tiles.put(i, img)
            else:
                job.tracks.update(zip(idx, tracks, strict=True))
                self._holding.add(job)
            result.encoded.append((job, idx))

    @staticmethod
    def _encode_call(rt: Runtime, lr: Tensor, pad_to: int) -> tuple[Tensor, Tensor]:
        """The runtime's encoder, padded with zero tiles to `pad_to` samples (0: not padded)."""
        n = lr.shape[0]
        if n >= pad_to:
            return rt.encode(lr)
        cond, sr = rt.encode(torch.cat([lr, lr.new_zeros((pad_to - n, *lr.shape[1:]))]))
        return cond[:n], sr[:n]

    def _step(self, items: list[Item], pad_to: int | None, result: StepResult) -> None:
        tracks = [job.tracks[i] for job, i in items]  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        try:
            self._call(items[0][0].model, tracks, pad_to)
        except Exception as e:
            if is_out_of_memory(e):
                self._out_of_memory()
                result.step_oom = len(items)
            else:
                self._isolate(items, pad_to, e, result)
            return
        model = items[0][0].model
        dt = time.perf_counter() - t0
        self._record_pace(model, dt / max(len(items), self.scheduler.batch_limit))  # a full call costs no less
        self.metrics.denoiser_call.labels(model=model).observe(dt)
        self.metrics.batch_tiles.labels(model=model).observe(len(items))
        self._advanced(items, result)

    def _call(self, model: str, tracks: list[Track], pad_to: int | None) -> None:
        rt = self.runtimes[model]
        step_tracks(lambda x, t, c: self._denoise(rt, x, t, c, pad_to), rt.schedule, tracks, rt.config.prediction)

    def _denoise(self, rt: Runtime, x: Tensor, t: Tensor, cond: Tensor, pad_to: int | None) -> Tensor:
        """The runtime's denoiser, padded to `pad_to` samples; checks one output per input."""
        n = x.shape[0]
        if pad_to is None or n >= pad_to:
            out = rt.denoise(x, t, cond)
        else:
            key = (pad_to - n, tuple(x.shape[1:]), tuple(cond.shape[1:]), x.device, x.dtype, id(rt))
            if key not in self._padding:
                self._padding.clear()
                self._padding[key] = (x.new_zeros((pad_to - n, *x.shape[1:])), t.new_zeros((pad_to - n,)),
                                      cond.new_zeros((pad_to - n, *cond.shape[1:])))
            px, pt, pc = self._padding[key]
            out = rt.denoise(torch.cat([x, px]), torch.cat([t, pt]), torch.cat([cond, pc]))[:n]
        _check_count("denoiser", n, out)
        return out

    def _advanced(self, items: list[Item], result: StepResult) -> None:
        """One successful call advanced `items`: hand finished tiles to their jobs."""
        result.calls.append(items)
        done = [(job, i) for job, i in items if job.tracks[i].done]  # type: ignore[attr-defined]
        if not done:
            return
        cfg = self.runtimes[items[0][0].model].config
        images = track_images([job.tracks.pop(i) for job, i in done], cfg, cpu=False)  # type: ignore
        for (job, i), img in zip(done, images, strict=True):
            job.tiles.put(i, img)  # type: ignore[attr-defined]

    def _isolate(self, items: list[Item], pad_to: int | None, err: Exception, result: StepResult) -> None:
        """A non-OOM error in a shared call: retry each job alone so only the faulty ones fail."""
        by_job: dict[Any, list[Item]] = defaultdict(list)
        for item in items:
            by_job[item[0]].append(item)
        if len(by_job) == 1:
            job = items[0][0]
            log.error("denoiser failed for request %s: %r", job.request_id, err)
            result.failed.append((job, WorkerError(f"denoiser failed: {type(err).__name__}: {err}")))
            return
        for job, own in by_job.items():
            try:
                self._call(job.model, [job.tracks[i] for _, i in own], pad_to)
            except Exception as e:
                log.error("denoiser failed for request %s: %r", job.request_id, e)
                result.failed.append((job, WorkerError(f"denoiser failed: {type(e).__name__}: {e}")))
                continue
            self._advanced(own, result)

    def _out_of_memory(self) -> None:
        self.metrics.error("oom")
        self._padding.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("out of accelerator memory (batch limit %d)", self.scheduler.batch_limit)


def _check_count(what: str, n: int, *outputs: Tensor) -> None:
    """Every model call returns one result per input (a wrong count would mix up requests)."""
    for out in outputs:
        if out.shape[0] != n:
            raise RuntimeError(f"{what} returned {out.shape[0]} results for {n} inputs")

