"""`samdiffsr serve` as a process: start-up errors, SIGTERM drain, JSON logs."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from samdiffsr.cli import main
from service.testing import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SAMDIFFSR_"):
            monkeypatch.delenv(k)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield monkeypatch
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("env,expected", [
    ({"SAMDIFFSR_MAX_TILES_PER_BATCH": "0"}, "SAMDIFFSR_MAX_TILES_PER_BATCH"),
    ({"SAMDIFFSR_BACKEND": "tensorflow"}, "SAMDIFFSR_BACKEND"),
    ({"SAMDIFFSR_TILE_SIZE": "15"}, "SAMDIFFSR_TILE_SIZE must be even"),
    ({"SAMDIFFSR_DEVICE": "tpu"}, "SAMDIFFSR_DEVICE"),
    ({"SAMDIFFSR_REQUEST_TIMEOUT_S": "soon"}, "SAMDIFFSR_REQUEST_TIMEOUT_S"),
    ({"SAMDIFFSR_LOG_FORMAT": "xml"}, "SAMDIFFSR_LOG_FORMAT"),
])
def test_invalid_settings_fail_at_start_with_a_clear_message(clean_env, capsys, tiny_checkpoint, env, expected):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert main(["serve", "--checkpoint", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid settings") and expected in err


def test_unloadable_checkpoint_fails_at_start(clean_env, capsys, tmp_path):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--port", "1"]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    (tmp_path / "notackpt").mkdir()
    (tmp_path / "notackpt" / "config.json").write_text("{}")
    assert main(["serve", "--checkpoint", str(tmp_path / "notackpt"), "--port", "1"]) == 2
    assert f"{tmp_path / 'notackpt'} is not a checkpoint" in capsys.readouterr().err
    clean_env.setenv("SAMDIFFSR_DEFAULT_STEPS", "-1")
    assert main(["serve", "--checkpoint", str(tmp_path)]) == 2
    assert "SAMDIFFSR_DEFAULT_STEPS" in capsys.readouterr().err


def start_server(checkpoint: Path, log_path: Path, **env: str) -> ServerProcess:
    """`samdiffsr serve` on a tiny checkpoint with small tiles, logging JSON to `log_path`."""
    settings = dict(SAMDIFFSR_TILE_SIZE="16", SAMDIFFSR_TILE_OVERLAP="4", SAMDIFFSR_MAX_TILES_PER_BATCH="4",
                    SAMDIFFSR_DEFAULT_STEPS="2", SAMDIFFSR_TORCH_THREADS="1", SAMDIFFSR_DEVICE="cpu",
                    SAMDIFFSR_LOG_FORMAT="json")
    return ServerProcess(checkpoint, {**settings, **env}, log_path, cwd=ROOT)


def wait_sampling(srv: ServerProcess, timeout: float = 30) -> None:
    """Until the server's /metrics shows a tile being sampled."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = httpx.get(f"{srv.url}/metrics", timeout=5).text
        if any(ln.startswith("samdiffsr_tiles_in_flight ") and float(ln.split()[1]) > 0
               for ln in text.splitlines()):
            return
        time.sleep(0.02)
    raise TimeoutError("no tile started sampling")


def png_bytes(photo: Path, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.open(photo).convert("RGB").crop((0, 0, w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_sigterm_finishes_requests_in_flight_then_exits(tiny_checkpoint, photo, tmp_path):
    srv = start_server(tiny_checkpoint, tmp_path / "server.log", SAMDIFFSR_DRAIN_TIMEOUT_S="60")
    try:
        srv.wait_ready(90)
        result: list[httpx.Response] = []
        t = threading.Thread(target=lambda: result.append(httpx.post(
            f"{srv.url}/v1/upscale", params={"steps": 40}, timeout=120,
            files={"image": ("a.png", png_bytes(photo, 40, 36), "image/png")})))
        t.start()
        wait_sampling(srv)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no longer accepting connections
            httpx.get(f"{srv.url}/healthz", timeout=5)
        t.join(120)
        assert result and result[0].status_code == 200, result and result[0].text
        assert Image.open(io.BytesIO(result[0].content)).size == (160, 144)
        assert srv.proc.wait(timeout=60) == 0
    finally:
        srv.stop()
    log = srv.log_path.read_text()
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("draining" in r["message"] for r in records)
    access = [r for r in records if r["logger"] == "samdiffsr.access" and r.get("path") == "/v1/upscale"]
    assert access and access[0]["status"] == 200 and access[0]["request_id"]


def test_sigterm_drain_is_bounded_by_the_drain_timeout(tiny_checkpoint, photo, tmp_path):
    srv = start_server(tiny_checkpoint, tmp_path / "server.log", SAMDIFFSR_DRAIN_TIMEOUT_S="1")
    try:
        srv.wait_ready(90)
        result: list[object] = []

        def long_request() -> None:
            try:
                result.append(httpx.post(f"{srv.url}/v1/upscale", params={"steps": 100}, timeout=120,
                                         files={"image": ("a.png", png_bytes(photo, 64, 64), "image/png")}))
            except httpx.TransportError as e:
                result.append(e)

        t = threading.Thread(target=long_request)
        t.start()
        wait_sampling(srv)
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=60) == 0
        assert time.monotonic() - start < 15  # did not wait for the request (100 steps x 16 tiles)
        t.join(30)
        (r,) = result  # the request in flight is answered in the documented shape, not cut off
        assert isinstance(r, httpx.Response) and r.status_code == 503, r
        assert r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"]
    finally:
        srv.stop()
