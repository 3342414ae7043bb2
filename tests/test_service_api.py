"""End-to-end tests of the HTTP service: a real uvicorn server on loopback with the tiny model."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from collections import deque

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from model.imaging import decode_image
from model.runtime import load_runtime
from model.sizing import SNUG_GROW
from model.upscale import Upscaler
from service.batcher import PACE_CALLS
from service.settings import Settings
from service.testing import LiveServer

BASE = dict(tile_size=16, tile_overlap=4, max_tiles_per_batch=4, default_steps=2, torch_threads=1,
            max_pixels=64 * 64, max_upload_bytes=256 * 1024, drain_timeout_s=5, device="cpu")


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with LiveServer(Settings(checkpoint=tiny_checkpoint, **BASE)) as srv:
        yield srv


def png(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_img(photo) -> Image.Image:
    return Image.open(photo).convert("RGB")


def crop(photo_img: Image.Image, w: int, h: int, x: int = 100, y: int = 60) -> Image.Image:
    return photo_img.crop((x, y, x + w, y + h))


def upload(client: httpx.Client, data: bytes, params: dict | None = None, **kw) -> httpx.Response:
    return client.post("/v1/upscale", files={"image": ("in.png", data, "image/png")}, params=params or {}, **kw)


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert body["error"]["request_id"] == r.headers["x-request-id"]
    return body["error"]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(metrics: dict, metric: str, **labels: str) -> float:
    """The sum of `metric`'s samples whose labels include `labels` (e.g. over every model)."""
    want = set(labels.items())
    return sum(v for (name, got), v in metrics.items() if name == metric and want <= set(got))


# ----------------------------------------------------------------------------- endpoints


def test_health_ready_models_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    (card,) = client.get("/v1/models").json()["models"]
    assert card["name"] == "tiny-random" and card["scale"] == 4
    assert (card["backend"], card["device"]) == ("torch", "cpu")
    assert card["default_steps"] == 2 and card["max_steps"] == 100 and card["ready"] is True
    assert card["provenance"] == {"source": "tests"}
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/upscale"]["post"]
    assert {p["name"] for p in op["parameters"]} == {"model", "steps", "sampler", "seed", "ensemble", "output_format",
                                                           "quality"}
    assert all(p.get("description") for p in op["parameters"])
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and {"image", "steps", "seed"} <= set(form["properties"])
    assert "image/*" in op["requestBody"]["content"]
    assert {"200", "400", "401", "413", "415", "422", "500", "503", "504"} <= set(op["responses"])
    assert "262,144 bytes" in spec["info"]["description"]  # the limits are documented


def test_upscale_multipart_raw_and_form_parameters(client, photo_img):
    data = png(crop(photo_img, 28, 20))
    r = upload(client, data, {"seed": 5})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(r.content))
    assert out.size == (112, 80) and out.mode == "RGB"
    assert r.headers["x-seed"] == "5" and r.headers["x-steps"] == "2" and r.headers["x-sampler"] == "ddim"
    assert r.headers["x-image-size"] == "112x80" and int(r.headers["x-tiles"]) == 4
    assert {"decode", "queue", "sample", "encode", "total"} <= {
        part.split(";")[0].strip() for part in r.headers["server-timing"].split(",")}
    assert len(r.headers["x-request-id"]) == 32

    raw = client.post("/v1/upscale", content=data, headers={"content-type": "image/png"}, params={"seed": 5})
    assert raw.status_code == 200 and raw.content == r.content  # same seed -> same bytes
    form = client.post("/v1/upscale", files={"image": ("a.png", data, "image/png")},
                       data={"seed": "5", "steps": "2"}, params={"steps": 7})
    assert form.headers["x-steps"] == "2" and form.content == r.content  # form fields win
    other = upload(client, data, {"seed": 6})
    assert other.content != r.content
    rnd = upload(client, data, headers={"x-request-id": "my-id-1"})
    assert rnd.headers["x-request-id"] == "my-id-1" and int(rnd.headers["x-seed"]) >= 0
    ddpm = upload(client, data, {"sampler": "ddpm", "steps": 3, "seed": 1})
    assert ddpm.status_code == 200 and ddpm.headers["x-sampler"] == "ddpm"
    # steps=0, the fidelity mode: the encoder's own output, the same whatever the seed.
    fid = [upload(client, data, {"steps": 0, "seed": s}) for s in (1, 2)]
    assert all(f.status_code == 200 and f.headers["x-steps"] == "0" for f in fid)
    assert fid[0].content == fid[1].content != r.content
    assert Image.open(io.BytesIO(fid[0].content)).size == (112, 80)


def test_self_ensemble_matches_the_upscaler(server, client, photo_img, tiny_checkpoint):
    """ensemble=2 and 4: the image's flips sampled beside it and averaged, as `Upscaler.upscale(ensemble=n)`
    does (the service averages 8-bit canvases, the CLI floats: at most one level apart)."""
    data = png(crop(photo_img, 28, 20))
    plain = upload(client, data, {"seed": 5})
    precision = client.get("/v1/models").json()["models"][0]["precision"]  # the server's: auto
    rt = load_runtime(tiny_checkpoint, "torch", "cpu", precision=precision)
    up = Upscaler(rt, tile=16, overlap=4, max_batch=4)
    for n in (2, 4):
        r = upload(client, data, {"seed": 5, "ensemble": n})
        assert r.status_code == 200, r.text
        assert r.headers["x-ensemble"] == str(n) and int(r.headers["x-tiles"]) == 4 * n
        got = np.asarray(Image.open(io.BytesIO(r.content)), dtype=np.float32)
        ref = up.upscale(decode_image(data), steps=2, seed=5, ensemble=n).rgb * 255
        assert got.shape == (80, 112, 3) and np.abs(got - ref).max() <= 1.01
        assert r.content != plain.content
    assert plain.headers["x-ensemble"] == "1"


@pytest.mark.parametrize("batch, setting, snug, tiles", [(1, None, True, 2), (4, None, False, 4), (1, False, False, 4),
                                                         (4, True, True, 2)])
def test_snug_tiles_by_default_where_a_call_takes_one_tile(tiny_checkpoint, photo_img, batch, setting, snug,
                                                            tiles) -> None:
    """A call of one tile has nothing to share: each image's tiles are then sized to it (a 28x20 image at 16-px
    tiles, 4 of overlap: 2 tiles of 20x16, not 4 of 16x16). Calls of several tiles keep fixed tiles; the setting
    wins over both. The snug output is what the CLI's Upscaler gives with the same tiles."""
    data = png(crop(photo_img, 28, 20))
    settings = Settings(checkpoint=tiny_checkpoint, **{**BASE, "max_tiles_per_batch": batch, "snug_tiles": setting})
    with LiveServer(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        (card,) = c.get("/v1/models").json()["models"]
        assert card["snug_tiles"] is snug
        r = upload(c, data, {"seed": 5})
        assert r.status_code == 200 and int(r.headers["x-tiles"]) == tiles, r.text
    rt = load_runtime(tiny_checkpoint, "torch", "cpu", precision=card["precision"])
    ref = Upscaler(rt, tile=16, overlap=4, max_batch=batch, fit=True, grow=SNUG_GROW if snug else 1.0)
    got = np.asarray(Image.open(io.BytesIO(r.content)), dtype=np.float32)
    assert np.abs(got - ref.upscale(decode_image(data), steps=2, seed=5).rgb * 255).max() <= 1.01


@pytest.mark.parametrize("fmt,media,quality", [("jpeg", "image/jpeg", 40), ("jpg", "image/jpeg", 90),
                                               ("webp", "image/webp", 50)])
def test_lossy_output_formats(client, photo_img, fmt, media, quality):
    r = upload(client, png(crop(photo_img, 12, 10)), {"output_format": fmt, "quality": quality, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == media
    assert Image.open(io.BytesIO(r.content)).size == (48, 40)


def test_every_input_mode_the_cli_accepts(client, photo_img):
    small = crop(photo_img, 12, 10)
    gray = upload(client, png(small.convert("L")))
    assert Image.open(io.BytesIO(gray.content)).mode == "L"
    rgba = small.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((12, 10)))
    out = Image.open(io.BytesIO(upload(client, png(rgba)).content))
    assert out.mode == "RGBA" and out.size == (48, 40)
    alpha = np.asarray(out.getchannel("A"), dtype=np.float32)
    assert alpha[0].mean() < alpha[-1].mean()  # the alpha gradient survives
    pal = Image.open(io.BytesIO(upload(client, png(small.convert("P", palette=Image.Palette.ADAPTIVE))).content))
    assert pal.size == (48, 40)
    deep = Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257)  # I;16
    out16 = Image.open(io.BytesIO(upload(client, png(deep)).content))
    assert out16.mode.startswith("I") and out16.size == (48, 40)  # 16-bit grayscale stays 16-bit
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    jpg = png(small, format="JPEG", exif=exif.tobytes())
    r = client.post("/v1/upscale", files={"image": ("r.jpg", jpg, "image/jpeg")})
    assert Image.open(io.BytesIO(r.content)).size == (40, 48)  # rotated, then x4


# ----------------------------------------------------------------------------- errors


def test_undecodable_and_truncated_images_are_400(client, photo_img):
    assert_error(upload(client, b"this is not an image at all"), 400, "invalid_image")
    data = png(crop(photo_img, 30, 30))
    assert_error(upload(client, data[: len(data) // 2]), 400, "invalid_image")
    assert_error(client.post("/v1/upscale", content=b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
                             headers={"content-type": "image/png"}), 400, "invalid_image")


def huge_png_header(width: int, height: int) -> bytes:
    """A tiny PNG file declaring a huge 1-bit image (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_limit_and_decompression_bomb_are_413(client, photo_img):
    err = assert_error(upload(client, png(crop(photo_img, 80, 60))), 413, "image_too_large")
    assert "4,096" in err["message"]
    assert_error(upload(client, huge_png_header(40_000, 40_000)), 413, "image_too_large")


def raw_http(url: str, head: bytes, body: bytes = b"", timeout: float = 30) -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head_raw, _, rest = data.partition(b"\r\n\r\n")
        lines = head_raw.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        while len(rest) < int(headers.get("content-length", 0)):
            rest += s.recv(65536)
        return int(lines[0].split()[1]), headers, rest


def test_body_over_the_byte_limit_is_413_before_it_is_read(server):
    # Declared too large: rejected from the headers alone (no body sent at all).
    status, headers, body = raw_http(server.url, b"POST /v1/upscale HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Type: image/png\r\nContent-Length: 50000000\r\n\r\n")
    assert status == 413 and b'"payload_too_large"' in body
    # Streamed without a length: rejected once past the limit, although the body never ends.
    chunk = b"x" * 65536
    stream = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(5))  # 320 KiB, unterminated
    status, headers, body = raw_http(server.url, b"POST /v1/upscale HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n", stream)
    assert status == 413 and b'"payload_too_large"' in body
    # ... also as a multipart upload.
    boundary = b"b0undary"
    part = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + b"y" * 300_000)
    stream = b"%x\r\n" % len(part) + part + b"\r\n"
    status, _, body = raw_http(server.url, b"POST /v1/upscale HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                               b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n\r\n", stream)
    assert status == 413 and b'"payload_too_large"' in body
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_unsupported_media_types_are_415(client, photo_img):
    data = png(crop(photo_img, 12, 10))
    assert_error(client.post("/v1/upscale", content=data, headers={"content-type": "text/plain"}), 415,
                 "unsupported_media_type")
    assert_error(client.post("/v1/upscale", content=b"a=1", headers={
        "content-type": "application/x-www-form-urlencoded"}), 415, "unsupported_media_type")
    assert_error(client.post("/v1/upscale", files={"image": ("a.txt", data, "text/plain")}), 415,
                 "unsupported_media_type")


@pytest.mark.parametrize("params", [{"steps": -1}, {"steps": 101}, {"steps": "many"}, {"sampler": "euler"},
                                    {"output_format": "gif"}, {"quality": 0}, {"quality": 101}, {"seed": -1},
                                    {"seed": 2**63}, {"ensemble": 3}, {"ensemble": 0}, {"ensemble": 8}])
def test_invalid_parameters_are_422(client, photo_img, params):
    err = assert_error(upload(client, png(crop(photo_img, 12, 10)), params), 422, "invalid_parameter")
    assert next(iter(params)) in err["message"]


def test_invalid_form_field_and_missing_image_are_422(client, photo_img):
    data = png(crop(photo_img, 12, 10))
    err = assert_error(client.post("/v1/upscale", files={"image": ("a.png", data, "image/png")},
                                   data={"steps": "x"}), 422, "invalid_parameter")
    assert "steps" in err["message"]
    assert_error(client.post("/v1/upscale", files={"file": ("a.png", data, "image/png")}), 422, "missing_image")
    assert_error(client.post("/v1/upscale", content=b"", headers={"content-type": "image/png"}), 422,
                 "missing_image")
    assert_error(client.get("/v1/nothing"), 404, "not_found")


def test_unknown_fields_and_query_parameters_are_422_naming_them(client, photo_img):
    """A misspelt parameter is refused, not silently replaced by its default; the server goes on serving."""
    data = png(crop(photo_img, 12, 10))
    files = {"image": ("a.png", data, "image/png")}
    err = assert_error(client.post("/v1/upscale", files=files, data={"stpes": "0"}), 422, "invalid_parameter")
    assert "unknown form field 'stpes'" in err["message"] and "steps" in err["message"]
    err = assert_error(client.post("/v1/upscale", files=files, data={"stpes": "0", "sed": "1"}), 422,
                       "invalid_parameter")
    assert "unknown form fields 'sed', 'stpes'" in err["message"]
    err = assert_error(client.post("/v1/upscale", content=data, headers={"content-type": "image/png"},
                                   params={"modle": "default"}), 422, "invalid_parameter")
    assert "unknown query parameter 'modle'" in err["message"]
    assert_error(client.post("/v1/jobs", files=files, params={"bicubc": "true"}), 422, "invalid_parameter")
    r = client.post("/v1/upscale", files=files, data={"steps": "0"})
    assert r.status_code == 200  # still serving; the known fields work
    assert r.headers["content-disposition"] == 'inline; filename="a_x4.png"'
    raw = client.post("/v1/upscale", content=data, headers={"content-type": "image/png"},
                      params={"steps": 0, "output_format": "jpg"})
    assert raw.headers["content-disposition"] == 'inline; filename="image_x4.jpg"'


def test_the_pixel_limit_is_checked_before_the_time_it_would_take(server, client, photo_img):
    """An image over SAMDIFFSR_MAX_PIXELS gets the pixel limit as its reason, even where its time would also be
    too long (before: "needs N tile-steps, at least 320 s")."""
    batcher = server.service.batcher
    saved = dict(batcher._pace), dict(batcher._best_pace)
    try:
        batcher._best_pace["tiny"] = 10.0  # 10 s a tile-step: any image is too slow
        batcher._pace["tiny"] = deque([10.0], maxlen=PACE_CALLS)
        err = assert_error(upload(client, png(crop(photo_img, 70, 60))), 413, "image_too_large")
        assert "4,200 pixels" in err["message"] and "SAMDIFFSR_MAX_PIXELS" in err["message"], err
        assert "tile-steps" not in err["message"]
    finally:
        batcher._pace.clear(), batcher._pace.update(saved[0])
        batcher._best_pace.clear(), batcher._best_pace.update(saved[1])


def test_refused_by_time_413_when_even_idle_503_when_only_load(tiny_checkpoint, photo_img):
    """413 (pointing to the jobs API) when even an idle server would miss the deadline; 503 with Retry-After
    when only today's pace or the work queued ahead is the cause."""
    settings = Settings(checkpoint=tiny_checkpoint, **{**BASE, "request_timeout_s": 10.0, "retry_after_s": 2})
    data = png(crop(photo_img, 40, 40))  # 9 tiles x 2 steps = 18 tile-steps
    with LiveServer(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        batcher = srv.service.batcher
        batcher._best_pace["tiny"] = 1.0  # 18 s even idle, against a deadline of 10 s
        batcher._pace["tiny"] = deque([1.0], maxlen=PACE_CALLS)
        err = assert_error(upload(c, data), 413, "image_too_large")
        assert "even with this server idle" in err["message"] and "POST /v1/jobs" in err["message"], err
        batcher._best_pace["tiny"] = 0.01  # 0.18 s idle, but 18 s at today's pace: 8 s too many
        r = upload(c, data)
        err = assert_error(r, 503, "queue_full")
        assert "busy" in err["message"] and 7 <= int(r.headers["retry-after"]) <= 9, (err, r.headers)
        batcher._pace["tiny"] = deque([0.01], maxlen=PACE_CALLS)
        assert upload(c, data).status_code == 200  # at the idle pace it is served
        m = scrape(srv.url)
        assert sample(m, "samdiffsr_errors_total", kind="image_too_large") == 1
        assert sample(m, "samdiffsr_errors_total", kind="queue_full") == 1


def test_bearer_token_auth(tiny_checkpoint, photo_img):
    with LiveServer(Settings(checkpoint=tiny_checkpoint, auth_token="s3cret", **BASE)) as srv:
        data = png(crop(photo_img, 12, 10))
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = upload(c, data)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
            assert_error(upload(c, data, headers={"authorization": "Bearer wrong"}), 401, "unauthorized")
            assert_error(c.get("/v1/models"), 401, "unauthorized")
            assert upload(c, data, headers={"authorization": "Bearer s3cret"}).status_code == 200
            assert c.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
            for open_path in ("/healthz", "/readyz", "/metrics"):
                assert c.get(open_path).status_code == 200


def test_queue_full_is_503_and_deadline_is_504(tiny_checkpoint, photo_img):
    settings = Settings(checkpoint=tiny_checkpoint, **{**BASE, "max_queue": 1, "request_timeout_s": 1.5,
                                                       "retry_after_s": 4})
    with LiveServer(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        data = png(crop(photo_img, 40, 40))
        # 900 tile-steps: on a fast machine the pace check would refuse it at once (tests/test_service_hostile.py);
        # a pace of 0.1 ms lets it in, to run into its deadline.
        srv.service.batcher._pace["tiny"] = deque([1e-4], maxlen=PACE_CALLS)
        slow: list[httpx.Response] = []
        t = threading.Thread(target=lambda: slow.append(upload(c, data, {"steps": 100})))
        t.start()
        end = time.monotonic() + 30
        while srv.service.batcher.queued() == 0 and time.monotonic() < end:
            time.sleep(0.01)
        full = upload(c, png(crop(photo_img, 12, 10)))
        assert_error(full, 503, "queue_full")
        assert full.headers["retry-after"] == "4"
        t.join(60)
        err = assert_error(slow[0], 504, "timeout")
        assert "deadline" in err["message"]
        assert upload(c, png(crop(photo_img, 12, 10))).status_code == 200  # serving again
        m = scrape(srv.url)
        assert sample(m, "samdiffsr_errors_total", kind="queue_full") == 1
        assert sample(m, "samdiffsr_errors_total", kind="timeout") == 1
        assert sample(m, "samdiffsr_tiles_in_flight") == 0


# ----------------------------------------------------------------------------- batching, disconnects, metrics


def test_concurrent_requests_share_denoiser_calls_and_stay_reproducible(server, client, photo_img):
    big, small = png(crop(photo_img, 48, 44)), png(crop(photo_img, 12, 10, x=10))
    small_alone = upload(client, small, {"seed": 3, "steps": 3})
    before = scrape(server.url)
    results: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: results.setdefault("big", upload(client, big, {"seed": 1, "steps": 8})))
    t.start()
    end = time.monotonic() + 30
    while sample(scrape(server.url), "samdiffsr_tiles_in_flight") == 0 and time.monotonic() < end:
        time.sleep(0.01)
    results["small"] = upload(client, small, {"seed": 3, "steps": 3})
    t.join(120)
    assert results["big"].status_code == 200 and results["small"].status_code == 200
    assert Image.open(io.BytesIO(results["big"].content)).size == (192, 176)
    assert results["small"].content == small_alone.content  # bit-identical under load
    assert int(results["small"].headers["x-shared-calls"]) > 0
    after = scrape(server.url)
    calls = sample(after, "samdiffsr_batch_tiles_count") - sample(before, "samdiffsr_batch_tiles_count")
    single = (sample(after, "samdiffsr_batch_tiles_bucket", le="1.0")
              - sample(before, "samdiffsr_batch_tiles_bucket", le="1.0"))
    assert calls > 0 and single < calls  # calls with more than one tile happened
    assert sample(after, "samdiffsr_images_total") - sample(before, "samdiffsr_images_total") == 2


def test_client_disconnect_drops_the_request(server, client, photo_img):
    data = png(crop(photo_img, 40, 40))
    before = scrape(server.url)
    boundary = "xyz"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    host, port = server.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST /v1/upscale?steps=100 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
              f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode() + body)
    end = time.monotonic() + 30
    while sample(scrape(server.url), "samdiffsr_tiles_in_flight") == 0 and time.monotonic() < end:
        time.sleep(0.01)
    s.close()
    end = time.monotonic() + 30
    while time.monotonic() < end:
        m = scrape(server.url)
        if (sample(m, "samdiffsr_errors_total", kind="disconnected")
                > sample(before, "samdiffsr_errors_total", kind="disconnected")):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the disconnect was not noticed")
    time.sleep(0.3)
    assert sample(scrape(server.url), "samdiffsr_tiles_in_flight") == 0
    assert upload(client, png(crop(photo_img, 12, 10))).status_code == 200


def test_metrics_exposition(server, client, photo_img):
    upload(client, png(crop(photo_img, 12, 10)))
    upload(client, b"junk")
    m = scrape(server.url)
    assert sample(m, "samdiffsr_requests_total", route="/v1/upscale", method="POST", status="200") >= 1
    assert sample(m, "samdiffsr_requests_total", route="/v1/upscale", method="POST", status="400") >= 1
    assert sample(m, "samdiffsr_errors_total", kind="invalid_image") >= 1
    assert sample(m, "samdiffsr_request_duration_seconds_count", route="/v1/upscale") >= 2
    assert sample(m, "samdiffsr_queue_wait_seconds_count") >= 1
    assert sample(m, "samdiffsr_denoiser_call_duration_seconds_count") >= 1
    assert sample(m, "samdiffsr_images_total") >= 1
    assert sample(m, "samdiffsr_output_megapixels_total") >= 48 * 40 / 1e6
    assert sample(m, "samdiffsr_model_info", model="tiny", name="tiny-random", backend="torch", device="cpu") == 1
    assert sample(m, "samdiffsr_requests_total", route="/v1/upscale", status="200", model="tiny") >= 1
    assert sample(m, "samdiffsr_images_total", model="tiny") >= 1
    assert sample(m, "samdiffsr_gpu_memory_bytes", kind="allocated") == 0
    assert ("samdiffsr_queue_depth", (("model", "tiny"),)) in m
