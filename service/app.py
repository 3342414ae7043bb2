"""The HTTP API: `create_app(settings)` wires one independent service instance (its own models, engine,
metrics registry and job store) to the routers of `service.routes` and the page.

Request handlers decode, tile and encode images in a thread pool; only the engine's worker thread
(`service.batcher`) runs the models.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from model.runtime import Runtime
from service import deps
from service.errors import ErrorBody
from service.handlers import add_error_handlers
from service.intake import UpscaleParams
from service.jobs import JobStore
from service.lifecycle import Service
from service.metrics import Metrics
from service.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from service.page import add_page
from service.routes import jobs, models, operations, upscale
from service.settings import Settings


def create_app(settings: Settings, runtime: Runtime | None = None,
               runtimes: Mapping[str, Runtime] | None = None) -> FastAPI:
    """A new, independent service instance. `runtimes` (model id -> runtime) or one `runtime` (id "default")
    skip loading the models of the settings."""
    metrics = Metrics()
    service = Service(settings, metrics, runtimes or ({"default": runtime} if runtime is not None else None))
    store = JobStore(settings, metrics, cancel=service.cancel)
    service.on_drain.append(store.cancel_unfinished)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(service.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.stop)
            await anyio.to_thread.run_sync(store.close)

    app = FastAPI(title="SAM-DiffSR upscaler", version="0.1.0", description=_description(settings),
                  summary="x4 diffusion super-resolution with step-level continuous batching.", lifespan=lifespan,
                  redirect_slashes=False)  # a trailing slash is a JSON 404, never a redirect built from the Host
    app.state.service, app.state.jobs = service, store
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes,
                       timeout_s=settings.request_timeout_s, metrics=metrics, cap=lambda: service.drain_deadline)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # outermost: sees every response
    add_error_handlers(app, metrics)
    app.include_router(operations.router)
    for router in (models.router, upscale.router, jobs.router):
        app.include_router(router, dependencies=deps.auth(settings))
    add_page(app)
    return app


def _description(settings: Settings) -> str:
    """The API's description in the OpenAPI document: its limits, its errors' shape, its authentication."""
    limits = (f"Limits: bodies up to {settings.max_upload_bytes:,} bytes, images up to "
              f"{settings.max_pixels:,} pixels, {settings.max_queue} requests in progress at once, "
              f"{settings.request_timeout_s:g} s per request.")
    return ("Send an image, get it back at exactly 4x its size. " + limits + " Every error has the "
            "body `{\"error\": {\"code\", \"message\", \"request_id\"}}`."
            + (" /v1/* requires `Authorization: Bearer <token>`." if settings.auth_token else ""))


__all__ = ["ErrorBody", "Service", "UpscaleParams", "create_app"]
