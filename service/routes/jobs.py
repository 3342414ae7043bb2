"""The asynchronous jobs API: /v1/jobs (submit, status, result, cancel, progress events).

The same inputs, limits and errors as `POST /v1/upscale` (service/intake.py), the same engine; the job store
(service/jobs.py) keeps the results.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from model.imaging import MEDIA_TYPES
from service import deps, intake, results
from service.errors import ErrorDetail, InvalidParameter, openapi_errors, validation_message
from service.intake import Door, UpscaleParams
from service.jobs import FINAL, JobNotDone, JobRecord, JobStatus, JobStore

EVENTS_POLL_S = 0.25
EVENTS_KEEPALIVE_S = 15.0


class JobOptions(BaseModel):
    """Options of a job beyond those of /v1/upscale."""

    bicubic: bool = Field(False, description="Also keep the plain bicubic x4 of the input (the up(LR) the "
                          "model starts from), at GET /v1/jobs/{id}/bicubic, for before/after comparisons.")


JOB_FIELDS = frozenset(JobOptions.model_fields)


def job_options(query: JobOptions, fields: dict[str, str]) -> JobOptions:
    """The job's options: query parameters, overridden by form fields of the same names (422 if invalid)."""
    if not fields:
        return query
    try:
        return JobOptions.model_validate({**query.model_dump(exclude_unset=True), **fields})
    except ValidationError as e:
        raise InvalidParameter(validation_message(e.errors(), "form")) from e


class JobUrls(BaseModel):
    status: str
    result: str
    events: str
    bicubic: str | None = None


class JobCreated(BaseModel):
    id: str
    status: JobStatus
    urls: JobUrls


class JobProgress(BaseModel):
    fraction: float = Field(description="Denoiser steps done / total (tiles done / total when steps = 0).")
    steps_done: int
    steps_total: int
    tiles_done: int
    tiles_total: int


class JobParams(BaseModel):
    model: str = Field(description="The model that answers (the request's, or the default's choice).")
    steps: int
    sampler: str
    seed: int
    ensemble: int
    output_format: str
    quality: int


class JobTimings(BaseModel):
    queue_s: float | None = Field(None, description="Submission to the first tile sampling.")
    sample_s: float | None = Field(None, description="First tile sampling to the last denoiser step.")
    encode_s: float | None = Field(None, description="Assembling and encoding the image.")
    total_s: float = Field(description="Submission to the end (or to now, while it runs).")


class JobInfo(BaseModel):
    id: str
    status: JobStatus
    progress: JobProgress
    params: JobParams
    input_size: tuple[int, int]
    output_size: tuple[int, int] | None
    media_type: str
    created_at: datetime
    finished_at: datetime | None
    expires_at: datetime | None = Field(description="When a finished job and its result are forgotten.")
    timings: JobTimings
    error: ErrorDetail | None = Field(description="Set when the job failed: the error the synchronous "
                                      "endpoint would have answered.")
    urls: JobUrls


def _urls(job: JobRecord) -> JobUrls:
    base = f"/v1/jobs/{job.id}"
    return JobUrls(status=base, result=f"{base}/result", events=f"{base}/events",
                   bicubic=f"{base}/bicubic" if job.want_bicubic else None)


def _when(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


def job_info(store: JobStore, job: JobRecord) -> JobInfo:
    """The job's public state."""
    tiles, steps = store.progress(job)
    total, p = job.steps_total, job.params
    fraction = steps / total if total else tiles / job.n_tiles
    end = job.finished_wall if job.finished_wall is not None else datetime.now(UTC).timestamp()
    return JobInfo(
        id=job.id, status=store.status(job),
        progress=JobProgress(fraction=round(fraction, 4), steps_done=steps, steps_total=total, tiles_done=tiles,
                             tiles_total=job.n_tiles),
        params=JobParams(model=p.model.id, steps=p.steps, sampler=p.sampler, seed=p.seed, ensemble=p.ensemble,
                         output_format=p.fmt, quality=p.quality),
        input_size=job.input_size, output_size=job.output_size, media_type=job.media_type,
        created_at=_when(job.created_wall), finished_at=_when(job.finished_wall),
        expires_at=_when(store.expires_at(job)),
        timings=JobTimings(queue_s=job.queue_s, sample_s=job.sample_s, encode_s=job.encode_s,
                           total_s=round(end - job.created_wall, 4)),
        error=job.error, urls=_urls(job))


def not_done(info: JobInfo, what: str, retry_after_s: int) -> JobNotDone:
    """409 for a job still queued or running: its progress in the message and X-Job-Progress (the fraction done),
    and Retry-After: the time it still needs at its pace so far (`retry_after_s` until it has made progress), at
    most a minute."""
    p = info.progress
    done = f"{p.steps_done} of {p.steps_total} denoiser steps" if p.steps_total else \
        f"{p.tiles_done} of {p.tiles_total} tiles"
    left = info.timings.total_s * (1 - p.fraction) / p.fraction if p.fraction > 0 else retry_after_s
    wait = min(60, max(1, math.ceil(left)))
    return JobNotDone(f"the job is {info.status} ({p.fraction:.0%} done: {done}); fetch its {what} once its status is "
                      f"succeeded, in about {wait} s", headers={"Retry-After": str(wait),
                                                                 "X-Job-Progress": f"{p.fraction:.4f}"})


router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
Store = Annotated[JobStore, Depends(deps.jobs)]
NOT_FOUND = openapi_errors(401) | {404: {"description": "Unknown job id."},
                                   410: {"description": "The job has expired (code job_expired)."}}
IMAGE_RESPONSES = {200: {"content": {m: {} for m in MEDIA_TYPES.values()}, "description": "The image."},
                   409: {"description": "Not finished yet (job_not_done; Retry-After: about the seconds it "
                         "still needs; X-Job-Progress: the fraction done, also in the message), or it failed "
                         "or was cancelled (job_not_done, no Retry-After)."},
                   **NOT_FOUND}


@router.post("", status_code=202, response_model=JobCreated, openapi_extra=intake.upscale_openapi(),
             responses={202: {"description": "Accepted. Location: the job's status URL; X-Model: the model "
                                   "that will answer."},
                        **openapi_errors(400, 401, 404, 413, 415, 422, 503)})
async def create_job(request: Request, response: Response, params: Annotated[UpscaleParams, Query()],
                     options: Annotated[JobOptions, Query()], store: Store,
                     door: Annotated[Door, Depends(deps.door)]) -> JobCreated:
    """Submit an upscale as a job: the same body and parameters as POST /v1/upscale. The image is
    decoded and checked at once (the same 4xx as /v1/upscale); then poll the status URL, or follow
    its events, and fetch the result when the status is `succeeded`."""
    keep = store.settings.job_store_max_bytes // (2 if options.bicubic else 1)  # the result, and its bicubic
    accepted = await intake.accept(door, request, params, store.settings.job_timeout_s, max_result_bytes=keep,
                                   allowed=JOB_FIELDS)
    options = job_options(options, accepted.extra)
    job = store.add(accepted, bicubic=options.bicubic)
    response.headers["Location"] = _urls(job).status
    response.headers["X-Model"] = job.params.model.id
    return JobCreated(id=job.id, status=store.status(job), urls=_urls(job))


@router.get("/{job_id}", response_model=JobInfo, responses=NOT_FOUND)
async def get_job(job_id: str, store: Store) -> JobInfo:
    """Status (queued, running, succeeded, failed, cancelled), progress, timings and error of a job."""
    return job_info(store, store.get(job_id))


def _image(store: JobStore, job: JobRecord, data: bytes | None, what: str) -> Response:
    """A job's image (`what`: result or bicubic image) with the result headers, or 409 while it has none."""
    status = store.status(job)
    if data is None:
        if status in FINAL and status != "succeeded":
            msg = f"the job {status}" + (f": {job.error.message}" if job.error else "")
            raise JobNotDone(msg + f"; it has no {what}")
        raise not_done(job_info(store, job), what, store.settings.retry_after_s)
    assert job.output_size is not None
    p = job.params
    name = results.result_filename(p.upload_name, p.fmt, fallback=job.id)
    if what == "bicubic image":
        name = name.replace("_x4.", "_x4-bicubic.")
    return Response(data, media_type=MEDIA_TYPES[p.fmt],
                    headers=results.result_headers(p, job.n_tiles, job.output_size, name))


@router.get("/{job_id}/result", response_class=Response, responses=IMAGE_RESPONSES)
async def get_result(job_id: str, store: Store) -> Response:
    """The upscaled image of a succeeded job: the same bytes as POST /v1/upscale with its seed."""
    job = store.get(job_id)
    return _image(store, job, job.result, "result")


@router.get("/{job_id}/bicubic", response_class=Response, responses=IMAGE_RESPONSES)
async def get_bicubic(job_id: str, store: Store) -> Response:
    """The bicubic x4 of the input (jobs submitted with bicubic=true), in the result's format."""
    job = store.get(job_id)
    if not job.want_bicubic:
        raise JobNotDone("the job was submitted without bicubic=true; it has no bicubic image")
    return _image(store, job, job.bicubic, "bicubic image")


@router.delete("/{job_id}", response_model=JobInfo, responses=NOT_FOUND)
async def delete_job(job_id: str, store: Store) -> JobInfo:
    """Cancel a queued or running job (its tiles leave the batch at once), or forget a finished one
    and its result. Returns the job's state after the call."""
    job = store.get(job_id)
    store.cancel(job)
    return job_info(store, job)


@router.get("/{job_id}/events", response_class=StreamingResponse, responses={
    200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events: `status` events "
          "whose data is the job's state (as GET /v1/jobs/{id}) when its status or progress changes; "
          "the stream ends after the final status."}, **NOT_FOUND})
async def job_events(job_id: str, request: Request, store: Store) -> StreamingResponse:
    """Progress as Server-Sent Events (for clients that can send the bearer token, if any)."""
    job = store.get(job_id)

    async def stream() -> AsyncIterator[str]:
        last, quiet = None, 0.0
        while True:
            info = job_info(store, job)
            key = (info.status, info.progress.steps_done, info.progress.tiles_done)
            if key != last:
                last, quiet = key, 0.0
                yield f"event: status\ndata: {json.dumps(info.model_dump(mode='json'))}\n\n"
            elif quiet >= EVENTS_KEEPALIVE_S:
                quiet = 0.0
                yield ": keep-alive\n\n"
            if info.status in FINAL or await request.is_disconnected():
                return
            await asyncio.sleep(EVENTS_POLL_S)
            quiet += EVENTS_POLL_S

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
