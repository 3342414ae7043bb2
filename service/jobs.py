"""Asynchronous jobs: upscales queued on the batcher whose results wait in memory to be fetched.

A job is an `intake.Accepted` request (already decoded, validated and submitted to the engine)
plus a record here. When the submission's future resolves, a small thread pool renders and encodes
the image (never the engine's worker thread) and keeps the bytes. Finished jobs are kept for
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
from typing import Literal

from model.imaging import MEDIA_TYPES
from service.errors import Cancelled, ErrorDetail, ServiceError
from service.intake import Accepted, Resolved
from service.metrics import Metrics
from service.results import Cancel, render, render_bicubic
from service.settings import Settings
from service.submission import Submission

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
    """One job: its parameters and submission (references, never copies), what it became. `accepted` (the
    decoded input) is dropped once the job has ended."""

    id: str
    params: Resolved
    submission: Submission
    accepted: Accepted | None
    input_size: tuple[int, int]
    want_bicubic: bool
    created_wall: float = field(default_factory=time.time)
    created: float = field(default_factory=time.monotonic)
    status: JobStatus = "queued"  # live status comes from `JobStore.status`
    error: ErrorDetail | None = None
    result: bytes | None = None
    bicubic: bytes | None = None
    output_size: tuple[int, int] | None = None
    steps_done: int = 0  # as the engine last published them; all of them once it succeeded
    tiles_done: int = 0
    queue_s: float | None = None
    sample_s: float | None = None
    encode_s: float | None = None
    finished: float | None = None  # time.monotonic()
    finished_wall: float | None = None

    @property
    def n_tiles(self) -> int:
        return self.submission.n_tiles

    @property
    def size(self) -> int:
        return len(self.result or b"") + len(self.bicubic or b"")

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.params.fmt]

    @property
    def steps_total(self) -> int:
        return self.params.steps * self.n_tiles


class JobStore:
    """The jobs of one service instance (thread-safe)."""

    def __init__(self, settings: Settings, metrics: Metrics, cancel: Cancel) -> None:
        """`cancel` takes a submission off the engine (a job cancelled by its owner)."""
        self.settings = settings
        self._cancel = cancel
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

    def add(self, accepted: Accepted, bicubic: bool = False) -> JobRecord:
        """Track an accepted request (already on the engine) as a job."""
        img = accepted.prep.image
        job = JobRecord(id="job_" + secrets.token_urlsafe(24), params=accepted.params,
                        submission=accepted.submission, accepted=accepted, input_size=(img.width, img.height),
                        want_bicubic=bicubic)
        with self._lock:
            self._jobs[job.id] = job
        accepted.submission.future.add_done_callback(lambda fut: self._pool.submit(self._finish, job, fut))
        return job

    def get(self, job_id: str) -> JobRecord:
        """The job, or JobNotFound / JobExpired."""
        self.sweep()
        with self._lock:
            job = self._jobs.get(job_id)
            gone = self._gone.get(job_id)
        if job is not None:
            return job
        if gone is not None:
            raise JobExpired(f"job {job_id} has expired: {gone[1]}")
        raise JobNotFound(f"no job {job_id!r} (unknown id, or expired and forgotten)")

    def status(self, job: JobRecord) -> JobStatus:
        if job.status in FINAL:
            return job.status
        return "running" if job.submission.started is not None else "queued"

    def progress(self, job: JobRecord) -> tuple[int, int]:
        """(tiles done, denoiser steps done): as the engine publishes them while the job runs."""
        if job.status not in FINAL:
            job.tiles_done, job.steps_done = job.submission.tiles_done, job.submission.steps_done
        return job.tiles_done, job.steps_done

    def expires_at(self, job: JobRecord) -> float | None:
        """Wall-clock time when a finished job expires (None while it runs)."""
        return None if job.finished_wall is None else job.finished_wall + self.settings.job_ttl_s

    def count(self, status: JobStatus) -> int:
        with self._lock:
            jobs = list(self._jobs.values())
        return sum(self.status(r) == status for r in jobs)

    def bytes_held(self) -> int:
        with self._lock:
            return sum(r.size for r in self._jobs.values())

    # ------------------------------------------------------------------ cancelling and expiry

    def cancel(self, job: JobRecord) -> JobStatus:
        """Cancel a queued or running job (its tiles leave the batch at once); forget a finished
        one with its result. Returns the job's status after the call."""
        with self._lock:
            final = job.status in FINAL
            if not final:
                self._end(job, "cancelled")
            else:
                self._forget(job, "deleted by its owner")
        if final:
            return job.status
        self._cancel(job.submission, "cancelled by the client")
        return "cancelled"

    def cancel_unfinished(self) -> int:
        """Cancel every queued or running job (the server is shutting down: nobody could fetch their results);
        returns how many."""
        with self._lock:
            jobs = [r for r in self._jobs.values() if r.status not in FINAL]
        for job in jobs:
            self.cancel(job)
        if jobs:
            log.info("shutting down: %d unfinished jobs cancelled", len(jobs))
        return len(jobs)

    def sweep(self) -> None:
        """Forget finished jobs past their time, and expired ids past theirs."""
        now = time.monotonic()
        ttl = self.settings.job_ttl_s
        with self._lock:
            for job in [r for r in self._jobs.values() if r.finished is not None and now - r.finished > ttl]:
                self._forget(job, f"results are kept for {ttl:g} s")
            while self._gone and next(iter(self._gone.values()))[0] < now:
                self._gone.popitem(last=False)

    def close(self) -> None:
        """Wait for the results being rendered (after the batcher has stopped)."""
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ internals (lock held where noted)

    def _end(self, job: JobRecord, status: JobStatus, error: ServiceError | None = None) -> None:
        """Lock held: move a job to a final status."""
        job.status = status
        job.finished, job.finished_wall = time.monotonic(), time.time()
        if error is not None:
            job.error = ErrorDetail(code=error.code, message=error.message, request_id=job.params.request_id)
        sub = job.submission
        if sub.started is not None:
            job.queue_s = sub.started - sub.submitted
            job.sample_s = (sub.finished or job.finished) - sub.started
        if status == "succeeded":
            job.tiles_done, job.steps_done = job.n_tiles, job.steps_total
        job.accepted = None  # free the decoded image and tiles
        self.metrics.jobs_finished.labels(status=status).inc()

    def _forget(self, job: JobRecord, why: str) -> None:
        """Lock held: drop a job and its result; its id answers 410 for another TTL."""
        self._jobs.pop(job.id, None)
        job.result = job.bicubic = None
        self._gone[job.id] = (time.monotonic() + self.settings.job_ttl_s, why)
        while len(self._gone) > MAX_TOMBSTONES:
            self._gone.popitem(last=False)

    def _finish(self, job: JobRecord, fut: Future) -> None:
        """Pool thread: the engine is done with the job; render its result or record its error."""
        sub = job.submission
        if sub.started is not None:
            self.metrics.job_queue_wait.observe(sub.started - sub.submitted)
        err = fut.exception()
        if err is not None:
            with self._lock:
                if job.status in FINAL:
                    return  # cancelled by its owner
                if isinstance(err, Cancelled):
                    self._end(job, "cancelled", err)
                    return
                e = err if isinstance(err, ServiceError) else ServiceError(f"internal error: {type(err).__name__}")
                self._end(job, "failed", e)
            self.metrics.error(e.kind)
            return
        accepted = job.accepted
        try:
            assert accepted is not None
            t0 = time.monotonic()
            out, body = render(accepted, fut.result(), self.metrics)
            bicubic = render_bicubic(accepted) if job.want_bicubic else None
            encode_s = time.monotonic() - t0
        except Exception as e:
            log.exception("rendering job %s failed", job.id)
            with self._lock:
                if job.status not in FINAL:
                    self._end(job, "failed", ServiceError(f"internal error rendering the result: {type(e).__name__}"))
            self.metrics.error("internal")
            return
        too_large = len(body) + len(bicubic or b"") > self.settings.job_store_max_bytes
        with self._lock:
            if job.status in FINAL:
                return
            if too_large:
                self._end(job, "failed", ResultTooLarge(
                    f"the result ({len(body):,} bytes) is larger than the job store "
                    f"(SAMDIFFSR_JOB_STORE_MAX_BYTES = {self.settings.job_store_max_bytes:,})"))
            else:
                job.result, job.bicubic, job.encode_s = body, bicubic, encode_s
                job.output_size = (out.width, out.height)
                self._end(job, "succeeded")
                self._make_room()
        if too_large:
            self.metrics.error(ResultTooLarge.kind)

    def _make_room(self) -> None:
        """Lock held: forget the oldest finished jobs while the results held are over the limit."""
        held = sum(r.size for r in self._jobs.values())
        for job in sorted((r for r in self._jobs.values() if r.size), key=lambda r: r.finished or 0):
            if held <= self.settings.job_store_max_bytes:
                break
            held -= job.size
            self._forget(job, "evicted to keep the job store under SAMDIFFSR_JOB_STORE_MAX_BYTES")
