"""Logging set-up: human-readable text or one JSON object per line."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from types import TracebackType

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

_EXTRA = ("request_id", "status", "duration_ms", "method", "path", "seed", "tiles", "steps")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _EXTRA:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# Every character some common reader takes for a line break, and the other control characters: the C0 controls
# (LF, CR, VT, FF, the file/group/record separators 0x1c-0x1e that Python's str.splitlines splits on, ESC ...),
# DEL, the C1 controls (NEL, U+0085, included) and the Unicode line and paragraph separators U+2028 and U+2029.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The same, but for LF: a traceback keeps its own lines.
_CONTROL_BUT_LF = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """Control characters and line breaks (CR, LF, ESC, NEL, U+2028, U+2029 ...) as \\xNN or \\uNNNN: a client's
    URL cannot start a forged log line, whatever its reader splits lines on."""
    return _CONTROL.sub(_escape, text)


class TextFormatter(logging.Formatter):
    """One line per event: `time level logger: message [request id]`, control characters and line breaks in the
    message escaped (a traceback still follows on its own lines, with every line break but LF escaped)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: ExcInfo) -> str:
        return _CONTROL_BUT_LF.sub(_escape, super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _CONTROL_BUT_LF.sub(_escape, super().formatStack(stack_info))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [{rid}]" if rid else line


def setup_logging(fmt: str = "text", level: str = "info") -> dict:
    """Configure the root logger; returns a uvicorn `log_config` that uses the same handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers propagate to the root handler; its access log is replaced by ours.
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            "uvicorn": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
        },
    }
