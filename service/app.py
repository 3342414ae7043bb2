"""The HTTP API: FastAPI app factory, routes, error handlers.

`create_app(settings)` builds one independent service instance (own model, worker, metrics
registry). Request handlers decode, tile and encode images in a thread pool; only the batching
worker (service/batcher.py) runs the model.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model.imaging import MEDIA_TYPES
from model.repository import RegistryError, sources
from model.runtime import Runtime
from model.sizing import SNUG_GROW, choose_batch
from model.upscale import default_tile
from service import intake
from service.admission import MB, MemoryBudget
from service.batcher import Batcher, BatcherConfig, Job
from service.errors import (
    Cancelled,
    DeadlineExceeded,
    ErrorBody,
    NotReady,
    ServiceError,
    ShuttingDown,
    Unauthorized,
    WorkerStopped,
    error_body,
    openapi_errors,
    status_code_name,
)
from service.intake import UpscaleParams
from service.intake import upscale_openapi as _upscale_openapi
from service.intake import validation_message as _validation_message
from service.jobs import JobStore
from service.metrics import Metrics
from service.middleware import BodySizeLimitMiddleware, RequestContextMiddleware, request_id_of
from service.page import add_page
from service.registry import AUTO, Registry, ServedModel, load_models, serve_model
from service.routes_jobs import add_job_routes
from service.settings import Settings

log = logging.getLogger(__name__)
WARMUP_TIMEOUT_S = 600.0


# ----------------------------------------------------------------------------- the service state


class Service:
    """The served models (`service.registry.Registry`), their batching worker and the service's lifecycle flags."""

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
        # Snug tiles cut the work an image costs (2 CPU cores, a mix of photo sizes, `bench/tiling_bench.py`: 13%
        # less time for `default`, 16% for `fast` at 128-px tiles; docs/benchmarks.md), but tiles of different
        # images then rarely share a call: by default they are on where a call takes one tile anyway.
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
        self.batcher = Batcher(self.runtimes, BatcherConfig(
            max_batch_tiles=batch, max_active_tiles=max(batch, s.active_tiles(batch)),
            max_wait_s=s.max_batch_wait_ms / 1000, max_queue=s.max_queue, continuous=s.continuous_batching,
            reproducible=s.reproducible, retry_after_s=s.retry_after_s), self.metrics)
        self.batcher.start()
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
                job = self.batcher.submit(torch.zeros(1, 3, tile, tile),
                                          torch.zeros(1, 3, tile * scale, tile * scale),
                                          steps=min(2, m.runtime.config.timesteps), request_id="warmup", model=m.id)
                job.future.result(WARMUP_TIMEOUT_S)
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


# ----------------------------------------------------------------------------- API models


class ModelCard(BaseModel):
    """One served model: what it is, what it was trained on, and how it is served."""

    id: str = Field(description="What `model` takes on POST /v1/upscale and /v1/jobs.")
    default: bool = Field(description="Requests that name no model get this one (with the default auto: those "
                          "whose image is not lossy).")
    name: str
    summary: str = Field(description="One line: what the model is for.")
    degradation: str = Field(description="Its training inputs: bicubic (clean downscales) or real (JPEG, noise, "
                             "blur and resizing, as photos from the web and phones have).")
    scale: int
    parameters: int
    training: dict[str, Any] = Field(description="Training data and recipe, as the checkpoint records them.")
    validation: dict[str, Any] = Field(description="Validation figures recorded with the checkpoint, if any.")
    backend: str
    device: str
    sized_for: str | None = Field(description="The device type the model was sized for (its checkpoint's "
                                  "extras.device: cpu or cuda), null where it names none. With the default auto, "
                                  "a clean upload gets the first model sized for the replica's device.")
    default_steps: int
    default_sampler: str
    max_steps: int
    tile_size: int
    tile_overlap: int
    snug_tiles: bool = Field(description="Each image's tiles sized to it (up to 1.25 x tile_size; "
                             "SAMDIFFSR_SNUG_TILES, by default on where a call takes one tile).")
    max_tiles_per_batch: int
    precision: str
    continuous_batching: bool
    reproducible: bool
    ready: bool
    provenance: dict[str, Any]
    builds_on: list[dict[str, Any]] | None = Field(None, description="The pretrained networks whose published "
                                                   "weights the model is derived from: paper, weights, licence.")
    notice: str | None = Field(None, description="Their attribution and licence texts (the checkpoint's NOTICE).")


class AutoChoice(BaseModel):
    """Which model `model=auto` gives an upload, by its kind."""

    lossy: str = Field(description="The id of the model a JPEG or lossy WebP upload gets.")
    other: str = Field(description="The id of the model any other upload gets.")


class ModelList(BaseModel):
    default: str = Field(description="The model of requests that name none: an id, or auto (a real-world model "
                         "for JPEG and lossy WebP uploads, otherwise a model sized for this replica's device "
                         "(a GPU model on a GPU) or else the default model).")
    auto: AutoChoice = Field(description="What `model=auto` picks on this server, by the upload's kind.")
    models: list[ModelCard]


class Status(BaseModel):
    status: str


# ----------------------------------------------------------------------------- the app


def create_app(settings: Settings, runtime: Runtime | None = None,
               runtimes: Mapping[str, Runtime] | None = None) -> FastAPI:
    """A new, independent service instance. `runtimes` (model id -> runtime) or one `runtime` (id "default")
    skip loading the models of the settings."""
    metrics = Metrics()
    service = Service(settings, metrics, runtimes or ({"default": runtime} if runtime is not None else None))
    jobs = JobStore(service, settings, metrics)
    service.on_drain.append(jobs.cancel_unfinished)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(service.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.stop)
            await anyio.to_thread.run_sync(jobs.close)

    limits = (f"Limits: bodies up to {settings.max_upload_bytes:,} bytes, images up to "
              f"{settings.max_pixels:,} pixels, {settings.max_queue} requests in progress at once, "
              f"{settings.request_timeout_s:g} s per request.")
    app = FastAPI(
        title="SAM-DiffSR upscaler",
        version="0.1.0",
        summary="x4 diffusion super-resolution with step-level continuous batching.",
        description=("Send an image, get it back at exactly 4x its size. " + limits + " Every error has the "
                     "body `{\"error\": {\"code\", \"message\", \"request_id\"}}`."
                     + (" /v1/* requires `Authorization: Bearer <token>`." if settings.auth_token else "")),
        lifespan=lifespan,
        redirect_slashes=False,  # a trailing slash is a JSON 404, never a redirect built from the Host header
    )
    app.state.service = service
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes,
                       timeout_s=settings.request_timeout_s, metrics=metrics, cap=lambda: service.drain_deadline)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # outermost: sees every response
    _add_error_handlers(app, metrics)

    auth = [Depends(BearerAuth(settings.auth_token.get_secret_value()))] if settings.auth_token else []

    @app.get("/healthz", response_model=Status, tags=["operations"], responses=openapi_errors(503))
    async def healthz() -> Status:
        """Alive: the process serves HTTP and its worker thread runs (once started)."""
        if service.batcher is not None and not service.batcher.alive:
            raise WorkerStopped("the batching worker has stopped", retry_after_s=settings.retry_after_s)
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, tags=["operations"], responses=openapi_errors(503))
    async def readyz() -> Status:
        """Ready: model loaded and warmed up, and not shutting down."""
        service.check_accepting()
        return Status(status="ready")

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
    async def metrics_endpoint() -> Response:
        """Prometheus metrics of this instance."""
        return Response(metrics.render(), media_type=metrics.content_type)

    def card(m: ServedModel) -> ModelCard:
        default = service.registry.choose(None, lossy=False).id == m.id
        return ModelCard(**m.card(), default=default, tile_size=m.upscaler.tile,
                         tile_overlap=settings.tile_overlap, snug_tiles=m.upscaler.grow > 1,
                         continuous_batching=settings.continuous_batching,
                         reproducible=settings.reproducible, ready=service.ready.is_set())

    def loaded() -> Registry:
        if not service.registry.models:
            raise NotReady("the models are still loading", retry_after_s=settings.retry_after_s)
        return service.registry

    @app.get("/v1/models", response_model=ModelList, dependencies=auth, tags=["models"],
             responses=openapi_errors(401, 503))
    async def models() -> ModelList:
        """The served models, with their cards, and which one a request gets by default."""
        reg = loaded()
        auto = AutoChoice(lossy=reg.choose(AUTO, lossy=True).id, other=reg.choose(AUTO, lossy=False).id)
        return ModelList(default=reg.default, auto=auto, models=[card(m) for m in reg.models.values()])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, dependencies=auth, tags=["models"],
             responses=openapi_errors(401, 404, 503))
    async def model_card(model_id: str) -> ModelCard:
        """One model's card."""
        return card(loaded().get(model_id))

    @app.post(
        "/v1/upscale", dependencies=auth, tags=["upscale"], response_class=Response,
        openapi_extra=_upscale_openapi(query=True),
        responses={200: {"content": {m: {} for m in MEDIA_TYPES.values()}, "description": (
            "The image at exactly 4x. Headers: Content-Disposition (a file name: the upload's stem + _x4), "
            "X-Request-Id, X-Model (the model that answered), X-Seed (the seed "
            "used), X-Steps, X-Sampler, X-Tiles, X-Image-Size (WxH), X-Denoiser-Calls / X-Shared-Calls "
            "(denoiser calls that advanced this request / also advanced others), Server-Timing (decode, queue, "
            "sample, encode, total, in ms).")},
            **openapi_errors(400, 401, 404, 408, 413, 415, 422, 500, 503, 504)},
    )
    async def upscale(request: Request) -> Response:
        """Upscale an image x4: multipart field `image` (`curl -F image=@photo.jpg`) or the raw image as
        the body (`Content-Type: image/...`). Any mode Pillow reads: grayscale, RGBA (alpha kept),
        palette, 16-bit, EXIF-rotated; the output keeps the mode where the format allows."""
        acc = await intake.accept(service, request, None, settings.request_timeout_s)  # form over query
        assert service.batcher is not None
        job, t_start, t_decoded = acc.job, acc.t_start, acc.t_decoded
        steps, sampler, seed, fmt = acc.steps, acc.sampler, acc.seed, acc.fmt
        sr_tiles = await _wait(service.batcher, request, job, acc.deadline)
        t_sampled = time.perf_counter()
        out, body = await run_in_threadpool(intake.render, acc.model.upscaler, acc, sr_tiles, metrics)
        t_end = time.perf_counter()

        queue_s = (job.started or job.submitted) - job.submitted
        timing = {"decode": t_decoded - t_start, "queue": queue_s, "sample": t_sampled - t_decoded - queue_s,
                  "encode": t_end - t_sampled, "total": t_end - t_start}
        headers = {
            "X-Model": acc.model.id, "X-Seed": str(seed), "X-Steps": str(steps), "X-Sampler": sampler,
            "X-Ensemble": str(acc.ensemble), "X-Tiles": str(job.n_tiles),
            "X-Image-Size": f"{out.width}x{out.height}", "X-Denoiser-Calls": str(job.calls),
            "X-Shared-Calls": str(job.shared_calls),
            "Server-Timing": ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in timing.items()),
            "Content-Disposition": intake.content_disposition(intake.result_filename(acc.upload_name, fmt)),
        }
        return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)

    app.state.jobs = jobs
    add_job_routes(app, jobs, auth)
    add_page(app)
    return app


# ----------------------------------------------------------------------------- request helpers

_bearer = HTTPBearer(auto_error=False, description="The token of SAMDIFFSR_AUTH_TOKEN.")


class BearerAuth:
    """Dependency: require `Authorization: Bearer <token>` (constant-time comparison)."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()

    async def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, self.token):
            raise Unauthorized()



async def _wait(batcher: Batcher, request: Request, job: Job, deadline: float) -> torch.Tensor:
    """Wait for the job; drop it if the client disconnects or the deadline passes."""
    fut = asyncio.wrap_future(job.future)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                batcher.cancel(job, "deadline passed")
                raise DeadlineExceeded("the request's deadline passed before it finished")
            done, _ = await asyncio.wait({fut}, timeout=min(0.2, left))
            if done:
                return fut.result()
            if await request.is_disconnected():
                batcher.cancel(job, "client disconnected")
                raise Cancelled("the client disconnected")
    except BaseException:
        batcher.cancel(job, "request handler ended")  # a no-op once the job is finished
        raise
    finally:
        fut.cancel()  # no-op when done; else nobody is left to read its result


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def respond(request: Request, status: int, code: str, message: str, kind: str | None,
                headers: dict[str, str] | None = None) -> JSONResponse:
        if kind is not None:
            metrics.error(kind)
        return JSONResponse(error_body(code, message, request_id_of(request.scope)), status_code=status,
                            headers=headers)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return respond(request, exc.status, exc.code, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, 422, "invalid_parameter", _validation_message(list(exc.errors()), "request"),
                       "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or status_code_name(exc.status_code)
        kind = code if exc.status_code in (400, 408, 413) else None
        return respond(request, exc.status_code, code, str(exc.detail), kind, exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
        err = Cancelled("the client disconnected before its upload was read")
        return respond(request, err.status, err.code, err.message, err.kind)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return respond(request, 500, "internal_error", f"internal error: {type(exc).__name__}", "internal")


__all__ = ["ErrorBody", "Service", "UpscaleParams", "create_app"]
