"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel

from service import deps
from service.errors import openapi_errors
from service.metrics import Metrics

router = APIRouter(tags=["operations"])


class Status(BaseModel):
    status: str


@router.get("/healthz", response_model=Status, responses=openapi_errors(503), dependencies=[Depends(deps.alive)])
async def healthz() -> Status:
    """Alive: the process serves HTTP and its worker thread runs (once started)."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses=openapi_errors(503), dependencies=[Depends(deps.accepting)])
async def readyz() -> Status:
    """Ready: model loaded and warmed up, and not shutting down."""
    return Status(status="ready")


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
async def metrics_endpoint(metrics: Annotated[Metrics, Depends(deps.metrics)]) -> Response:
    """Prometheus metrics of this instance."""
    return Response(metrics.render(), media_type=metrics.content_type)
