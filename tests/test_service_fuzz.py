"""Property-based tests: malformed uploads to POST /v1/upscale of a real server get a 4xx error in the
one error shape, never a 5xx; valid images of any small size are upscaled; the server goes on serving."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.settings import Settings
from service.testing import LiveServer

SERVER = dict(tile_size=16, tile_overlap=4, max_tiles_per_batch=4, default_steps=1, torch_threads=1,
              max_pixels=64 * 64, max_upload_bytes=64 * 1024, drain_timeout_s=5, device="cpu")
FUZZ = settings(max_examples=40, deadline=None)

CONTENT_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/x-unknown", "application/octet-stream",
                 "multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=zz",
                 'multipart/form-data; boundary="', "application/json", "text/plain",
                 "application/x-www-form-urlencoded", "IMAGE/PNG; charset=utf-8", "image/", "", ";", "*/*"]
# Header values h11 sends: printable ASCII without leading or trailing blanks.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip)
content_types = st.one_of(st.sampled_from(CONTENT_TYPES), header_text)
params = st.dictionaries(st.sampled_from(["steps", "sampler", "seed", "output_format", "quality"]),
                         st.one_of(st.sampled_from(["1", "0", "-1", "2", "ddim", "png", "9" * 30, ""]), header_text),
                         max_size=2)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with LiveServer(Settings(checkpoint=tiny_checkpoint, **SERVER)) as srv:
        yield srv


def encoded(photo, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(photo).convert("RGB").crop((100, 60, 120, 76)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def real_images(photo) -> dict[str, bytes]:
    return {"png": encoded(photo, "PNG"), "jpeg": encoded(photo, "JPEG")}


def check(r: httpx.Response, allow_ok: bool = False) -> None:
    """A 4xx in the one error shape (or, where the bytes may still be a valid image, a 200 image)."""
    if allow_ok and r.status_code == 200:
        assert r.headers["content-type"].startswith("image/")
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json", r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}, body
    err = body["error"]
    assert isinstance(err["code"], str) and err["code"] and isinstance(err["message"], str) and err["message"]
    assert err["request_id"] == r.headers["x-request-id"]


def post(client: httpx.Client, body: bytes, ctype: str, as_file: bool, query: dict[str, str]) -> httpx.Response:
    if as_file:
        return client.post("/v1/upscale", files={"image": ("in", body, ctype or "application/octet-stream")},
                           params=query)
    return client.post("/v1/upscale", content=body, headers={"content-type": ctype}, params=query)


@FUZZ
@given(body=st.binary(max_size=4096), ctype=content_types, as_file=st.booleans(), query=params)
def test_random_bytes_are_a_4xx_error(client, body, ctype, as_file, query):
    # Random bytes could in principle form an image Pillow reads; allow that one way out.
    check(post(client, body, ctype, as_file, query), allow_ok=True)


@FUZZ
@given(fmt=st.sampled_from(["png", "jpeg"]), cut=st.floats(0.0, 0.97), ctype=content_types, as_file=st.booleans())
def test_truncated_images_are_a_4xx_error(client, real_images, fmt, cut, ctype, as_file):
    data = real_images[fmt]
    check(post(client, data[: int(len(data) * cut)], ctype, as_file, {}))


@FUZZ
@given(fmt=st.sampled_from(["png", "jpeg"]), data=st.data(), as_file=st.booleans())
def test_corrupted_images_are_a_4xx_error_or_decode(client, real_images, fmt, data, as_file):
    raw = bytearray(real_images[fmt])
    for _ in range(data.draw(st.integers(1, 8), label="n_flips")):
        pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
        raw[pos] = data.draw(st.integers(0, 255), label="byte")
    # A flipped byte in pixel data can still decode (JPEG has no checksum): then it is upscaled.
    check(post(client, bytes(raw), f"image/{fmt}", as_file, {"steps": "1"}), allow_ok=True)


@FUZZ
@given(boundary=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20),
       head=st.binary(max_size=200), tail=st.binary(max_size=200), cut=st.floats(0.0, 1.0))
def test_malformed_multipart_bodies_are_a_4xx_error(client, real_images, boundary, head, tail, cut):
    b = boundary.encode()
    body = (b"--" + b + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + head + real_images["png"] + tail + b"\r\n--" + b + b"--\r\n")
    body = body[: int(len(body) * cut)]
    r = client.post("/v1/upscale", content=body,
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    # An intact body with empty head/tail is a valid upload.
    check(r, allow_ok=True)


@settings(max_examples=30, deadline=None)
@given(w=st.integers(1, 40), h=st.integers(1, 40), mode=st.sampled_from(["RGB", "L", "RGBA", "P", "1"]),
       fmt=st.sampled_from(["PNG", "WEBP", "BMP"]), seed=st.integers(0, 2**32 - 1))
def test_valid_images_of_any_small_size_are_upscaled(client, w, h, mode, fmt, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    r = client.post("/v1/upscale", files={"image": ("in", buf.getvalue(), "image/x")}, params={"steps": 1})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (4 * w, 4 * h)


def test_server_keeps_serving_after_the_fuzzing(server, client, real_images):
    r = client.post("/v1/upscale", files={"image": ("a.png", real_images["png"], "image/png")},
                    params={"steps": 1, "seed": 0})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (80, 64)
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").text
    assert 'samdiffsr_errors_total{kind="internal"}' not in metrics
    assert 'samdiffsr_errors_total{kind="worker"}' not in metrics
    five_xx = [ln for ln in metrics.splitlines()
               if ln.startswith("samdiffsr_requests_total{") and 'route="/v1/upscale"' in ln and 'status="5' in ln]
    assert not five_xx, five_xx
