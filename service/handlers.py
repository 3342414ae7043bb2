"""The error handlers: every expected error answers the one JSON shape of `service.errors`, with the request's id,
and counts in `samdiffsr_errors_total`. An unexpected one (a bug) is answered in the same shape by
`service.middleware.RequestContextMiddleware`, which every request passes through before any handler."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.errors import Cancelled, ServiceError, error_body, status_code_name, validation_message
from service.metrics import Metrics
from service.middleware import request_id_of


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
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
        return respond(request, 422, "invalid_parameter", validation_message(list(exc.errors()), "request"),
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
