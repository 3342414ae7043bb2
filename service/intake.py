"""One upscale request from its HTTP body to the engine, shared by `POST /v1/upscale` and `POST /v1/jobs`.

`accept` checks the service is accepting, reads the upload and its parameters, validates them, checks what
the image would cost, decodes and tiles it and submits it to the engine (`service.batcher`). It needs only a
`Door` of the service, not the service. Both endpoints therefore take the same inputs, enforce the same
limits and raise the same errors; `service.results` turns the engine's answer into the image.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from model.diffusion import check_steps
from model.imaging import ImageDecodeError, ImageTooLargeError, decode_image
from model.upscale import Upscaler, ensemble_flips
from service import pipeline
from service.admission import Cost, MemoryBudget, check_limits, check_result_size, check_time, estimate
from service.batcher import Batcher
from service.errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidParameter,
    MissingImage,
    UnsupportedMediaType,
    validation_message,
)
from service.metrics import Metrics
from service.middleware import request_id_of
from service.registry import Registry, ServedModel, is_lossy
from service.settings import Settings
from service.submission import Submission

MAX_SEED = 2**63 - 1
StepCount = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0})]  # its upper bound is the model's


class UpscaleParams(BaseModel):
    """Parameters of /v1/upscale, as query parameters or as multipart form fields (form wins). `steps` and
    `ensemble` are checked once, by the model's own rules, in `accept` (the schema states their bounds)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=64, description="The model to use (GET /v1/models); auto: a "
                              "real-world model for JPEG and lossy WebP uploads, otherwise a model sized for this "
                              "replica's device (a GPU model on a GPU) or else the default model; "
                              "default: the service's default model. The response's X-Model says which answered.")
    steps: StepCount | None = Field(None, description="Denoiser steps (0 to the model's max_steps); default: "
                              "the model's default_steps (GET /v1/models). 0 is the fidelity mode: the "
                              "encoder's own x4 output, the fastest; each model's default scores highest there "
                              "(0 for default and fast, 1 for real); more steps add generated detail.")
    sampler: Literal["ddim", "ddpm"] | None = Field(None, description="ddim (deterministic, default) or "
                                                   "ddpm (ancestral; with steps = max_steps exactly the "
                                                   "original sampler).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Noise seed; default random. The seed used "
                             "is returned in X-Seed; the same image, seed and parameters give the same bytes.")
    ensemble: int = Field(1, json_schema_extra={"minimum": 1, "maximum": 4}, description="Self-ensemble "
                          "members: 1 (off), 2 (the image and its mirror) or 4 (all four flips), averaged; 2x or "
                          "4x the work for a higher PSNR.")
    output_format: Literal["png", "jpeg", "jpg", "webp"] = Field("png", description="Output image format.")
    quality: int = Field(95, ge=1, le=100, description="Quality of lossy formats (jpeg, webp).")


def upscale_openapi(query: bool = False) -> dict:
    """The request body of an upscale (multipart form or raw image) for the OpenAPI docs; `query`: also
    the query parameters (for a route that reads them itself, see `read_upload`)."""
    props = {"image": {"type": "string", "format": "binary", "description": "The input image."}}
    schema = UpscaleParams.model_json_schema()
    props.update(schema["properties"])
    binary = {"schema": {"type": "string", "format": "binary"}}
    params = [{"name": k, "in": "query", "required": False, "description": v.get("description", ""),
               "schema": {x: y for x, y in v.items() if x != "description"}} for k, v in schema["properties"].items()]
    return {**({"parameters": params} if query else {}), "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": props}},
        "image/*": binary, "application/octet-stream": binary}}}


@dataclass
class Door:
    """What taking an upload needs of the service (`service.lifecycle.Service` fills the registry and the engine
    when it starts)."""

    settings: Settings
    metrics: Metrics
    budget: MemoryBudget
    check_accepting: Callable[[], None]
    registry: Registry = field(default_factory=Registry)
    engine: Batcher | None = None


@dataclass(frozen=True)
class Resolved:
    """An upload's parameters with every default filled in."""

    model: ServedModel
    steps: int
    sampler: str
    seed: int
    ensemble: int
    fmt: str  # png | jpeg | webp
    quality: int
    request_id: str
    upload_name: str | None = None  # the multipart file's name, if it had one


@dataclass
class Accepted:
    """An upload decoded, tiled and submitted to the engine."""

    params: Resolved
    prep: pipeline.Prepared
    submission: Submission
    t_start: float  # time.perf_counter() values
    t_decoded: float
    deadline: float  # time.monotonic() value
    extra: dict[str, str] = field(default_factory=dict)  # the `allowed` fields beyond UpscaleParams' (see `accept`)


async def accept(door: Door, request: Request, params: UpscaleParams | None, timeout_s: float,
                 max_result_bytes: int | None = None, allowed: frozenset[str] = frozenset()) -> Accepted:
    """Read, validate, check the cost of, decode and submit an upload; `timeout_s` counts from now (the
    request's start). `params=None` reads the query parameters here (form fields win over them).
    `max_result_bytes`: 413 before decoding when the output's uncompressed size (its bound) is larger.
    `allowed`: names of fields the endpoint takes beyond UpscaleParams (returned in `Accepted.extra`); any other
    unknown field or query parameter is a 422."""
    t_start = time.perf_counter()
    door.check_accepting()
    upload = await read_upload(request, params, allowed)
    data, given = upload.data, upload.params
    engine = door.engine
    assert engine is not None
    model = door.registry.choose(given.model, is_lossy(data))  # UnknownModel: 404 with the list
    cfg = model.runtime.config
    try:
        steps = check_steps(model.steps if given.steps is None else given.steps, cfg.timesteps)
        ensemble_flips(given.ensemble)
    except ValueError as e:
        raise InvalidParameter(str(e)) from None
    p = Resolved(model=model, steps=steps, sampler=given.sampler or model.sampler,
                 seed=given.seed if given.seed is not None else secrets.randbits(63), ensemble=given.ensemble,
                 fmt="jpeg" if given.output_format == "jpg" else given.output_format, quality=given.quality,
                 request_id=request_id_of(request.scope) or "", upload_name=upload.name)

    settings = door.settings
    # From the header, before decoding; off the event loop (an icon's header check reads its frames).
    cost = await run_in_threadpool(measure, model.upscaler, data, steps, p.ensemble, settings.max_pixels)
    reservation = None
    if cost is not None:  # the fixed limits first, then the time it would take
        check_limits(cost, settings.max_request_work, door.budget.limit)
        if max_result_bytes is not None:
            check_result_size(cost, cfg.scale, max_result_bytes, p.fmt)
        left = timeout_s - (time.perf_counter() - t_start)
        check_time(cost, engine.pace(model.id), left, engine.backlog_s(), settings.retry_after_s,
                   settings.job_timeout_s if settings.job_timeout_s > timeout_s else None)
        reservation = await door.budget.acquire_waiting(cost.memory, min(settings.admission_wait_s, left),
                                                        gone=request.is_disconnected)
    try:
        prep = await run_in_threadpool(decode_and_prepare, model.upscaler, data, settings.max_pixels)
        del data
        t_decoded = time.perf_counter()
        deadline = time.monotonic() + timeout_s - (t_decoded - t_start)
        sub = engine.submit_tiles(prep.tiles(p.fmt, p.ensemble), steps=steps, sampler=p.sampler, seed=p.seed,
                                  deadline=deadline, request_id=p.request_id, model=model.id)
    except BaseException:
        if reservation is not None:
            reservation.release()
        raise
    if reservation is not None:
        sub.future.add_done_callback(reservation.release)
    return Accepted(p, prep, sub, t_start, t_decoded, deadline, upload.extra)


FIELDS = frozenset(UpscaleParams.model_fields)


def check_names(names: list[str], allowed: frozenset[str], where: str) -> None:
    """422 naming the fields (or query parameters) that are neither UpscaleParams' nor `allowed`: a misspelt
    `stpes` must not silently get the default."""
    known = FIELDS | allowed
    unknown = sorted({n for n in names if n not in known})
    if unknown:
        noun = "form field" if where == "form" else "query parameter"
        raise InvalidParameter(f"unknown {noun}{'' if len(unknown) == 1 else 's'} {', '.join(map(repr, unknown))}; "
                               f"the {noun}s are: {', '.join(sorted(known))}")


def _params(query: UpscaleParams | None, request: Request, fields: dict[str, str], where: str) -> UpscaleParams:
    """Query parameters overridden by form fields, validated once (an invalid query value that a form
    field replaces is no error)."""
    given = query.model_dump(exclude_unset=True) if query is not None else dict(request.query_params)
    given = {k: v for k, v in given.items() if k in FIELDS}
    try:
        return UpscaleParams.model_validate({**given, **{k: v for k, v in fields.items() if k in FIELDS}})
    except ValidationError as e:
        raise InvalidParameter(validation_message(e.errors(), where)) from e


@dataclass
class Upload:
    """An upload read from its request: the image bytes, the parameters, the file's name, the allowed extras."""

    data: bytes
    params: UpscaleParams
    name: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


async def read_upload(request: Request, query: UpscaleParams | None,
                      allowed: frozenset[str] = frozenset()) -> Upload:
    """The image bytes and the parameters (form fields override query parameters; `query=None`: read
    them from the request). Unknown fields and query parameters: 422 (`check_names`)."""
    check_names(list(request.query_params), allowed, "query")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    name = None
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
        try:
            fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
            check_names(list(fields), allowed, "form")  # a file under another name: missing_image below
            params = _params(query, request, fields, "form")
            extra = {k: str(v) for k, v in request.query_params.items() if k in allowed}
            extra.update({k: v for k, v in fields.items() if k in allowed})
            image = form.get("image")
            if not isinstance(image, UploadFile):
                other = [k for k, v in form.items() if isinstance(v, UploadFile)]
                got = f" (the file came as {other[0]!r})" if other else ""
                raise MissingImage(f"no image: send it as the multipart file field 'image'{got}")
            part_type = (image.content_type or "application/octet-stream").split(";")[0].strip().lower()
            if not (part_type.startswith("image/") or part_type == "application/octet-stream"):
                raise UnsupportedMediaType(f"the 'image' part has type {part_type!r}; expected image/*")
            name = image.filename
            data = await image.read()
        finally:
            await form.close()
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        params = _params(query, request, {}, "query")
        extra = {k: str(v) for k, v in request.query_params.items() if k in allowed}
        data = await request.body()
    else:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {ctype or '(none)'!r}: send multipart/form-data with a file field "
            "'image' (curl -F image=@photo.jpg) or the raw image with Content-Type image/*")
    if not data:
        raise MissingImage("the image is empty")
    return Upload(data, params, name, extra)


def measure(upscaler: Upscaler, data: bytes, steps: int, ensemble: int, max_pixels: int) -> Cost | None:
    """The request's cost from the image header (`service.admission.estimate`), None where the header says too
    little; a header over the limits is ImageTooLarge (413), a malformed one (a truncated icon directory)
    InvalidImage (400). Blocking: run it in a thread."""
    try:
        return estimate(upscaler, data, steps, ensemble, max_pixels)
    except ImageTooLargeError as e:
        raise ImageTooLarge(str(e)) from e
    except ImageDecodeError as e:
        raise InvalidImage(str(e)) from e


def decode_and_prepare(upscaler: Upscaler, data: bytes, max_pixels: int) -> pipeline.Prepared:
    """The decoded image and its tile grid; an undecodable image is InvalidImage (400), one over `max_pixels`
    ImageTooLarge (413). Blocking: run it in a thread."""
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageTooLargeError as e:
        raise ImageTooLarge(str(e)) from e
    except ImageDecodeError as e:
        raise InvalidImage(str(e)) from e
    return pipeline.prepare(upscaler, image)
