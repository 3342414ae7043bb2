"""Step-level continuous batching of diffusion sampling across requests.

One worker thread owns the runtime (the model and its accelerator). A request is submitted as
a `Job`: its LR tiles and its sampling parameters. Each tile becomes a `model.sampler.Track`
(its own timestep plan and noise generator). Every iteration the worker

1. drops jobs whose client went away or whose deadline passed,
2. admits new tiles, round-robin across jobs, up to a fair share of the active set each,
   and runs the encoder for them (`runtime.encode`),
3. picks at most `max_batch_tiles` active tiles, round-robin across jobs, and advances all of
   them with ONE denoiser call (`model.sampler.step_tracks`), whatever step each one is at,
4. hands finished jobs their final residual tiles.

So a request arriving while another is mid-sampling joins the next denoiser call instead of
waiting for the other to finish, and a large request cannot starve small ones.

Tile i of a request always samples from the generator `(seed, i)`, and with `reproducible`
every denoiser call is padded to the same batch size (and tiles are encoded one by one), so a
request's output is bit-identical whatever it was batched with. (Kernels pick different
reduction orders for different batch sizes; a permutation within one batch size is exact.)

On an accelerator out-of-memory error the worker halves its batch limit and retries (doubling
it back after a run of successful calls); any other error fails only the affected requests.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.runtime import Runtime
from model.sampler import SamplerName, Track, start_tracks, step_tracks, track_image
from service.errors import (
    Cancelled,
    DeadlineExceeded,
    OutOfMemory,
    QueueFull,
    ServiceError,
    ShuttingDown,
    WorkerError,
)
from service.metrics import Metrics

log = logging.getLogger(__name__)

_ORT_OOM = re.compile(r"Failed to allocate memory|out of memory|BFCArena|smaller than requested bytes",
                      re.IGNORECASE)


def is_out_of_memory(err: BaseException) -> bool:
    """torch's accelerator OOM, or an ONNX Runtime allocation failure."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return type(err).__module__.startswith("onnxruntime") and bool(_ORT_OOM.search(str(err)))


@dataclass(frozen=True)
class BatcherConfig:
    """The batcher's knobs."""

    max_batch_tiles: int = 8  # most tiles in one denoiser call
    max_active_tiles: int | None = None  # most tiles encoded and being sampled; default 2 x batch
    max_wait_s: float = 0.005  # an idle worker waits this long for company before its first step
    max_queue: int = 32  # most jobs accepted at once (waiting or running)
    continuous: bool = True  # False: one job at a time (its own tiles still batched)
    reproducible: bool = True  # pad calls to a fixed batch size: output independent of co-batching
    retry_after_s: int = 2
    oom_recover_after: int = 50  # successful calls before a halved batch limit is doubled again

    def __post_init__(self) -> None:
        if self.max_batch_tiles < 1:
            raise ValueError("max_batch_tiles must be at least 1")
        if self.max_active_tiles is not None and self.max_active_tiles < self.max_batch_tiles:
            raise ValueError("max_active_tiles must be at least max_batch_tiles")
        if self.max_queue < 1 or self.max_wait_s < 0:
            raise ValueError("max_queue must be >= 1 and max_wait_s >= 0")

    @property
    def active_tiles(self) -> int:
        return self.max_active_tiles or 2 * self.max_batch_tiles


@dataclass(eq=False)
class Job:
    """One request's tiles and sampling parameters. `future` resolves to (N, 3, T, T) SR tiles in
    [-1, 1] (CPU) or to a ServiceError."""

    lr_tiles: Tensor  # (N, 3, t, t) model input in [-1, 1]
    up_tiles: Tensor  # (N, 3, T, T) bicubic up(LR) tiles in [-1, 1]
    steps: int  # 0: the encoder's own x4 output, no denoiser call
    sampler: SamplerName = "ddim"
    eta: float = 0.0
    seed: int = 0
    deadline: float | None = None  # time.monotonic() value
    request_id: str = ""
    submitted: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    started: float | None = None  # first tile admitted
    finished: float | None = None
    calls: int = 0  # denoiser calls that advanced this job
    shared_calls: int = 0  # ... of which also advanced another job
    # Owned by the worker thread.
    next_tile: int = 0
    tracks: dict[int, Track] = field(default_factory=dict)
    out: dict[int, Tensor] = field(default_factory=dict)
    cancel_reason: str | None = None

    def __post_init__(self) -> None:
        self.future.set_running_or_notify_cancel()  # only the worker resolves it

    @property
    def n_tiles(self) -> int:
        return int(self.lr_tiles.shape[0])

    @property
    def pending_tiles(self) -> int:
        return self.n_tiles - self.next_tile

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the worker to drop this job at its next iteration (see also Batcher.cancel)."""
        self.cancel_reason = reason


class Batcher:
    """The worker: owns `runtime`; request handlers only `submit` jobs and wait on their futures."""

    def __init__(self, runtime: Runtime, config: BatcherConfig | None = None,
                 metrics: Metrics | None = None) -> None:
        self.runtime = runtime
        self.config = config or BatcherConfig()
        self.metrics = metrics or Metrics()
        self._jobs: list[Job] = []  # accepted and unfinished, in arrival order; guarded by _cv
        self._cv = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batch_limit = self.config.max_batch_tiles  # lowered after an out-of-memory error
        self._ok_calls = 0
        self._padding: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

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

    def queued(self) -> int:
        with self._cv:
            return len(self._jobs)

    def submit(self, lr_tiles: Tensor, up_tiles: Tensor, steps: int, sampler: SamplerName = "ddim",
               eta: float = 0.0, seed: int = 0, deadline: float | None = None, request_id: str = "") -> Job:
        """Queue a job; raises QueueFull or ShuttingDown (ServiceErrors) if it cannot be taken."""
        if lr_tiles.ndim != 4 or lr_tiles.shape[0] < 1 or lr_tiles.shape[1] != 3:
            raise ValueError(f"lr_tiles must be (N>=1, 3, t, t), got {tuple(lr_tiles.shape)}")
        if up_tiles.shape[0] != lr_tiles.shape[0]:
            raise ValueError("up_tiles must hold one tile per LR tile")
        job = Job(lr_tiles=lr_tiles, up_tiles=up_tiles, steps=steps, sampler=sampler, eta=eta, seed=seed,
                  deadline=deadline, request_id=request_id)
        with self._cv:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down and accepts no new requests",
                                   retry_after_s=self.config.retry_after_s)
            if len(self._jobs) >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} requests in progress); "
                                "retry later", retry_after_s=self.config.retry_after_s)
            self._jobs.append(job)
            self.metrics.queue_depth.inc()
            self._cv.notify_all()
        return job

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Drop a job now (client gone, deadline passed): its queue slot is free at once and its
        future fails with Cancelled; the worker discards its tiles at its next iteration."""
        job.cancel(reason)
        if self._remove(job):
            job.future.set_exception(Cancelled(reason))

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting jobs and wait (up to `timeout` s) for the accepted ones to finish."""
        with self._cv:
            self._accepting = False
            return self._cv.wait_for(lambda: not self._jobs or not self.alive, timeout)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the worker; jobs still unfinished fail with ShuttingDown."""
        with self._cv:
            self._accepting = False
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            left = list(self._jobs)
        for job in left:  # the worker has stopped (or is stuck): resolve without touching its state
            if self._remove(job):
                job.future.set_exception(ShuttingDown("the server shut down before this request finished",
                                                          retry_after_s=self.config.retry_after_s))

    # ------------------------------------------------------------------ the worker

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                if not self._jobs:
                    self.metrics.tiles_in_flight.set(0)
                self._cv.wait_for(lambda: self._jobs or self._stopping)
                if self._stopping:
                    return
                jobs = list(self._jobs)
            try:
                self._iteration(jobs)
            except Exception as e:  # a bug in the loop itself: fail what it was doing, go on
                log.exception("batcher iteration failed")
                for job in jobs:
                    self._fail(job, WorkerError(f"internal error in the batching worker: {e}"))

    def _iteration(self, jobs: list[Job]) -> None:
        live = self._reap(jobs)
        if not live:
            return
        if self.config.max_wait_s > 0 and not any(j.tracks for j in live):
            live = self._gather(live)
        self._admit(live)
        batch = self._select(live)
        if batch:
            self._step(batch)
        self.metrics.tiles_in_flight.set(sum(len(j.tracks) for j in live))

    def _reap(self, jobs: list[Job]) -> list[Job]:
        """Fail cancelled and expired jobs; return the others."""
        now = time.monotonic()
        live = []
        for job in jobs:
            if job.cancel_reason is not None:
                self._fail(job, Cancelled(job.cancel_reason))
            elif job.deadline is not None and now > job.deadline:
                self._fail(job, DeadlineExceeded("the request's deadline passed before it finished "
                                                 f"({job.next_tile - len(job.tracks)} of {job.n_tiles} "
                                                 "tiles done)"))
            else:
                live.append(job)
        return live

    def _gather(self, live: list[Job]) -> list[Job]:
        """Idle worker: wait up to max_wait_s after the oldest arrival for more tiles to batch."""
        until = min(j.submitted for j in live) + self.config.max_wait_s
        with self._cv:
            while True:
                pending = sum(j.pending_tiles for j in self._jobs)
                left = until - time.monotonic()
                if left <= 0 or pending >= self.batch_limit or self._stopping:
                    break
                self._cv.wait(left)
            jobs = list(self._jobs)
        return self._reap(jobs)

    def _admit(self, live: list[Job]) -> None:
        """Encode new tiles: round-robin over jobs, each up to its fair share of the active set."""
        cfg = self.config
        if cfg.continuous:
            # The active set shrinks with the batch limit after an out-of-memory error.
            active = max(1, cfg.active_tiles * self.batch_limit // cfg.max_batch_tiles)
            candidates = live
            cap = min(self.batch_limit, max(1, active // len(live)))
            free = active - sum(len(j.tracks) for j in live)
        else:  # one job at a time, in arrival order
            candidates = live[:1]
            cap = self.batch_limit
            free = cap - len(live[0].tracks)
        chosen: dict[Job, list[int]] = defaultdict(list)
        progress = True
        while free > 0 and progress:
            progress = False
            for job in candidates:
                if free > 0 and job.pending_tiles > 0 and len(job.tracks) + len(chosen[job]) < cap:
                    chosen[job].append(job.next_tile)
                    job.next_tile += 1
                    free -= 1
                    progress = True
        for job, idx in chosen.items():
            if idx:
                self._encode(job, idx)

    def _encode(self, job: Job, idx: list[int]) -> None:
        rt = self.runtime
        now = time.monotonic()
        if job.started is None:
            job.started = now
            self.metrics.queue_depth.dec()
            self.metrics.queue_wait.observe(now - job.submitted)
        tiles = job.lr_tiles[idx[0]:idx[-1] + 1]  # admitted indices are consecutive
        try:
            # Reproducible: batch-size-invariant, one tile per encoder call.
            size = 1 if self.config.reproducible else self.batch_limit
            parts = [rt.encode(tiles[s:s + size]) for s in range(0, len(idx), size)]
            cond = torch.cat([c for c, _ in parts])
            sr = torch.cat([r for _, r in parts])
        except Exception as e:
            job.next_tile = idx[0]  # give the tiles back; nothing was started
            if is_out_of_memory(e) and self._on_oom(len(idx)):
                return
            err: ServiceError = (
                OutOfMemory("out of accelerator memory encoding this image", self.config.retry_after_s)
                if is_out_of_memory(e) else WorkerError(f"encoder failed: {type(e).__name__}: {e}"))
            self._fail(job, err)
            log.error("encoder failed for request %s: %r", job.request_id, e)
            return
        up = job.up_tiles[idx[0]:idx[-1] + 1]
        tracks = start_tracks(rt.config, cond, sr, up, idx, job.steps, job.sampler, job.eta, job.seed)
        for i, tr in zip(idx, tracks, strict=True):
            if tr.done:  # steps=0: the encoder's output is the answer
                job.out[i] = track_image(tr, rt.config)
            else:
                job.tracks[i] = tr
        if len(job.out) == job.n_tiles:
            self._complete(job)

    def _select(self, live: list[Job]) -> list[tuple[Job, int, Track]]:
        """Up to batch_limit active tiles, round-robin over jobs; most advanced tiles of a job first."""
        jobs = live if self.config.continuous else live[:1]
        queues = [[(job, i, tr) for i, tr in sorted(job.tracks.items(), key=lambda kv: (-kv[1].pos, kv[0]))]
                  for job in jobs if job.tracks]
        batch: list[tuple[Job, int, Track]] = []
        depth = 0
        while len(batch) < self.batch_limit and any(depth < len(q) for q in queues):
            for q in queues:
                if depth < len(q) and len(batch) < self.batch_limit:
                    batch.append(q[depth])
            depth += 1
        return batch

    def _denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The runtime's denoiser; padded to exactly batch_limit samples when reproducible."""
        n = x.shape[0]
        fixed = self.batch_limit
        if not self.config.reproducible or n >= fixed:
            return self.runtime.denoise(x, t, cond)
        key = (fixed - n, tuple(x.shape[1:]), tuple(cond.shape[1:]), x.device, x.dtype)
        if key not in self._padding:
            self._padding.clear()
            self._padding[key] = (x.new_zeros((fixed - n, *x.shape[1:])),
                                  t.new_zeros((fixed - n,)), cond.new_zeros((fixed - n, *cond.shape[1:])))
        px, pt, pc = self._padding[key]
        return self.runtime.denoise(torch.cat([x, px]), torch.cat([t, pt]), torch.cat([cond, pc]))[:n]

    def _step(self, batch: list[tuple[Job, int, Track]]) -> None:
        tracks = [tr for _, _, tr in batch]
        t0 = time.perf_counter()
        try:
            step_tracks(self._denoise, self.runtime.schedule, tracks, self.runtime.config.prediction)
        except Exception as e:
            if is_out_of_memory(e):
                if not self._on_oom(len(batch)):
                    self._fail(batch[0][0], OutOfMemory("out of accelerator memory with a batch of one tile",
                                                                   self.config.retry_after_s))
            else:
                self._isolate(batch, e)
            return
        self.metrics.denoiser_call.observe(time.perf_counter() - t0)
        self.metrics.batch_tiles.observe(len(batch))
        self._ok_calls += 1
        if self.batch_limit < self.config.max_batch_tiles and self._ok_calls >= self.config.oom_recover_after:
            self.batch_limit = min(self.config.max_batch_tiles, self.batch_limit * 2)
            self._ok_calls = 0
            log.info("batch limit raised back to %d tiles", self.batch_limit)
        self._advance(batch)

    def _advance(self, batch: list[tuple[Job, int, Track]]) -> None:
        jobs = {job for job, _, _ in batch}
        for job in jobs:
            job.calls += 1
            job.shared_calls += len(jobs) > 1
        for job, i, tr in batch:
            if tr.done:
                job.out[i] = track_image(tr, self.runtime.config)
                del job.tracks[i]
        for job in jobs:
            if len(job.out) == job.n_tiles:
                self._complete(job)

    def _isolate(self, batch: list[tuple[Job, int, Track]], err: Exception) -> None:
        """A non-OOM error in a shared call: retry each job alone so only the faulty ones fail."""
        by_job: dict[Job, list[tuple[Job, int, Track]]] = defaultdict(list)
        for item in batch:
            by_job[item[0]].append(item)
        if len(by_job) == 1:
            job = batch[0][0]
            log.error("denoiser failed for request %s: %r", job.request_id, err)
            self._fail(job, WorkerError(f"denoiser failed: {type(err).__name__}: {err}"))
            return
        for job, items in by_job.items():
            try:
                step_tracks(self._denoise, self.runtime.schedule, [tr for _, _, tr in items],
                            self.runtime.config.prediction)
            except Exception as e:
                log.error("denoiser failed for request %s: %r", job.request_id, e)
                self._fail(job, WorkerError(f"denoiser failed: {type(e).__name__}: {e}"))
                continue
            self._advance(items)

    def _on_oom(self, n: int) -> bool:
        """Halve the batch limit after an OOM with `n` tiles; False when it cannot shrink any more."""
        self.metrics.error("oom")
        self._padding.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        limit = max(1, min(self.batch_limit, n) // 2)
        if limit >= self.batch_limit:
            return False
        self.batch_limit = limit
        self._ok_calls = 0
        log.warning("out of accelerator memory with %d tiles; batch limit now %d", n, limit)
        return True

    # ------------------------------------------------------------------ resolving jobs

    def _remove(self, job: Job) -> bool:
        with self._cv:
            if job not in self._jobs:
                return False
            self._jobs.remove(job)
            if job.started is None:
                self.metrics.queue_depth.dec()
            self._cv.notify_all()
        return True

    def _complete(self, job: Job) -> None:
        job.finished = time.monotonic()
        out = torch.stack([job.out[i] for i in range(job.n_tiles)])
        job.tracks.clear()
        job.out.clear()
        if self._remove(job):
            job.future.set_result(out)

    def _fail(self, job: Job, err: ServiceError) -> None:
        job.finished = time.monotonic()
        job.tracks.clear()
        job.out.clear()
        if self._remove(job):
            job.future.set_exception(err)
