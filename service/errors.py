"""Errors of the service and their one JSON shape: {"error": {"code", "message", "request_id"}}."""

from __future__ import annotations

from http import HTTPStatus

from pydantic import BaseModel


class ServiceError(Exception):
    """An error with an HTTP status, a stable machine-readable code and a human message."""

    status: int = 500
    code: str = "internal_error"
    kind: str = "internal"  # label of samdiffsr_errors_total

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidImage(ServiceError):
    status, code, kind = 400, "invalid_image", "invalid_image"


class MissingImage(ServiceError):
    status, code, kind = 422, "missing_image", "invalid_request"


class Unauthorized(ServiceError):
    status, code, kind = 401, "unauthorized", "unauthorized"

    def __init__(self, message: str = "missing or invalid bearer token") -> None:
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class PayloadTooLarge(ServiceError):
    status, code, kind = 413, "payload_too_large", "payload_too_large"


class ImageTooLarge(ServiceError):
    status, code, kind = 413, "image_too_large", "image_too_large"


class UnsupportedMediaType(ServiceError):
    status, code, kind = 415, "unsupported_media_type", "unsupported_media_type"


class InvalidParameter(ServiceError):
    status, code, kind = 422, "invalid_parameter", "invalid_request"


class Unavailable(ServiceError):
    """Base of the 503s: every one carries a Retry-After header."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, {"Retry-After": str(retry_after_s)})


class QueueFull(Unavailable):
    code, kind = "queue_full", "queue_full"


class NotReady(Unavailable):
    code, kind = "not_ready", "not_ready"


class ShuttingDown(Unavailable):
    """Draining after SIGTERM: the connection closes after this answer (`Connection: close`), so the client's next
    request opens one to a server that is not going away."""

    code, kind = "shutting_down", "shutting_down"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, retry_after_s)
        self.headers["Connection"] = "close"


class WorkerStopped(Unavailable):
    """The batching worker thread is gone (liveness fails; the orchestrator restarts the process)."""

    code, kind = "worker_stopped", "worker"


class DeadlineExceeded(ServiceError):
    status, code, kind = 504, "timeout", "timeout"


class Cancelled(ServiceError):
    """The client went away; nobody reads this response."""

    status, code, kind = 499, "cancelled", "disconnected"


class OutOfMemory(Unavailable):
    code, kind = "out_of_memory", "oom"


class WorkerError(ServiceError):
    status, code, kind = 500, "worker_error", "worker"


# --------------------------------------------------------------------------- response shape


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None = None


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


def error_body(code: str, message: str, request_id: str | None) -> dict:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def status_code_name(status: int) -> str:
    """A code for an HTTP status raised by the framework (404 -> 'not_found')."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def openapi_errors(*statuses: int) -> dict[int | str, dict]:
    """`responses=` entries for the OpenAPI docs of a route."""
    text = {
        400: "Undecodable or truncated image, or a malformed multipart body.",
        401: "Missing or wrong bearer token (only when SAMDIFFSR_AUTH_TOKEN is set).",
        404: "Unknown model id (code unknown_model); the message lists the served ones (GET /v1/models).",
        408: "The body did not arrive within SAMDIFFSR_REQUEST_TIMEOUT_S (code request_timeout); the "
             "connection is closed.",
        413: "Body over SAMDIFFSR_MAX_UPLOAD_BYTES (code payload_too_large; rejected while streaming), "
             "or image over SAMDIFFSR_MAX_PIXELS, SAMDIFFSR_MAX_REQUEST_WORK or SAMDIFFSR_MEMORY_BUDGET_MB, "
             "checked in that order, or more work than its deadline allows even on an idle server (code "
             "image_too_large; estimated from the header, before decoding).",
        415: "Body is neither multipart/form-data nor an image/* (or application/octet-stream) body.",
        422: "Invalid, missing or unknown parameter (code invalid_parameter, naming the unknown form fields or query "
             "parameters / missing_image).",
        500: "The worker failed on this request (code worker_error); other requests are not affected.",
        503: "Queue full, memory budget taken, or the work queued ahead would make this request miss its deadline "
             "(queue_full), model not ready (not_ready), shutting down "
             "(shutting_down), out of accelerator memory (out_of_memory) or batching worker stopped "
             "(worker_stopped). Retry after the Retry-After header's seconds.",
        504: "The request's deadline (SAMDIFFSR_REQUEST_TIMEOUT_S) passed (code timeout).",
    }
    return {s: {"model": ErrorBody, "description": text[s]} for s in statuses}


def validation_message(errors: list[dict], where: str) -> str:
    """pydantic's errors as one line: `field: message; ...` (`where` names a field-less error's place)."""
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "body")]
        parts.append(f"{'.'.join(loc) or where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
