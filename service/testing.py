"""Run a real server on loopback (tests, benchmarks): uvicorn in a background thread (`LiveServer`), or
`samdiffsr serve` in a subprocess (`ServerProcess`); `KeptAlive`, one HTTP/1.1 connection for several requests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import h11
import httpx
import uvicorn

from model.runtime import Runtime
from service.app import create_app
from service.server import uvicorn_options
from service.settings import Settings


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a server started in another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float, check_alive: Callable[[], None] | None = None) -> None:
    """Poll `url/readyz` until it answers 200; `check_alive` raises if the server died meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check_alive is not None:
            check_alive()
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server at {url} not ready after {timeout:g} s")


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
        config = uvicorn.Config(self.app, log_level="warning", **uvicorn_options(settings))
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="live-server", daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        try:
            wait_ready(self.url, self.ready_timeout, self._check_alive)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _check_alive(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("server thread exited during start-up")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(60)
        self._sock.close()


class ServerProcess:
    """`samdiffsr serve` in a subprocess with SAMDIFFSR_* settings; stopped with SIGTERM."""

    def __init__(self, checkpoint: Path, env: dict[str, str], log_path: Path, cwd: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full = {k: v for k, v in os.environ.items() if not k.startswith("SAMDIFFSR_")}
        full.update(env)
        self.command = [sys.executable, "-m", "samdiffsr", "serve", "--checkpoint", str(checkpoint),
                        "--host", "127.0.0.1", "--port", str(self.port)]
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.command, cwd=cwd, env=full, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        def check_alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.log_tail()}")

        try:
            wait_ready(self.url, timeout, check_alive)
        except TimeoutError as e:
            raise TimeoutError(f"{e}:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@dataclass
class Answer:
    """One response read by `KeptAlive`: status, headers (lower-case names; the last of repeated ones), body."""

    status: int
    headers: dict[str, str]
    body: bytes


class KeptAlive:
    """One HTTP/1.1 connection to `url` for several requests (h11), so a test can tell whether the server kept it
    open: `request` raises ConnectionError when the server closed or reset it instead of answering."""

    def __init__(self, url: str, timeout: float = 60.0, host: str | None = None) -> None:
        addr, port = url.removeprefix("http://").split(":")
        self.host = host or f"{addr}:{port}"
        self.sock = socket.create_connection((addr, int(port)), timeout=timeout)
        self.conn = h11.Connection(our_role=h11.CLIENT)

    def __enter__(self) -> KeptAlive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, method: str, target: str, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()) -> None:
        """Send one request (all of it)."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        given = list(headers)
        names = {k.lower() for k, _ in given}
        head = ([] if "host" in names else [("Host", self.host)]) + given
        if "content-length" not in names and "transfer-encoding" not in names:
            head.append(("Content-Length", str(len(body))))
        out = self.conn.send(h11.Request(method=method, target=target, headers=head))
        if body:
            out += self.conn.send(h11.Data(data=body))
        out += self.conn.send(h11.EndOfMessage())
        self.sock.sendall(out)

    def receive(self) -> Answer:
        """Read one response; ConnectionError if the connection ends first."""
        status, head, body = 0, {}, bytearray()
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                raise ConnectionError(f"malformed response: {e}") from e
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                head = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, head, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection before answering")

    def request(self, method: str, target: str, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()) -> Answer:
        """Send a request and read its response on this connection."""
        self.send(method, target, body, headers)
        return self.receive()

    @property
    def closing(self) -> bool:
        """The server said it closes the connection after its last response (Connection: close)."""
        return self.conn.their_state is h11.MUST_CLOSE or self.conn.our_state is h11.MUST_CLOSE
