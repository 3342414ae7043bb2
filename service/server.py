"""Run the service with uvicorn; SIGTERM drains in-flight requests before exiting."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import uvicorn

from model.repository import RegistryError, sources
from service.app import create_app
from service.lifecycle import Service
from service.logs import setup_logging
from service.middleware import JsonH11Protocol
from service.registry import check_default, load_models
from service.settings import Settings

log = logging.getLogger(__name__)
DRAIN_GRACE_S = 3.0  # after the drain deadline: time to write the 503s before connections are cut


def uvicorn_options(settings: Settings) -> dict:
    """uvicorn.Config options every server of this app uses (`serve` and service.testing.LiveServer)."""
    head_timeout = min(settings.header_timeout_s, settings.request_timeout_s)  # the head is part of the request
    return {"http": JsonH11Protocol.configured(settings.max_header_bytes, head_timeout),
            "h11_max_incomplete_event_size": settings.max_header_bytes,
            "timeout_graceful_shutdown": settings.drain_timeout_s + DRAIN_GRACE_S, "lifespan": "on",
            "access_log": False, "server_header": False}


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: mark the service as draining (readyz -> 503, new requests -> 503) at
    once; uvicorn then stops listening and waits up to the drain timeout for open requests."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info("signal %d: draining (up to %.0f s), then exiting", sig,
                     self.service.settings.drain_timeout_s)
        self.service.begin_drain()
        super().handle_exit(sig, frame)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A signal handler that does nothing (see `serve`)."""


def serve(settings: Settings) -> int:
    """Load the models and serve until SIGTERM/SIGINT. Returns a process exit code (2: a model cannot be
    served, with a message naming it)."""
    log_config = setup_logging(settings.log_format, settings.log_level)
    try:
        runtimes = load_models(sources(settings.models, settings.checkpoint, settings.models_dir),
                               settings.backend, settings.device, settings.torch_threads, settings.precision)
        check_default(settings.default_model, list(runtimes))
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(settings, runtimes=runtimes)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=log_config,
                            **uvicorn_options(settings))
    server = DrainingServer(config, app.state.service)
    # After a drain uvicorn restores the handlers it found and re-raises the signal; with these no-ops
    # in place a completed drain exits with status 0 instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore)
    server.run()
    if not server.started:
        print("error: the server did not start (see the log above)", file=sys.stderr)
        return 1
    return 0
