"""Run a real uvicorn server on loopback in a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from model.runtime import Runtime
from service.app import create_app
from service.settings import Settings


class LiveServer:
    """`with LiveServer(settings) as srv:` serves create_app(settings) at `srv.url` until the block ends."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None, ready_timeout: float = 120.0) -> None:
        self.app = create_app(settings, runtime=runtime)
        self.service = self.app.state.service
        self.ready_timeout = ready_timeout
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=settings.drain_timeout_s)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="live-server", daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("server thread exited during start-up")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.__exit__(None, None, None)
        raise TimeoutError(f"server not ready after {self.ready_timeout} s")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(60)
        self._sock.close()
