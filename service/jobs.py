"""Asynchronous jobs: upscales queued on the batcher whose results wait in memory to be fetched.

A job is an `intake.Accepted` request (already decoded, validated and submitted to the batcher)
plus a record here. When the batcher's future resolves, a small thread pool renders and encodes
the image (never the batcher's worker thread) and keeps the bytes. Finished jobs are kept for
`job_ttl_s`, and the results held stay under `job_store_max_bytes` (the oldest finished jobs go
first); a job that went is answered 410 for a while, then 404 like an id never seen. Everything is
in this process's memory: a restarted replica loses its jobs.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor

from model.imaging import MEDIA_TYPES, encode_image
from service import intake, pipeline
from service.batcher import Job
from service.errors import Cancelled, ErrorDetail, ServiceError
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.app import Service

log = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[JobStatus, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = frozenset({"succeeded", "failed", "cancelled"})
MAX_TOMBSTONES = 10_000


class JobNotFound(ServiceError):
    status, code, kind = 404, "job_not_found", "job_not_found"


class JobExpired(ServiceError):
    status, code, kind = 410, "job_expired", "job_expired"


class JobNotDone(ServiceError):
    status, code, kind = 409, "job_not_done", "job_not_done"


class ResultTooLarge(ServiceError):
    status, code, kind = 507, "result_too_large", "result_too_large"


@dataclass(eq=False)
class JobRecord:
    """One job. `acc` (the decoded input and the batcher's job) is dropped once it has ended."""

    id: str
    request_id: str
    acc: intake.Accepted | None
    batch_job: Job
    model: str
    steps: int
    sampler: str
    seed: int
    ensemble: int
    fmt: str
    quality: int
    input_size: tuple[int, int]
    n_tiles: int
    want_bicubic: bool
    upload_name: str | None = None  # the uploaded file's name, for the result's (intake.result_filename)
    created_wall: float = field(default_factory=time.time)
    created: float = field(default_factory=time.monotonic)
    status: JobStatus = "queued"  # live status comes from `JobStore.status`
    error: ErrorDetail | None = None
    result: bytes | None = None
    bicubic: bytes | None = None
    output_size: tuple[int, int] | None = None
    steps_done: int = 0  # highest seen: the batcher clears its tracks when a job ends
    tiles_done: int = 0
    queue_s: float | None = None
    sample_s: float | None = None
    encode_s: float | None = None
    finished: float | None = None  # time.monotonic()
    finished_wall: float | None = None

    @property
    def size(self) -> int:
        return len(self.result or b"") + len(self.bicubic or b"")

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.fmt]

    @property
    def steps_total(self) -> int:
        return self.steps * self.n_tiles


class CountingTiles:
    """A job's tiles (`pipeline.Tiles`) that count the finished ones, for its progress."""

    def __init__(self, inner: pipeline.Tiles) -> None:
        self.inner = inner
        self.n_tiles, self.tile_shape = inner.n_tiles, inner.tile_shape
        self.done = 0

    def inputs(self, idx: list[int]) -> tuple[Tensor, Tensor | None]:
        return self.inner.inputs(idx)

    def put(self, i: int, sr: Tensor) -> None:
        self.inner.put(i, sr)
        self.done += 1

    def result(self) -> Any:
        return self.inner.result()


def live_progress(job: Job, steps: int) -> tuple[int, int]:
    """(tiles done, denoiser steps done) of a batcher job: its finished tiles (counted by CountingTiles)
    and the positions of its tiles being sampled (their tracks)."""
    done = job.tiles.done if isinstance(job.tiles, CountingTiles) else 0
    for _ in range(10):  # the worker thread mutates the dict; a copy is taken between its changes
        try:
            tracks = list(job.tracks.values())
        except RuntimeError:
            continue
        return done, done * steps + sum(min(tr.pos, steps) for tr in tracks)
    return done, done * steps


class JobStore:
    """The jobs of one service instance (thread-safe)."""

    def __init__(self, service: Service, settings: Settings, metrics: Metrics) -> None:
        self.service = service
        self.settings = settings
        self.metrics = metrics
        self._jobs: dict[str, JobRecord] = {}
        self._gone: OrderedDict[str, tuple[float, str]] = OrderedDict()  # id -> (forget at, why)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="samdiffsr-jobs")
        for s in STATUSES:
            metrics.jobs.labels(status=s).set_function(lambda s=s: self.count(s))
            metrics.jobs_finished.labels(status=s)
        metrics.job_store_bytes.set_function(self.bytes_held)

    # ------------------------------------------------------------------ submitting and reading

    def add(self, acc: intake.Accepted, bicubic: bool = False) -> JobRecord:
        """Track an accepted request (already on the batcher) as a job."""
        img = acc.prep.image
        rec = JobRecord(id="job_" + secrets.token_urlsafe(24), request_id=acc.request_id, acc=acc, batch_job=acc.job,
                        model=acc.model.id,
                        steps=acc.steps, sampler=acc.sampler, seed=acc.seed, ensemble=acc.ensemble, fmt=acc.fmt,
                        quality=acc.quality,
                        input_size=(img.width, img.height), n_tiles=acc.job.n_tiles, want_bicubic=bicubic,
                        upload_name=acc.upload_name)
        with self._lock:
            self._jobs[rec.id] = rec
        acc.job.future.add_done_callback(lambda fut: self._pool.submit(self._finish, rec, fut))
        return rec

    def get(self, job_id: str) -> JobRecord:
        """The job, or JobNotFound / JobExpired."""
        self.sweep()
        with self._lock:
            rec = self._jobs.get(job_id)
            gone = self._gone.get(job_id)
        if rec is not None:
            return rec
        if gone is not None:
            raise JobExpired(f"job {job_id} has expired: {gone[1]}")
        raise JobNotFound(f"no job {job_id!r} (unknown id, or expired and forgotten)")

    def status(self, rec: JobRecord) -> JobStatus:
        if rec.status in FINAL:
            return rec.status
        return "running" if rec.batch_job.started is not None else "queued"

    def progress(self, rec: JobRecord) -> tuple[int, int]:
        """(tiles done, denoiser steps done), never going back."""
        if rec.status not in FINAL:
            tiles, steps = live_progress(rec.batch_job, rec.steps)
            rec.tiles_done, rec.steps_done = max(rec.tiles_done, tiles), max(rec.steps_done, steps)
        return rec.tiles_done, rec.steps_done

    def expires_at(self, rec: JobRecord) -> float | None:
        """Wall-clock time when a finished job expires (None while it runs)."""
        return None if rec.finished_wall is None else rec.finished_wall + self.settings.job_ttl_s

    def count(self, status: JobStatus) -> int:
        with self._lock:
            recs = list(self._jobs.values())
        return sum(self.status(r) == status for r in recs)

    def bytes_held(self) -> int:
        with self._lock:
            return sum(r.size for r in self._jobs.values())

    # ------------------------------------------------------------------ cancelling and expiry

    def cancel(self, rec: JobRecord) -> JobStatus:
        """Cancel a queued or running job (its tiles leave the batch at once); forget a finished
        one with its result. Returns the job's status after the call."""
        with self._lock:
            final = rec.status in FINAL
            if not final:
                self._end(rec, "cancelled")
            else:
                self._forget(rec, "deleted by its owner")
        if final:
            return rec.status
        if self.service.batcher is not None:
            self.service.batcher.cancel(rec.batch_job, "cancelled by the client")
        return "cancelled"

    def cancel_unfinished(self) -> int:
        """Cancel every queued or running job (the server is shutting down: nobody could fetch their results);
        returns how many."""
        with self._lock:
            recs = [r for r in self._jobs.values() if r.status not in FINAL]
        for rec in recs:
            self.cancel(rec)
        if recs:
            log.info("shutting down: %d unfinished jobs cancelled", len(recs))
        return len(recs)

    def sweep(self) -> None:
        """Forget finished jobs past their time, and expired ids past theirs."""
        now = time.monotonic()
        ttl = self.settings.job_ttl_s
        with self._lock:
            for rec in [r for r in self._jobs.values() if r.finished is not None and now - r.finished > ttl]:
                self._forget(rec, f"results are kept for {ttl:g} s")
            while self._gone and next(iter(self._gone.values()))[0] < now:
                self._gone.popitem(last=False)

    def close(self) -> None:
        """Wait for the results being rendered (after the batcher has stopped)."""
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ internals (lock held where noted)

    def _end(self, rec: JobRecord, status: JobStatus, error: ServiceError | None = None) -> None:
        """Lock held: move a job to a final status."""
        rec.status = status
        rec.finished, rec.finished_wall = time.monotonic(), time.time()
        if error is not None:
            rec.error = ErrorDetail(code=error.code, message=error.message, request_id=rec.request_id)
        job = rec.batch_job
        if job.started is not None:
            rec.queue_s = job.started - job.submitted
            rec.sample_s = (job.finished or rec.finished) - job.started
        if status == "succeeded":
            rec.tiles_done, rec.steps_done = rec.n_tiles, rec.steps_total
        rec.acc = None  # free the decoded image and tiles
        self.metrics.jobs_finished.labels(status=status).inc()

    def _forget(self, rec: JobRecord, why: str) -> None:
        """Lock held: drop a job and its result; its id answers 410 for another TTL."""
        self._jobs.pop(rec.id, None)
        rec.result = rec.bicubic = None
        self._gone[rec.id] = (time.monotonic() + self.settings.job_ttl_s, why)
        while len(self._gone) > MAX_TOMBSTONES:
            self._gone.popitem(last=False)

    def _finish(self, rec: JobRecord, fut: Future) -> None:
        """Pool thread: the batcher is done with the job; render its result or record its error."""
        job = rec.batch_job
        if job.started is not None:
            self.metrics.job_queue_wait.observe(job.started - job.submitted)
        err = fut.exception()
        if err is not None:
            with self._lock:
                if rec.status in FINAL:
                    return  # cancelled by its owner
                if isinstance(err, Cancelled):
                    self._end(rec, "cancelled", err)
                    return
                e = err if isinstance(err, ServiceError) else ServiceError(f"internal error: {type(err).__name__}")
                self._end(rec, "failed", e)
            self.metrics.error(e.kind)
            return
        acc = rec.acc
        try:
            assert acc is not None
            upscaler = acc.model.upscaler
            t0 = time.monotonic()
            out, body = intake.render(upscaler, acc, fut.result(), self.metrics)
            bicubic = None
            if rec.want_bicubic:
                bicubic = encode_image(pipeline.finish(upscaler, acc.prep, acc.prep.up_tiles), acc.fmt, acc.quality)
            encode_s = time.monotonic() - t0
        except Exception as e:
            log.exception("rendering job %s failed", rec.id)
            with self._lock:
                if rec.status not in FINAL:
                    self._end(rec, "failed", ServiceError(f"internal error rendering the result: {type(e).__name__}"))
            self.metrics.error("internal")
            return
        too_large = len(body) + len(bicubic or b"") > self.settings.job_store_max_bytes
        with self._lock:
            if rec.status in FINAL:
                return
            if too_large:
                self._end(rec, "failed", ResultTooLarge(
                    f"the result ({len(body):,} bytes) is larger than the job store "
                    f"(SAMDIFFSR_JOB_STORE_MAX_BYTES = {self.settings.job_store_max_bytes:,})"))
            else:
                rec.result, rec.bicubic, rec.encode_s = body, bicubic, encode_s
                rec.output_size = (out.width, out.height)
                self._end(rec, "succeeded")
                self._make_room()
        if too_large:
            self.metrics.error(ResultTooLarge.kind)

    def _make_room(self) -> None:
        """Lock held: forget the oldest finished jobs while the results held are over the limit."""
        held = sum(r.size for r in self._jobs.values())
        for rec in sorted((r for r in self._jobs.values() if r.size), key=lambda r: r.finished or 0):
            if held <= self.settings.job_store_max_bytes:
                break
            held -= rec.size
            self._forget(rec, "evicted to keep the job store under SAMDIFFSR_JOB_STORE_MAX_BYTES")
