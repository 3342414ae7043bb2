"""What the routers may ask of the service, as FastAPI dependencies: each gives the narrow thing a route uses
(the intake's door, the registry, the job store, the metrics), never the whole `Service`."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import NotReady, Unauthorized
from service.intake import Door
from service.jobs import JobStore
from service.lifecycle import Service
from service.metrics import Metrics
from service.registry import Registry
from service.settings import Settings


def _service(request: Request) -> Service:
    return request.app.state.service


def door(request: Request) -> Door:
    """Taking uploads: settings, budget, registry, engine."""
    return _service(request).door


def registry(request: Request) -> Registry:
    """The served models; 503 while they are still loading."""
    service = _service(request)
    if not service.registry.models:
        raise NotReady("the models are still loading", retry_after_s=service.settings.retry_after_s)
    return service.registry


def ready(request: Request) -> bool:
    """Whether every model has warmed up."""
    return _service(request).ready.is_set()


def settings(request: Request) -> Settings:
    return _service(request).settings


def metrics(request: Request) -> Metrics:
    return _service(request).metrics


def jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def alive(request: Request) -> None:
    """503 worker_stopped once the engine's worker thread has died."""
    _service(request).check_alive()


def accepting(request: Request) -> None:
    """503 while loading, warming up or draining."""
    _service(request).check_accepting()


_bearer = HTTPBearer(auto_error=False, description="The token of SAMDIFFSR_AUTH_TOKEN.")


class BearerAuth:
    """Dependency: require `Authorization: Bearer <token>` (constant-time comparison)."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()

    async def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, self.token):
            raise Unauthorized()


def auth(settings: Settings) -> list:
    """The dependencies of /v1/*: the bearer token where SAMDIFFSR_AUTH_TOKEN is set, else none."""
    return [Depends(BearerAuth(settings.auth_token.get_secret_value()))] if settings.auth_token else []
