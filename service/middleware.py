"""Pure-ASGI middleware: request ids, metrics and access logs; the request body's size and time limits;
and uvicorn's HTTP/1.1 protocol with a request-head size limit answered in the JSON error shape."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import error_body
from service.metrics import Metrics

access_log = logging.getLogger("samdiffsr.access")
log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_of(scope: Scope) -> str | None:
    return scope.get("state", {}).get("request_id")


def route_of(scope: Scope) -> str:
    """The path template of the request's route (also for requests refused before routing, and for
    routes without one in the scope, like /docs), else 'unmatched'."""
    route = scope.get("route")
    if getattr(route, "path", None):
        return route.path
    for candidate in _flat(getattr(getattr(scope.get("app"), "router", None), "routes", ())):
        if candidate.matches(scope)[0] is not Match.NONE and getattr(candidate, "path", None):
            return candidate.path
    return "unmatched"


def _flat(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes, with those of included routers in their place (FastAPI keeps an included router whole and
    lists its routes' effective contexts; older versions copied the routes into the app's list)."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is None:
            yield route
        else:
            yield from _flat(c.starlette_route or c.original_route for c in contexts())


class RequestContextMiddleware:
    """Gives every request an id (from a valid X-Request-Id header, or a new one), echoes it in
    the response, counts the request in the metrics and writes one access log line.

    An exception no handler took (a bug) is answered here, inside the request's context: `500 internal_error` in
    the JSON error shape with the request's X-Request-Id, logged once with its traceback, and the connection stays
    usable (Starlette's outermost handler answered without the id and re-raised, and uvicorn then dropped the
    connection). Only when the response had already started is the exception passed on (the connection is cut:
    nothing else can end a response half sent)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status, model = 500, ""
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, model, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                model = dict(message.get("headers", [])).get(b"x-model", b"").decode("latin-1")
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started:
                raise
            log.exception("unhandled error", extra={"request_id": rid})
            self.metrics.error("internal")
            body = json.dumps(error_body("internal_error", f"internal error: {type(exc).__name__}", rid)).encode()
            await send_with_id({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - start
            path = route_of(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(route=path, method=method, status=str(status), model=model).inc()
            self.metrics.request_duration.labels(route=path, model=model).observe(elapsed)
            access_log.info("%s %s %d %.1fms", method, scope.get("path", ""), status, elapsed * 1000,
                            extra={"request_id": rid, "status": status, "duration_ms": round(elapsed * 1000, 1),
                                   "method": method, "path": scope.get("path", "")})


class BodyTooLarge(HTTPException):
    """Raised from `receive` when the body passes the limit (FastAPI passes HTTPExceptions on)."""

    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit:,} bytes")


class BodyTimeout(HTTPException):
    """Raised from `receive` when the body has not arrived by the request's deadline."""

    code = "request_timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within the request's deadline ({timeout_s:g} s)",
                         headers={"Connection": "close"})


class BodySizeLimitMiddleware:
    """Rejects bodies over `max_bytes` with 413: at once from Content-Length, else while streaming,
    before the rest is read. A body still incomplete `timeout_s` after the request started (or when
    `cap()`, e.g. the drain deadline, passes) gets 408 and its connection is closed."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None,
                 metrics: Metrics | None = None, cap: Callable[[], float | None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.cap = cap

    async def _reject(self, scope: Scope, send: Send) -> None:
        if self.metrics is not None:
            self.metrics.error("payload_too_large")
        exc = BodyTooLarge(self.max_bytes)
        body = json.dumps(error_body(exc.code, exc.detail, request_id_of(scope))).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = None
            if declared is not None and declared > self.max_bytes:
                await self._reject(scope, send)
                return
        seen = 0
        started = False
        complete = False
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal seen, complete
            if complete or deadline is None:
                message = await receive()
            else:
                capped = self.cap() if self.cap is not None else None
                until = deadline if capped is None else min(deadline, capped)
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, until - time.monotonic()))
                except TimeoutError:
                    raise BodyTimeout(self.timeout_s or 0) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._reject(scope, send)


class JsonH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the request head bounded in size and time, and protocol errors answered in the
    JSON error shape with a request id:

    - a head (request line and headers) over `max_head_bytes` gets 431, whether it arrives in pieces or at once
      (h11's own limit only counts what is still incomplete, so 120 KB in one packet passed a 16 KB limit);
    - a head not complete `head_timeout_s` after the connection opened (or after the previous response) closes the
      connection, with 408 if part of it came (slowloris clients held connections for as long as they liked);
    - a malformed request gets 400. The connection is closed in every case;
    - at shutdown (SIGTERM) an idle kept-alive connection stays open while requests are still in progress, so a
      request sent on it gets the app's answer (`503 shutting_down`) instead of a closed connection (`shutdown`).

    `configured` makes the subclass that uvicorn instantiates."""

    max_head_bytes: int = 64 * 1024
    head_timeout_s: float = 30.0

    @classmethod
    def configured(cls, max_head_bytes: int, head_timeout_s: float) -> type[JsonH11Protocol]:
        return type(cls.__name__, (cls,), {"max_head_bytes": max_head_bytes, "head_timeout_s": head_timeout_s})

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def, override]
        self._draining = False
        super().connection_made(transport)
        self._await_head()

    def _await_head(self) -> None:
        self._head = b""
        self._in_head = True
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_done(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server is shutting down (SIGTERM). uvicorn closes idle kept-alive connections at once, so a request
        a client sends on one while other requests still drain found it closed. Here an idle connection stays open
        while any connection has a request in progress, and a request sent on it meanwhile is answered (the app's
        `503 shutting_down`) before the connection closes; it closes once no request is in progress. A connection
        with a request in progress closes after its response, as in uvicorn."""
        self._draining = True
        if self.cycle is None or self.cycle.response_complete:
            self._close_when_quiet()
        else:
            super().shutdown()

    def _close_when_quiet(self) -> None:
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # closed already, or a request came: its response closes the connection
        busy = any(getattr(c, "cycle", None) is not None and not c.cycle.response_complete
                   for c in self.connections if c is not self)
        if busy:
            self.loop.call_later(0.05, self._close_when_quiet)
        else:
            super().shutdown()

    def handle_events(self) -> None:
        super().handle_events()
        if self._draining and self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # answered while shutting down: the connection closes after the response

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._in_head:
            self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head += data.lstrip(b"\r\n") if not self._head else data
            end = self._head.find(b"\r\n\r\n")
            size = len(self._head) if end < 0 else end + 4
            if size > self.max_head_bytes:
                self._head_done()
                self._error(431, "request_header_too_large", f"the request head exceeds {self.max_head_bytes:,} bytes")
                return
            if end >= 0:
                self._head_done()
        super().data_received(data)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete  # a pipelined request's head came
        if self.transport.is_closing() or not self._in_head or busy:
            return
        self._in_head = False
        if self._head:
            self._error(408, "request_timeout", f"the request head did not arrive within {self.head_timeout_s:g} s")
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._error(400, "bad_request", "invalid HTTP request")

    def _error(self, status: int, code: str, message: str) -> None:
        rid = uuid.uuid4().hex
        body = json.dumps(error_body(code, message, rid)).encode()
        reason = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}[status]
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                f"x-request-id: {rid}\r\nconnection: close\r\n\r\n")
        access_log.info("- - %d (%s)", status, code, extra={"request_id": rid, "status": status})
        self.transport.write(head.encode() + body)
        self.transport.close()
