"""The asynchronous jobs API on a real uvicorn server with the tiny model: submit, poll, fetch, cancel,
progress events, expiry, auth and metrics."""

from __future__ import annotations

import io
import itertools
import json
import time

import httpx
import pytest
from PIL import Image
from test_service_api import BASE, assert_error, crop, png, sample, scrape

from service.settings import Settings
from service.testing import LiveServer

POLL_S = 0.05


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with LiveServer(Settings(checkpoint=tiny_checkpoint, **BASE)) as srv:
        yield srv


@pytest.fixture(scope="module")
def photo_img(photo) -> Image.Image:
    return Image.open(photo).convert("RGB")


def submit(client: httpx.Client, data: bytes, params: dict | None = None, **kw) -> httpx.Response:
    return client.post("/v1/jobs", files={"image": ("in.png", data, "image/png")}, params=params or {}, **kw)


def wait_for(client: httpx.Client, job_id: str, until: set[str], limit_s: float = 120, **kw) -> dict:
    """Poll the job until its status is in `until`; the progress it reports never goes back."""
    end = time.monotonic() + limit_s
    last = 0
    while time.monotonic() < end:
        r = client.get(f"/v1/jobs/{job_id}", **kw)
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["progress"]["steps_done"] >= last
        last = info["progress"]["steps_done"]
        if info["status"] in until:
            return info
        time.sleep(POLL_S)
    pytest.fail(f"job {job_id} not {until} after {limit_s} s")


def test_submit_poll_and_fetch_the_same_bytes_as_the_synchronous_endpoint(server, client, photo_img):
    data = png(crop(photo_img, 28, 20))
    r = submit(client, data, {"seed": 5, "bicubic": "true"})
    assert r.status_code == 202, r.text
    created = r.json()
    job_id = created["id"]
    assert created["status"] in ("queued", "running")
    assert r.headers["location"] == created["urls"]["status"] == f"/v1/jobs/{job_id}"
    assert created["urls"]["result"] == f"/v1/jobs/{job_id}/result"
    assert job_id.startswith("job_") and len(job_id) >= 32  # 192 random bits

    info = wait_for(client, job_id, {"succeeded"})
    p = info["progress"]
    assert p["fraction"] == 1 and p["tiles_done"] == p["tiles_total"] == 4
    assert p["steps_done"] == p["steps_total"] == 4 * 2  # 4 tiles x the default 2 steps
    assert info["params"] == {"model": "tiny", "steps": 2, "sampler": "ddim", "seed": 5, "ensemble": 1,
                              "output_format": "png", "quality": 95}
    assert info["input_size"] == [28, 20] and info["output_size"] == [112, 80]
    assert info["error"] is None and info["finished_at"] and info["expires_at"]
    t = info["timings"]
    assert t["queue_s"] >= 0 and t["sample_s"] >= 0 and t["encode_s"] >= 0 and t["total_s"] > 0

    result = client.get(f"/v1/jobs/{job_id}/result")
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    assert result.headers["x-seed"] == "5" and result.headers["x-image-size"] == "112x80"
    assert result.headers["content-disposition"] == 'inline; filename="in_x4.png"'  # the upload's name
    sync = client.post("/v1/upscale", files={"image": ("in.png", data, "image/png")}, params={"seed": 5})
    assert sync.status_code == 200 and result.content == sync.content  # byte-identical

    bicubic = client.get(f"/v1/jobs/{job_id}/bicubic")
    assert bicubic.status_code == 200 and bicubic.content != result.content
    assert Image.open(io.BytesIO(bicubic.content)).size == (112, 80)

    # A raw body and form fields work as on /v1/upscale; steps=0 (the fidelity mode) too.
    raw = client.post("/v1/jobs", content=data, headers={"content-type": "image/png"},
                      params={"seed": 5, "steps": 0, "output_format": "webp"})
    assert raw.status_code == 202, raw.text
    info = wait_for(client, raw.json()["id"], {"succeeded"})
    assert info["progress"] == {"fraction": 1, "steps_done": 0, "steps_total": 0, "tiles_done": 4,
                                "tiles_total": 4}
    fid = client.get(info["urls"]["result"])
    assert fid.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(fid.content)).size == (112, 80)
    assert_error(client.get(info["urls"]["status"] + "/bicubic"), 409, "job_not_done")  # not asked for


def test_errors_are_those_of_the_synchronous_endpoint(client, photo_img):
    assert_error(submit(client, b"not an image"), 400, "invalid_image")
    assert_error(submit(client, png(crop(photo_img, 80, 60))), 413, "image_too_large")
    assert_error(submit(client, png(crop(photo_img, 12, 10)), {"steps": 101}), 422, "invalid_parameter")
    assert_error(client.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}), 415,
                 "unsupported_media_type")
    assert_error(client.post("/v1/jobs", files={"file": ("a.png", b"x", "image/png")}), 422, "missing_image")
    for method, path in [("GET", ""), ("GET", "/result"), ("GET", "/events"), ("DELETE", "")]:
        assert_error(client.request(method, f"/v1/jobs/job_unknown{path}"), 404, "job_not_found")


def test_cancel_mid_run_frees_the_batch(server, client, photo_img):
    before = scrape(server.url)
    r = submit(client, png(crop(photo_img, 40, 40)), {"steps": 100})
    job_id = r.json()["id"]
    end = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job_id}").json()["progress"]["steps_done"] == 0:
        assert time.monotonic() < end, "the job never started"
        time.sleep(POLL_S)
    early = client.get(f"/v1/jobs/{job_id}/result")
    err = assert_error(early, 409, "job_not_done")
    assert 1 <= int(early.headers["retry-after"]) <= 60 and 0 < float(early.headers["x-job-progress"]) < 1
    assert "% done: " in err["message"] and "of 900 denoiser steps" in err["message"], err
    info = client.delete(f"/v1/jobs/{job_id}").json()
    assert info["status"] == "cancelled" and 0 < info["progress"]["fraction"] < 1
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    late = client.get(f"/v1/jobs/{job_id}/result")
    err = assert_error(late, 409, "job_not_done")
    assert "cancelled" in err["message"] and "retry-after" not in late.headers  # no retry helps
    end = time.monotonic() + 30
    while sample(scrape(server.url), "samdiffsr_tiles_in_flight") != 0:  # its tiles left the batch
        assert time.monotonic() < end, "the cancelled job's tiles are still sampled"
        time.sleep(POLL_S)
    after = scrape(server.url)
    assert (sample(after, "samdiffsr_jobs_finished_total", status="cancelled")
            - sample(before, "samdiffsr_jobs_finished_total", status="cancelled")) == 1
    assert sample(after, "samdiffsr_jobs", status="cancelled") >= 1
    # The worker serves the next job at once.
    ok = submit(client, png(crop(photo_img, 12, 10)))
    assert wait_for(client, ok.json()["id"], {"succeeded", "failed"})["status"] == "succeeded"


def test_progress_events(client, photo_img):
    # 9 tiles, more than the 8 sampled at once: tiles finish while others wait for their turn.
    job_id = submit(client, png(crop(photo_img, 40, 40)), {"steps": 20}).json()["id"]
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert events and events[-1]["status"] == "succeeded" and events[-1]["progress"]["fraction"] == 1
    progress = [e["progress"] for e in events]
    assert progress[-1]["steps_total"] == progress[-1]["steps_done"] == 9 * 20
    done = [p["steps_done"] for p in progress]
    assert done == sorted(done)  # never back
    # One event per change of (status, steps, tiles): all steps can be done while the image is still rendered.
    keys = [(e["status"], e["progress"]["steps_done"], e["progress"]["tiles_done"]) for e in events]
    assert all(a != b for a, b in itertools.pairwise(keys))
    assert all(p["steps_done"] >= 20 * p["tiles_done"] for p in progress)
    assert any(0 < p["tiles_done"] < 9 for p in progress)  # finished tiles count while others run


def test_metrics_of_jobs(server, client, photo_img):
    job_id = submit(client, png(crop(photo_img, 12, 10))).json()["id"]
    wait_for(client, job_id, {"succeeded"})
    m = scrape(server.url)
    assert sample(m, "samdiffsr_jobs", status="succeeded") >= 1
    assert ("samdiffsr_jobs", (("status", "queued"),)) in m
    assert sample(m, "samdiffsr_jobs_finished_total", status="succeeded") >= 1
    assert sample(m, "samdiffsr_job_queue_wait_seconds_count") >= 1
    assert sample(m, "samdiffsr_job_store_bytes") > 0
    assert sample(m, "samdiffsr_requests_total", route="/v1/jobs", method="POST", status="202") >= 1
    assert sample(m, "samdiffsr_requests_total", route="/v1/jobs/{job_id}", method="GET", status="200") >= 1


def test_results_expire_by_size_and_by_time(tiny_checkpoint, photo_img):
    first_png = png(crop(photo_img, 28, 20))
    settings = Settings(checkpoint=tiny_checkpoint, **{**BASE, "job_ttl_s": 2.0, "job_store_max_bytes": 30_000})
    with LiveServer(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        a = submit(c, first_png, {"seed": 1}).json()["id"]
        wait_for(c, a, {"succeeded"})
        size_a = len(c.get(f"/v1/jobs/{a}/result").content)
        assert 15_000 < size_a < 30_000  # two such results do not fit
        b = submit(c, first_png, {"seed": 2}).json()["id"]
        wait_for(c, b, {"succeeded"})
        err = assert_error(c.get(f"/v1/jobs/{a}"), 410, "job_expired")  # the oldest went first
        assert "SAMDIFFSR_JOB_STORE_MAX_BYTES" in err["message"]
        assert_error(c.get(f"/v1/jobs/{a}/result"), 410, "job_expired")
        assert sample(scrape(srv.url), "samdiffsr_job_store_bytes") == len(c.get(f"/v1/jobs/{b}/result").content)
        end = time.monotonic() + 30
        while c.get(f"/v1/jobs/{b}").status_code == 200:  # then the time limit
            assert time.monotonic() < end, "the result never expired"
            time.sleep(0.1)
        assert_error(c.get(f"/v1/jobs/{b}/result"), 410, "job_expired")
        assert sample(scrape(srv.url), "samdiffsr_job_store_bytes") == 0
        # DELETE of a finished job forgets it at once.
        d = submit(c, png(crop(photo_img, 12, 10))).json()["id"]
        wait_for(c, d, {"succeeded"})
        assert c.delete(f"/v1/jobs/{d}").json()["status"] == "succeeded"
        assert_error(c.get(f"/v1/jobs/{d}/result"), 410, "job_expired")


def test_jobs_need_the_bearer_token_and_share_the_queue_limit(tiny_checkpoint, photo_img):
    settings = Settings(checkpoint=tiny_checkpoint, auth_token="s3cret", **{**BASE, "max_queue": 1})
    auth = {"authorization": "Bearer s3cret"}
    with LiveServer(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        data = png(crop(photo_img, 40, 40))
        assert_error(submit(c, data), 401, "unauthorized")
        r = submit(c, data, {"steps": 100}, headers=auth)
        assert r.status_code == 202
        job_id = r.json()["id"]
        for path in ("", "/result", "/events"):
            assert_error(c.get(f"/v1/jobs/{job_id}{path}"), 401, "unauthorized")
            assert_error(c.get(f"/v1/jobs/{job_id}{path}", headers={"authorization": "Bearer wrong"}), 401,
                         "unauthorized")
        assert_error(c.delete(f"/v1/jobs/{job_id}"), 401, "unauthorized")
        assert c.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] in ("queued", "running")
        full = submit(c, data, headers=auth)  # one job in progress fills max_queue=1, as on /v1/upscale
        assert_error(full, 503, "queue_full")
        assert c.delete(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "cancelled"
