"""Hostile clients, round three (issue 32): truncated icon directories, a 500 from any route, waiters that hang up
in the admission line, Unicode line breaks in the text log, trailing slashes, a kept-alive connection at SIGTERM,
the jobs store's size check and `GET /v1/models/auto`. Real servers on loopback with the tiny model."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from fastapi.routing import APIRoute
from PIL import Image
from starlette.routing import Mount, Route

from service.admission import MB, MemoryBudget, estimate
from service.errors import Cancelled
from service.logs import TextFormatter
from service.settings import Settings
from service.testing import Answer, KeptAlive, LiveServer, ServerProcess

BASE = dict(tile_size=16, tile_overlap=4, max_tiles_per_batch=4, default_steps=1, torch_threads=1,
            max_pixels=64 * 64, max_upload_bytes=1024 * 1024, drain_timeout_s=5, device="cpu")
PROCESS_ENV = {"SAMDIFFSR_DEVICE": "cpu", "SAMDIFFSR_TORCH_THREADS": "1", "SAMDIFFSR_TILE_SIZE": "16",
               "SAMDIFFSR_TILE_OVERLAP": "4", "SAMDIFFSR_MAX_TILES_PER_BATCH": "4", "SAMDIFFSR_DEFAULT_STEPS": "1"}


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def crops(photo) -> Callable[[int], bytes]:
    img = Image.open(photo).convert("RGB")
    return lambda n: png(img.crop((0, 0, n, n)))


def multipart(path: str, data: bytes, ctype: str) -> tuple[bytes, list[tuple[str, str]]]:
    """A multipart body with `data` as the file field `image`, and its headers (encoded by httpx)."""
    req = httpx.Request("POST", f"http://x{path}", files={"image": ("a", data, ctype)})
    return req.read(), [("Content-Type", req.headers["content-type"])]


def error_of(answer: Answer, status: int, code: str) -> str:
    """The message of an error answer in the one JSON shape, whose request_id is its X-Request-Id."""
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.headers["content-type"] == "application/json"
    body = json.loads(answer.body)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == code, body
    assert body["error"]["request_id"] and body["error"]["request_id"] == answer.headers["x-request-id"]
    return body["error"]["message"]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with LiveServer(Settings(checkpoint=tiny_checkpoint, **BASE)) as srv:
        yield srv


# ----------------------------------------------------------------------------- 1. truncated icon directories


TRUNCATED_ICONS = {
    "6 bytes, one image listed": struct.pack("<HHH", 0, 1, 1),
    "one entry cut short": struct.pack("<HHH", 0, 1, 1) + bytes(15),
    "two listed, one entry": struct.pack("<HHH", 0, 1, 2) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, 40, 22),
}


@pytest.mark.parametrize("kind", [1, 2], ids=["icon", "cursor"])
@pytest.mark.parametrize("name", list(TRUNCATED_ICONS))
def test_a_truncated_icon_directory_is_400_on_every_intake(server, kind, name) -> None:
    """`printf '\\x00\\x00\\x01\\x00\\x01\\x00'` as image/x-icon was a 500 without X-Request-Id (the admission probe's
    frame check raised), and the kept-alive connection was reset. Now 400 invalid_image on /v1/upscale and
    /v1/jobs, raw and multipart, and the connection goes on."""
    data = bytearray(TRUNCATED_ICONS[name])
    data[2] = kind  # 1: ICO, 2: CUR
    with KeptAlive(server.url) as conn:
        for path in ("/v1/upscale", "/v1/jobs"):
            for form in (False, True):
                body, headers = (multipart(path, bytes(data), "image/x-icon") if form
                                 else (bytes(data), [("Content-Type", "image/x-icon")]))
                assert "icon directory" in error_of(conn.request("POST", path, body, headers), 400, "invalid_image")
        assert conn.request("GET", "/healthz").status == 200  # the same connection


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the server's probe: above 89 MP
def test_a_header_claiming_a_huge_thin_image_is_refused_at_once(server) -> None:
    """Found by the intake fuzz: a 69-byte PNG whose header says 150,000,000 x 1 pixels (under Pillow's bomb
    error) had its tiles planned from the header before the limits were checked, 8 s of CPU for a 413. Now the
    header's pixels are checked first."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:20] = struct.pack(">I", 150_000_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    t0 = time.monotonic()
    r = httpx.post(f"{server.url}/v1/upscale", content=bytes(data), headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 413 and "150000000x1 = 150,000,000 pixels" in r.json()["error"]["message"], r.text
    assert time.monotonic() - t0 < 1.0


# ----------------------------------------------------------------------------- a 500 from any route


def route_targets(app) -> list[tuple[str, str]]:
    """(method, path template) of every route of the app: the API's (OpenAPI schema, included routers too), the
    docs, the page and its static files."""
    out = [(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops]
    for route in app.routes:
        if isinstance(route, Mount):
            out.append(("GET", f"{route.path}/app.js"))
        elif isinstance(route, Route) and not route.include_in_schema:
            out.append((sorted(route.methods or {"GET"})[0], route.path))
    return out


def faulty(handle: Callable) -> Callable:
    """A route's `handle` that raises an unexpected error for requests that ask for one (X-Inject-Fault)."""

    async def inject(self, scope, receive, send) -> None:
        if (b"x-inject-fault", b"1") in scope["headers"]:
            raise RuntimeError("an injected fault")
        await handle(self, scope, receive, send)

    return inject


def test_a_500_from_any_route_has_the_request_id_and_the_json_shape_and_keeps_the_connection(server,
                                                                                             monkeypatch) -> None:
    """Every route in turn raises an unexpected error: each answer is 500 internal_error in the JSON shape with
    the request's X-Request-Id, and the same connection serves the next request (before: no X-Request-Id, and
    uvicorn reset the connection after Starlette's outermost handler re-raised)."""
    for cls in (APIRoute, Route, Mount):
        monkeypatch.setattr(cls, "handle", faulty(cls.handle))
    targets = route_targets(server.app)
    assert {("POST", "/v1/upscale"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}/result"),
            ("GET", "/v1/models/{model_id}"), ("GET", "/healthz"), ("GET", "/"), ("GET", "/docs")} <= set(targets)
    before = errors_total(server.url, "internal")
    with KeptAlive(server.url) as conn:
        for i, (method, path) in enumerate(targets):
            answer = conn.request(method, re.sub(r"\{\w+\}", "x", path), b"\x89PNG" if method == "POST" else b"",
                                  [("Content-Type", "image/png"), ("X-Request-Id", f"probe-{i}"),
                                   ("X-Inject-Fault", "1")])
            assert answer.headers["x-request-id"] == f"probe-{i}", (method, path)
            assert error_of(answer, 500, "internal_error") == "internal error: RuntimeError", (method, path)
            assert conn.request("GET", "/healthz").status == 200, (method, path)
    assert errors_total(server.url, "internal") == before + len(targets)


def errors_total(url: str, kind: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f'samdiffsr_errors_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0


# ----------------------------------------------------------------------------- 2. hung-up waiters


def test_a_waiter_whose_client_has_gone_leaves_the_line_at_once() -> None:
    async def main() -> None:
        budget = MemoryBudget(100)
        held = budget.acquire(80)
        gone = asyncio.Event()

        async def is_gone() -> bool:
            return gone.is_set()

        waiter = asyncio.create_task(budget.acquire_waiting(60, wait_s=30, gone=is_gone))
        await asyncio.sleep(0.1)
        assert budget.waiting == 1
        behind = asyncio.create_task(budget.acquire_waiting(10, wait_s=30))
        await asyncio.sleep(0.1)
        assert not behind.done()  # nobody overtakes the head of the line
        t0 = time.monotonic()
        gone.set()
        with pytest.raises(Cancelled):
            await waiter
        granted = await behind
        assert time.monotonic() - t0 < 0.2 and budget.waiting == 0 and budget.used == 90
        granted.release()
        held.release()

    asyncio.run(main())


@pytest.fixture(scope="module")
def budget_server(tiny_checkpoint, crops):
    """A 16 MiB budget (15.2 after the weights): the 128-px holder (6.8 MiB by its estimate) and a 192-px request
    (11.0) do not fit together; the holder, a 96-px request (5.2) and a 16-px one (0.6) do; the holder, the 96-px
    one and a 64-px one (3.9) do not, the holder and the 64-px one do."""
    settings = Settings(checkpoint=tiny_checkpoint, **{**BASE, "memory_budget_mb": 16, "admission_wait_s": 20,
                                                       "max_pixels": 256 * 256, "max_request_work": 10**6,
                                                       "request_timeout_s": 3600, "max_upload_bytes": 4 * MB})
    with LiveServer(settings) as srv:
        upscaler = next(iter(srv.service.registry.models.values())).upscaler
        mem = {n: estimate(upscaler, crops(n), 1).memory for n in (16, 64, 96, 128, 192)}
        limit = srv.service.budget.limit
        assert mem[128] + mem[192] > limit >= mem[192] and mem[128] + mem[96] + mem[16] <= limit
        assert mem[128] + mem[96] + mem[64] > limit >= mem[128] + mem[64]
        yield srv


def until(check: Callable[[], bool], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def timed_upscale(url: str, data: bytes, steps: int) -> tuple[int, float]:
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/upscale", content=data, params={"steps": steps}, headers={"content-type": "image/png"},
                   timeout=120)
    return r.status_code, time.monotonic() - t0


@pytest.mark.parametrize("point", ["before its body", "waiting for memory", "waiting for memory (jobs)",
                                   "waiting for its first tile"])
def test_a_waiter_that_hangs_up_is_as_if_it_never_came(budget_server, crops, point) -> None:
    """A 128-px request at 40 steps holds part of the budget; a second client hangs up `point`; the request behind
    it is served as fast as with nobody in between, while the holder still runs (before, waiting for memory: the
    request behind waited for the holder, or for SAMDIFFSR_ADMISSION_WAIT_S, 20 s here)."""
    srv = budget_server
    budget = srv.service.budget
    until(lambda: budget.used == 0 and budget.waiting == 0)
    holder = KeptAlive(srv.url)
    holder.send("POST", "/v1/upscale?steps=40", crops(128), [("Content-Type", "image/png")])
    try:
        until(lambda: budget.used > 0)
        behind, behind_steps = (crops(64), 0) if point == "waiting for its first tile" else (crops(16), 1)
        if point != "waiting for its first tile":
            baseline = timed_upscale(srv.url, behind, behind_steps)
            assert baseline[0] == 200
        with KeptAlive(srv.url) as gone:
            if point == "before its body":
                gone.sock.sendall(b"POST /v1/upscale HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                  b"Content-Length: 100000\r\n\r\n" + crops(192)[:1000])
            elif point.startswith("waiting for memory"):
                path = "/v1/jobs" if "jobs" in point else "/v1/upscale"
                gone.send("POST", path, crops(192), [("Content-Type", "image/png")])
                until(lambda: budget.waiting == 1)
            else:  # admitted beside the holder: its tiles wait behind the holder's
                used = budget.used
                gone.send("POST", "/v1/upscale?steps=40", crops(96), [("Content-Type", "image/png")])
                until(lambda: budget.used > used)
                # the 64-px request behind it does not fit beside both: it waits for this one's memory
                answer: list[tuple[int, float]] = []
                waiter = threading.Thread(target=lambda: answer.append(timed_upscale(srv.url, behind, behind_steps)))
                waiter.start()
                until(lambda: budget.waiting == 1)
            time.sleep(0.5)
        t0 = time.monotonic()
        if point == "waiting for its first tile":
            waiter.join(120)
            (status, _), seconds = answer[0], time.monotonic() - t0
        else:
            status, seconds = timed_upscale(srv.url, behind, behind_steps)
            assert seconds < baseline[1] + 3, (seconds, baseline)
        assert status == 200 and seconds < 8, (status, seconds)
        assert budget.used > 0  # the holder still runs: nobody waited for it
    finally:
        holder.close()  # the holder's client goes: its job is dropped
    until(lambda: budget.used == 0 and budget.waiting == 0)


# ----------------------------------------------------------------------------- 3. line breaks in the text log

LINE_BREAKS = ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("brk", LINE_BREAKS, ids=[f"U+{ord(c):04X}" for c in LINE_BREAKS])
def test_no_character_a_reader_splits_lines_on_reaches_the_text_log(brk) -> None:
    """Every character str.splitlines (and so most tools) takes for a line break is escaped, in the message and in
    a traceback (whose own lines stay)."""
    fmt = TextFormatter()
    record = logging.LogRecord("samdiffsr.access", logging.INFO, __file__, 1, "%s %s %d",
                               ("GET", f"/x{brk}2026-01-01 00:00:00 INFO samdiffsr.access: GET /admin 200", 404), None)
    line = fmt.format(record)
    assert len(line.splitlines()) == 1 and brk not in line, repr(line)
    try:
        raise ValueError(f"a client's text{brk}FORGED")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = fmt.format(record)
    assert not any(ln.startswith("FORGED") for ln in text.splitlines()) or brk == "\n", repr(text)
    assert text.splitlines()[1] == "Traceback (most recent call last):"


def test_the_served_text_log_escapes_unicode_line_breaks(tiny_checkpoint, tmp_path) -> None:
    srv = ServerProcess(tiny_checkpoint, {**PROCESS_ENV, "SAMDIFFSR_LOG_FORMAT": "text"}, tmp_path / "server.log")
    try:
        srv.wait_ready(90)
        with KeptAlive(srv.url) as conn:
            for i, code in enumerate(["%C2%85", "%E2%80%A8", "%E2%80%A9", "%0B", "%1C", "%0C"]):
                assert conn.request("GET", f"/nothing{code}FORGED-{i}%20200").status == 404
        time.sleep(0.3)
    finally:
        srv.stop()
    lines = (tmp_path / "server.log").read_text(encoding="utf-8").splitlines()
    assert not any(line.startswith("FORGED") for line in lines), [ln for ln in lines if "FORGED" in ln]
    for escaped in ("\\x85", "\\u2028", "\\u2029", "\\x0b", "\\x1c", "\\x0c"):
        assert any(f"/nothing{escaped}FORGED-" in line for line in lines), (escaped, lines[-8:])


# ----------------------------------------------------------------------------- 4. trailing slashes


def test_a_trailing_slash_is_the_json_404_never_a_redirect_to_the_host_header(server) -> None:
    """`GET /v1/models/{id}/` with `Host: evil.example` answered 307 to http://evil.example/v1/models/{id}; every
    route with a trailing slash added is now the documented JSON 404, with no Location."""
    model = server.service.registry.ids[0]
    paths = [(m, re.sub(r"\{\w+\}", model if "models" in p else "x", p) + "/") for m, p in
             route_targets(server.app) if p != "/" and not p.startswith("/static/")]
    assert ("GET", f"/v1/models/{model}/") in paths and ("POST", "/v1/upscale/") in paths
    with KeptAlive(server.url, host="evil.example") as conn:
        for method, path in paths:
            answer = conn.request(method, path, b"\x89PNG" if method == "POST" else b"",
                                  [("Content-Type", "image/png")])
            assert "location" not in answer.headers, (method, path, answer.headers)
            error_of(answer, 404, "not_found")


# ----------------------------------------------------------------------------- 5. the smaller items


def test_a_request_on_a_kept_alive_connection_at_sigterm_gets_503_shutting_down(tiny_checkpoint, crops,
                                                                                tmp_path) -> None:
    """A client with an idle kept-alive connection sends a request after SIGTERM, while another request drains:
    it gets the documented 503 shutting_down and the connection closes after it (before: uvicorn had closed the
    idle connection at once). The server still exits at its drain deadline."""
    env = {**PROCESS_ENV, "SAMDIFFSR_DRAIN_TIMEOUT_S": "3", "SAMDIFFSR_MAX_PIXELS": str(128 * 128),
           "SAMDIFFSR_MAX_REQUEST_WORK": "100000", "SAMDIFFSR_REQUEST_TIMEOUT_S": "600"}
    srv = ServerProcess(tiny_checkpoint, env, tmp_path / "server.log")
    try:
        srv.wait_ready(90)
        with KeptAlive(srv.url) as busy, KeptAlive(srv.url) as idle, KeptAlive(srv.url) as silent:
            assert idle.request("GET", "/healthz").status == 200
            busy.send("POST", "/v1/upscale?steps=100", crops(64), [("Content-Type", "image/png")])
            until(lambda: any(ln.startswith("samdiffsr_tiles_in_flight ") and float(ln.split()[1]) > 0
                              for ln in httpx.get(f"{srv.url}/metrics").text.splitlines()))
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            answer = idle.request("POST", "/v1/upscale", crops(16), [("Content-Type", "image/png")])
            error_of(answer, 503, "shutting_down")
            assert answer.headers["retry-after"] and answer.headers["connection"] == "close" and idle.closing
            error_of(busy.receive(), 503, "shutting_down")  # at the drain deadline
            assert srv.proc.wait(30) == 0 and time.monotonic() - t0 < 10
            with pytest.raises(ConnectionError):  # never used: closed once nothing was in progress
                silent.request("GET", "/healthz")
    finally:
        srv.stop()


def gray16(n: int) -> bytes:
    rng = np.random.default_rng(0)
    return png(Image.fromarray(rng.integers(0, 65536, (n, n)).astype(np.uint16)))


def test_the_jobs_store_check_counts_the_real_bytes_of_the_result(tiny_checkpoint, crops) -> None:
    """40x40 in, 160x160 out: 25,600 pixels. A 16-bit grey PNG result is 51,200 bytes uncompressed (the check
    counted 25,600, so a 40,000-byte store accepted it); its JPEG is 8-bit; an RGBA result is 102,400 bytes in
    PNG, 76,800 in JPEG (no alpha)."""
    rgba = png(Image.open(io.BytesIO(crops(40))).convert("RGBA"))
    with LiveServer(Settings(checkpoint=tiny_checkpoint, **{**BASE, "job_store_max_bytes": 80_000})) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        def submit(data: bytes, **params: object) -> httpx.Response:
            return c.post("/v1/jobs", files={"image": ("a.png", data, "image/png")}, params=params)

        r = submit(gray16(40), bicubic=True)  # the result and its bicubic: 40,000 bytes each
        assert r.status_code == 413 and "51,200 bytes uncompressed" in r.json()["error"]["message"], r.text
        assert submit(gray16(40), bicubic=True, output_format="jpeg").status_code == 202
        r = submit(rgba)
        assert r.status_code == 413 and "102,400 bytes" in r.json()["error"]["message"], r.text
        assert submit(rgba, output_format="jpeg").status_code == 202
        assert submit(rgba, output_format="webp").status_code == 413


def test_the_card_of_auto_is_a_404_that_lists_only_models(server) -> None:
    r = httpx.get(f"{server.url}/v1/models/auto")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
    message = r.json()["error"]["message"]
    models = message.rsplit("the models are: ", 1)[1].split(", ")
    assert models == server.service.registry.ids and "per upload" in message
    r = httpx.get(f"{server.url}/v1/models/nope")
    assert r.json()["error"]["message"].rsplit("the models are: ", 1)[1].split(", ") == server.service.registry.ids
    # As a request's model, auto is a valid choice, and the list says so
    r = httpx.post(f"{server.url}/v1/upscale", params={"model": "nope"}, content=b"x",
                   headers={"content-type": "image/png"})
    assert r.status_code == 404 and r.json()["error"]["message"].endswith(", auto")


def test_kept_alive_reads_what_httpx_reads(server) -> None:
    """KeptAlive (service.testing), which these tests rest on, reads responses as httpx does, on one connection."""
    with KeptAlive(server.url) as conn:
        first, second = conn.request("GET", "/readyz"), conn.request("GET", "/v1/models")
        assert not conn.closing
    assert first.status == 200 and json.loads(first.body) == {"status": "ready"}
    assert json.loads(second.body) == httpx.get(f"{server.url}/v1/models").json()
