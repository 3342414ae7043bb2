"""Reliability of the HTTP service against hostile clients (issue 10): cost admission before decoding,
bounded memory, tiles that fit strips, stalled, cancelled and oversized requests, WebP alpha, form
fields over query values, and metric labels. Real servers on loopback with the tiny model."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.admission import MB, Cost, MemoryBudget, check_limits
from service.errors import ImageTooLarge, QueueFull
from service.settings import Settings
from service.testing import LiveServer, free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(tile_size=16, tile_overlap=4, max_tiles_per_batch=4, default_steps=2, torch_threads=1,
            max_pixels=64 * 64, max_upload_bytes=256 * 1024, drain_timeout_s=5, device="cpu",
            request_timeout_s=3, max_header_bytes=8 * 1024)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with LiveServer(Settings(checkpoint=tiny_checkpoint, **BASE)) as srv:
        yield srv


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def upload(c: httpx.Client, data: bytes, params: dict | None = None, **kw) -> httpx.Response:
    return c.post("/v1/upscale", files={"image": ("a.png", data, "image/png")}, params=params or {}, **kw)


def error_of(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == code
    return r.json()["error"]["message"]


def errors_total(url: str, kind: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f'samdiffsr_errors_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0


def requests_total(url: str, route: str, status: int) -> float:
    """Requests of `route` answered `status` (GET and POST, any model)."""
    return sum(s.value for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
               for s in fam.samples if s.name == "samdiffsr_requests_total"
               and s.labels["route"] == route and s.labels["status"] == str(status))


def raw(url: str, data: bytes, close_after: bool = False, timeout: float = 30) -> bytes:
    """Send bytes on a fresh connection; read until the server closes it (or return at once)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        if close_after:
            return b""
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


# ----------------------------------------------------------------------------- admission (no server)


def test_limits_say_the_limit_and_how_to_get_under_it():
    with pytest.raises(ImageTooLarge, match=r"1,369 tiles x 10 steps = 13,690 tile-steps.*4,096.*steps <= 1"):
        check_limits(Cost(2048, 2048, 1369, 10, 10 * MB), max_work=4096, budget_bytes=100 * MB)
    with pytest.raises(ImageTooLarge, match=r"needs about 500 MiB.*limit \(SAMDIFFSR_MEMORY_BUDGET_MB\) is 100 MiB"):
        check_limits(Cost(2048, 2048, 10, 1, 500 * MB), max_work=4096, budget_bytes=100 * MB)
    check_limits(Cost(64, 64, 1, 20, MB), max_work=4096, budget_bytes=100 * MB)
    with pytest.raises(ImageTooLarge, match=r"800 tiles x 1 steps.*smaller ensemble \(this one has 4 members\)"):
        check_limits(Cost(1024, 1024, 800, 1, MB, ensemble=4), max_work=400, budget_bytes=100 * MB)


def test_memory_budget_admits_what_fits_next_to_the_requests_in_progress():
    budget = MemoryBudget(100, retry_after_s=5)
    first = budget.acquire(70)
    with pytest.raises(QueueFull) as err:
        budget.acquire(40)
    assert err.value.headers["Retry-After"] == "5"
    second = budget.acquire(30)
    first.release()
    first.release()  # idempotent
    assert budget.used == 30
    second.release()
    assert budget.acquire(150).nbytes == 150  # alone, a request may use it all (check_limits caps it)


# ----------------------------------------------------------------------------- the live server


def test_strip_gets_tiles_that_fit_it(server, photo):
    strip = Image.open(photo).convert("RGB").crop((0, 100, 400, 101)).resize((2000, 1))
    with httpx.Client(base_url=server.url, timeout=120) as c:
        r = upload(c, png(strip), {"steps": 1})
    assert r.status_code == 200, r.text
    assert r.headers["x-image-size"] == "8000x4"
    assert int(r.headers["x-tiles"]) == 34  # 4x64 tiles (the area of a 16x16 one), not 167 of 16x16
    assert Image.open(io.BytesIO(r.content)).size == (8000, 4)


def test_webp_keeps_alpha(server, photo):
    rgba = Image.open(photo).convert("RGBA").crop((0, 0, 12, 10))
    rgba.putalpha(Image.linear_gradient("L").resize((12, 10)))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = upload(c, png(rgba), {"output_format": "webp", "quality": 90})
    out = Image.open(io.BytesIO(r.content))
    assert out.format == "WEBP" and out.mode == "RGBA" and out.size == (48, 40)
    alpha = np.asarray(out.getchannel("A"), dtype=np.float32)
    assert alpha[0].mean() < 100 < alpha[-1].mean()


def test_form_field_wins_over_an_invalid_query_value(server, photo):
    data = png(Image.open(photo).convert("RGB").crop((0, 0, 12, 10)))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/upscale", params={"steps": "abc"}, files={"image": ("a.png", data, "image/png")},
                   data={"steps": "1"})
        assert r.status_code == 200 and r.headers["x-steps"] == "1"
        assert "steps" in error_of(upload(c, data, {"steps": "abc"}), 422, "invalid_parameter")


def test_stalled_upload_is_answered_408_within_the_deadline_and_closed(server):
    head = (b"POST /v1/upscale HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 10000\r\n\r\n")
    answer = raw(server.url, head + b"\x89PNG\r\n\x1a\n")  # 8 of 10,000 bytes, then nothing
    head_raw, _, body = answer.partition(b"\r\n\r\n")
    assert head_raw.startswith(b"HTTP/1.1 408") and b"connection: close" in head_raw.lower()
    assert b'"request_timeout"' in body  # and raw() returned: the server closed the connection
    assert errors_total(server.url, "request_timeout") >= 1


def test_cancelled_upload_is_counted_as_disconnected_not_as_an_error(server):
    before = errors_total(server.url, "disconnected"), errors_total(server.url, "internal")
    boundary = "xyz"
    head = (f"POST /v1/upscale HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + b"\x89PNG" + b"\0" * 5000
    raw(server.url, head, close_after=True)
    end = time.monotonic() + 30
    while errors_total(server.url, "disconnected") == before[0] and time.monotonic() < end:
        time.sleep(0.05)
    assert errors_total(server.url, "disconnected") == before[0] + 1
    assert errors_total(server.url, "internal") == before[1]
    assert requests_total(server.url, "/v1/upscale", 500) == 0


def test_oversized_request_head_is_refused_in_the_json_shape(server):
    answer = raw(server.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)  # and more to come
    head_raw, _, body = answer.partition(b"\r\n\r\n")
    assert head_raw.startswith(b"HTTP/1.1 431") and b'"request_header_too_large"' in body
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_413_from_content_length_and_docs_have_their_route_label(server):
    before = errors_total(server.url, "payload_too_large")
    answer = raw(server.url, b"POST /v1/upscale HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                             b"Content-Length: 50000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413")
    assert errors_total(server.url, "payload_too_large") == before + 1
    assert requests_total(server.url, "/v1/upscale", 413) >= 1
    httpx.get(f"{server.url}/docs")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'route="/docs"' in text and 'route="unmatched",status="413"' not in text


# ----------------------------------------------------------------------------- memory (a server process)


def rss_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_huge_images_are_refused_from_the_header_and_memory_stays_bounded(tiny_checkpoint):
    """The 17 KB solid 2048x2048 PNG and the 1x200000 strip of issue 10 get a JSON 413 before decoding;
    a 512x512 image of 1,849 tiles is served. Peak RSS grows by under 150 MB over all three (before
    the fix: several GB)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMDIFFSR_")}
    env.update(SAMDIFFSR_TILE_SIZE="16", SAMDIFFSR_TILE_OVERLAP="4", SAMDIFFSR_MAX_TILES_PER_BATCH="4",
               SAMDIFFSR_DEFAULT_STEPS="1", SAMDIFFSR_TORCH_THREADS="1", SAMDIFFSR_DEVICE="cpu",
               SAMDIFFSR_MAX_REQUEST_WORK="2000", SAMDIFFSR_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "samdiffsr", "serve", "--checkpoint", str(tiny_checkpoint),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 90, lambda: None if proc.poll() is None else pytest.fail("server died"))
        start = rss_kib(proc.pid, "VmHWM")
        solid = png(Image.new("RGB", (2048, 2048), (200, 30, 60)))
        strip = png(Image.new("RGB", (200_000, 1), (10, 200, 30)))
        assert len(solid) < 64 * 1024 and len(strip) < 4 * 1024
        with httpx.Client(base_url=url, timeout=120) as c:
            msg = error_of(upload(c, solid), 413, "image_too_large")
            assert "SAMDIFFSR_MAX_REQUEST_WORK" in msg and "2,000" in msg
            error_of(upload(c, strip), 413, "image_too_large")
            r = upload(c, png(Image.new("RGB", (512, 512), (90, 90, 90))), {"steps": 0})
            assert r.status_code == 200 and r.headers["x-tiles"] == "1849"
            assert r.headers["x-image-size"] == "2048x2048"
        growth_mb = (rss_kib(proc.pid, "VmHWM") - start) / 1024
        assert growth_mb < 150, f"peak RSS grew by {growth_mb:.0f} MB"
    finally:
        proc.kill()
        proc.wait(30)
