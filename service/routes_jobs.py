"""The asynchronous jobs API: /v1/jobs (submit, status, result, cancel, progress events).

The same inputs, limits and errors as `POST /v1/upscale` (service/intake.py), the same batching
worker; the job store (service/jobs.py) keeps the results.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from model.imaging import MEDIA_TYPES
from service import intake
from service.errors import ErrorDetail, InvalidParameter, openapi_errors
from service.intake import UpscaleParams
from service.jobs import FINAL, CountingTiles, JobNotDone, JobRecord, JobStatus, JobStore

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
        raise InvalidParameter(intake.validation_message(e.errors(), "form")) from e


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


def _urls(rec: JobRecord) -> JobUrls:
    base = f"/v1/jobs/{rec.id}"
    return JobUrls(status=base, result=f"{base}/result", events=f"{base}/events",
                   bicubic=f"{base}/bicubic" if rec.want_bicubic else None)


def _when(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


def job_info(store: JobStore, rec: JobRecord) -> JobInfo:
    """The job's public state."""
    tiles, steps = store.progress(rec)
    status = store.status(rec)
    total = rec.steps_total
    fraction = steps / total if total else tiles / rec.n_tiles
    end = rec.finished_wall if rec.finished_wall is not None else datetime.now(UTC).timestamp()
    return JobInfo(
        id=rec.id, status=status,
        progress=JobProgress(fraction=round(fraction, 4), steps_done=steps, steps_total=total, tiles_done=tiles,
                             tiles_total=rec.n_tiles),
        params=JobParams(model=rec.model, steps=rec.steps, sampler=rec.sampler, seed=rec.seed, ensemble=rec.ensemble,
                         output_format=rec.fmt, quality=rec.quality),
        input_size=rec.input_size, output_size=rec.output_size, media_type=rec.media_type,
        created_at=_when(rec.created_wall), finished_at=_when(rec.finished_wall),
        expires_at=_when(store.expires_at(rec)),
        timings=JobTimings(queue_s=rec.queue_s, sample_s=rec.sample_s, encode_s=rec.encode_s,
                           total_s=round(end - rec.created_wall, 4)),
        error=rec.error, urls=_urls(rec))


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


def add_job_routes(app: FastAPI, store: JobStore, auth: list[Any]) -> None:
    """Mount /v1/jobs on `app`; `auth` is the bearer-token dependency list of /v1/*."""
    service = store.service
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=auth, redirect_slashes=False)
    not_found = openapi_errors(401) | {404: {"description": "Unknown job id."},
                                       410: {"description": "The job has expired (code job_expired)."}}

    @router.post("", status_code=202, response_model=JobCreated, openapi_extra=intake.upscale_openapi(),
                 responses={202: {"description": "Accepted. Location: the job's status URL; X-Model: the model "
                                       "that will answer."},
                            **openapi_errors(400, 401, 404, 413, 415, 422, 503)})
    async def create_job(request: Request, response: Response, params: Annotated[UpscaleParams, Query()],
                         options: Annotated[JobOptions, Query()]) -> JobCreated:
        """Submit an upscale as a job: the same body and parameters as POST /v1/upscale. The image is
        decoded and checked at once (the same 4xx as /v1/upscale); then poll the status URL, or follow
        its events, and fetch the result when the status is `succeeded`."""
        keep = store.settings.job_store_max_bytes // (2 if options.bicubic else 1)  # the result, and its bicubic
        acc = await intake.accept(service, request, params, store.settings.job_timeout_s, wrap_tiles=CountingTiles,
                                  max_result_bytes=keep, allowed=JOB_FIELDS)
        options = job_options(options, acc.extra)
        rec = store.add(acc, bicubic=options.bicubic)
        response.headers["Location"] = _urls(rec).status
        response.headers["X-Model"] = rec.model
        return JobCreated(id=rec.id, status=store.status(rec), urls=_urls(rec))

    @router.get("/{job_id}", response_model=JobInfo, responses=not_found)
    async def get_job(job_id: str) -> JobInfo:
        """Status (queued, running, succeeded, failed, cancelled), progress, timings and error of a job."""
        return job_info(store, store.get(job_id))

    def _image(rec: JobRecord, data: bytes | None, what: str) -> Response:
        status = store.status(rec)
        if data is None:
            if status in FINAL and status != "succeeded":
                msg = f"the job {status}" + (f": {rec.error.message}" if rec.error else "")
                raise JobNotDone(msg + f"; it has no {what}")
            raise not_done(job_info(store, rec), what, store.settings.retry_after_s)
        assert rec.output_size is not None
        w, h = rec.output_size
        name = intake.result_filename(rec.upload_name, rec.fmt, fallback=rec.id)
        if what == "bicubic image":
            name = name.replace("_x4.", "_x4-bicubic.")
        return Response(data, media_type=MEDIA_TYPES[rec.fmt], headers={
            "X-Model": rec.model, "X-Seed": str(rec.seed), "X-Steps": str(rec.steps), "X-Sampler": rec.sampler,
            "X-Ensemble": str(rec.ensemble), "X-Tiles": str(rec.n_tiles), "X-Image-Size": f"{w}x{h}",
            "Content-Disposition": intake.content_disposition(name)})

    image_responses = {200: {"content": {m: {} for m in MEDIA_TYPES.values()}, "description": "The image."},
                       409: {"description": "Not finished yet (job_not_done; Retry-After: about the seconds it "
                             "still needs; X-Job-Progress: the fraction done, also in the message), or it failed "
                             "or was cancelled (job_not_done, no Retry-After)."},
                       **not_found}

    @router.get("/{job_id}/result", response_class=Response, responses=image_responses)
    async def get_result(job_id: str) -> Response:
        """The upscaled image of a succeeded job: the same bytes as POST /v1/upscale with its seed."""
        rec = store.get(job_id)
        return _image(rec, rec.result, "result")

    @router.get("/{job_id}/bicubic", response_class=Response, responses=image_responses)
    async def get_bicubic(job_id: str) -> Response:
        """The bicubic x4 of the input (jobs submitted with bicubic=true), in the result's format."""
        rec = store.get(job_id)
        if not rec.want_bicubic:
            raise JobNotDone("the job was submitted without bicubic=true; it has no bicubic image")
        return _image(rec, rec.bicubic, "bicubic image")

    @router.delete("/{job_id}", response_model=JobInfo, responses=not_found)
    async def delete_job(job_id: str) -> JobInfo:
        """Cancel a queued or running job (its tiles leave the batch at once), or forget a finished one
        and its result. Returns the job's state after the call."""
        rec = store.get(job_id)
        store.cancel(rec)
        return job_info(store, rec)

    @router.get("/{job_id}/events", response_class=StreamingResponse, responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events: `status` events "
              "whose data is the job's state (as GET /v1/jobs/{id}) when its status or progress changes; "
              "the stream ends after the final status."}, **not_found})
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Progress as Server-Sent Events (for clients that can send the bearer token, if any)."""
        rec = store.get(job_id)

        async def stream() -> AsyncIterator[str]:
            last, quiet = None, 0.0
            while True:
                info = job_info(store, rec)
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

    app.include_router(router)
