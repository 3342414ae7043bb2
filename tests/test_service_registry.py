"""Several models, one service: the registry's sources and choices, and two tiny models served at once on a real
server (per-model batching, byte-identical outputs, 404 for unknown ids, metrics by model, `auto`)."""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from test_service_api import BASE, assert_error, sample, scrape

from model.repository import RegistryError, parse_models, sources
from samdiffsr.cli import main
from service.lifecycle import Service
from service.metrics import Metrics
from service.registry import AUTO, check_default, is_lossy
from service.settings import Settings
from service.testing import LiveServer

# ----------------------------------------------------------------------------- sources and choices


def test_sources_by_precedence_and_their_errors(models_dir: Path, tmp_path: Path) -> None:
    found = sources(None, None, models_dir)
    assert [(s.id, s.path) for s in found] == [("default", models_dir / "default"), ("real", models_dir / "real")]
    one = sources(None, models_dir / "real", models_dir)
    assert [s.id for s in one] == ["real"]
    given = sources(f"b={models_dir / 'real'}, a={models_dir / 'default'}", models_dir / "real", models_dir)
    assert [s.id for s in given] == ["b", "a"]  # SAMDIFFSR_MODELS wins, in its order
    with pytest.raises(RegistryError, match="two models with the id 'a'"):
        sources(f"a={models_dir / 'real'},a={models_dir / 'default'}", None, models_dir)
    with pytest.raises(RegistryError, match="not of the form ID=DIR"):
        parse_models("just/a/path")
    with pytest.raises(RegistryError, match="must be 1-64 letters"):
        sources(f"bad id={models_dir / 'real'}", None, models_dir)
    with pytest.raises(RegistryError, match="'auto'"):
        sources(f"auto={models_dir / 'real'}", None, models_dir)
    with pytest.raises(RegistryError, match="no models given"):
        sources(" , ", None, models_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match=f"no checkpoint directories .* in {tmp_path / 'empty'}"):
        sources(None, None, tmp_path / "empty")
    with pytest.raises(RegistryError, match="does not exist"):
        sources(None, None, tmp_path / "nowhere")
    assert check_default(None, ["x", "default"]) == "default"
    assert check_default(None, ["x", "y"]) == "x"
    assert check_default(AUTO, ["x"]) == AUTO
    with pytest.raises(RegistryError, match="SAMDIFFSR_DEFAULT_MODEL='z' is not a served model"):
        check_default("z", ["x", "y"])


def _encoded(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, fmt, **kw)
    return buf.getvalue()


def test_lossy_uploads_are_told_from_their_first_bytes() -> None:
    assert is_lossy(_encoded("JPEG"))
    assert is_lossy(_encoded("WEBP", quality=80))
    assert not is_lossy(_encoded("WEBP", lossless=True))
    assert not is_lossy(_encoded("PNG")) and not is_lossy(b"") and not is_lossy(b"RIFF")


@pytest.mark.parametrize("make, message", [
    (lambda d, t: ["--model", f"a={d / 'default'}", "--model", f"a={d / 'real'}"], "two models with the id 'a'"),
    (lambda d, t: ["--models-dir", str(t)], "no checkpoint directories (with a config.json) in {t}"),
    (lambda d, t: ["--model", f"x={t}"], "model 'x': {t} is not a checkpoint"),
    (lambda d, t: ["--models-dir", str(d), "--default-model", "nope"], "SAMDIFFSR_DEFAULT_MODEL='nope'"),
])
def test_bad_registries_refuse_to_start_naming_what_is_wrong(models_dir, tmp_path, capsys, monkeypatch, make,
                                                            message) -> None:
    for k in [k for k in __import__("os").environ if k.startswith("SAMDIFFSR_")]:
        monkeypatch.delenv(k)
    if "not a checkpoint" in message:
        (tmp_path / "config.json").write_text('{"format": "something else"}')
    assert main(["serve", "--port", "1", *make(models_dir, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(t=tmp_path) in err


# ----------------------------------------------------------------------------- two models on one server


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(photo: Path) -> list[bytes]:
    img = Image.open(photo).convert("RGB")
    return [png(img.crop((40 * i, 30, 40 * i + 28 + 4 * i, 52))) for i in range(4)]


def upload(client: httpx.Client, data: bytes, **params) -> httpx.Response:
    return client.post("/v1/upscale", files={"image": ("x.png", data, "image/png")}, params=params)


@pytest.fixture(scope="module")
def alone(models_dir: Path, inputs: list[bytes]) -> dict[tuple[str, int], bytes]:
    """Every input through each model served on its own server (seed = the input's index)."""
    out = {}
    for mid in ("default", "real"):
        with LiveServer(Settings(checkpoint=models_dir / mid, **BASE)) as srv, \
                httpx.Client(base_url=srv.url, timeout=120) as c:
            for i, data in enumerate(inputs):
                r = upload(c, data, seed=i)
                assert r.status_code == 200 and r.headers["x-model"] == mid
                out[mid, i] = r.content
    assert out["default", 0] != out["real", 0]  # two different models
    return out


def test_two_models_interleaved_under_load_match_each_served_alone(models_dir, inputs, alone) -> None:
    with LiveServer(Settings(models_dir=models_dir, **BASE)) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        listing = c.get("/v1/models").json()
        assert listing["default"] == "auto"
        assert [(m["id"], m["default"], m["degradation"]) for m in listing["models"]] == [
            ("default", True, "bicubic"), ("real", False, "real")]
        card = c.get("/v1/models/real").json()
        assert card["summary"] == "a tiny model for JPEGs" and card["name"] == "tiny-real"
        assert card["validation"] == {"jpeg75": {"steps=1": 20.0}} and card["parameters"] > 1000
        assert card["training"]["degradation"] == "real"

        jobs = [(mid, i) for i in range(len(inputs)) for mid in ("default", "real")] * 2
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda job: upload(c, inputs[job[1]], model=job[0], seed=job[1]), jobs))
        for (mid, i), r in zip(jobs, results, strict=True):
            assert r.status_code == 200 and r.headers["x-model"] == mid
            assert r.content == alone[mid, i], f"{mid} on input {i} differs from the model served alone"
        assert any(int(r.headers["x-shared-calls"]) > 0 for r in results)  # requests did share calls

        # The default (auto) gives a PNG to the model `default`; a job says which model answered.
        r = upload(c, inputs[0], seed=0)
        assert r.headers["x-model"] == "default" and r.content == alone["default", 0]
        made = c.post("/v1/jobs", files={"image": ("x.png", inputs[1], "image/png")},
                      params={"model": "real", "seed": 1})
        assert made.status_code == 202 and made.headers["x-model"] == "real"

        m = scrape(srv.url)
        for mid in ("default", "real"):
            assert sample(m, "samdiffsr_requests_total", route="/v1/upscale", status="200", model=mid) >= 8
            assert sample(m, "samdiffsr_images_total", model=mid) >= 8
            assert sample(m, "samdiffsr_denoiser_call_duration_seconds_count", model=mid) >= 1
            assert sample(m, "samdiffsr_batch_tiles_count", model=mid) >= 1
            assert sample(m, "samdiffsr_queue_wait_seconds_count", model=mid) >= 8
            assert sample(m, "samdiffsr_model_info", model=mid) == 1


def test_unknown_models_are_a_404_listing_the_known_ones(models_dir, inputs) -> None:
    with LiveServer(Settings(models_dir=models_dir, **BASE)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        for r in (upload(c, inputs[0], model="nope"),
                  c.post("/v1/jobs", files={"image": ("x.png", inputs[0], "image/png")}, data={"model": "nope"})):
            assert_error(r, 404, "unknown_model")
            assert r.json()["error"]["message"].endswith("the models are: default, real, auto")
        r = c.get("/v1/models/nope")  # a card: auto has none, so the list is of the models alone
        assert_error(r, 404, "unknown_model")
        assert r.json()["error"]["message"].endswith("the models are: default, real")
        assert upload(c, inputs[0], model="x" * 65).status_code == 422
        assert sample(scrape(srv.url), "samdiffsr_errors_total", kind="unknown_model") == 3


def test_auto_picks_the_real_world_model_for_lossy_uploads(models_dir, photo) -> None:
    img = Image.open(photo).convert("RGB").crop((0, 0, 24, 20))
    jpeg, webp, lossless = io.BytesIO(), io.BytesIO(), io.BytesIO()
    img.save(jpeg, "JPEG", quality=75)
    img.save(webp, "WEBP", quality=75)
    img.save(lossless, "WEBP", lossless=True)
    with LiveServer(Settings(models_dir=models_dir, **BASE)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/v1/models").json()["default"] == "auto"
        assert upload(c, jpeg.getvalue()).headers["x-model"] == "real"
        assert upload(c, webp.getvalue()).headers["x-model"] == "real"
        assert upload(c, lossless.getvalue()).headers["x-model"] == "default"
        assert upload(c, png(img)).headers["x-model"] == "default"
        assert upload(c, jpeg.getvalue(), model="default").headers["x-model"] == "default"  # a named model wins
        assert upload(c, png(img), model="auto").headers["x-model"] == "default"


def test_a_registry_without_a_real_world_model_answers_auto_with_the_default(models_dir, tmp_path, photo) -> None:
    shutil.copytree(models_dir / "default", tmp_path / "clean")
    buf = io.BytesIO()
    Image.open(photo).convert("RGB").crop((0, 0, 24, 20)).save(buf, "JPEG")
    with LiveServer(Settings(models=f"clean={tmp_path / 'clean'}", default_model="auto", **BASE)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        assert upload(c, buf.getvalue()).headers["x-model"] == "clean"


def test_the_memory_budget_sets_aside_every_models_weights(models_dir) -> None:
    from service.admission import MB

    with LiveServer(Settings(models_dir=models_dir, **{**BASE, "memory_budget_mb": 64})) as srv:
        models = srv.service.registry.models.values()
        weights = sum(m.weight_bytes for m in models)
        assert weights == 4 * sum(m.parameters for m in models) > 0
        assert srv.service.budget.limit == 64 * MB - weights


def test_each_model_is_tiled_at_its_own_size_unless_the_operator_sets_one(models_dir, inputs) -> None:
    """`real` (an LR-space model) asks for 32-px tiles in its config, `default` says nothing (64);
    SAMDIFFSR_TILE_SIZE, when set, is every model's."""
    own = {k: v for k, v in BASE.items() if k != "tile_size"}
    with LiveServer(Settings(models_dir=models_dir, **own)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        assert [c.get(f"/v1/models/{m}").json()["tile_size"] for m in ("default", "real")] == [64, 32]
        assert upload(c, inputs[0], model="real").status_code == 200
    with LiveServer(Settings(models_dir=models_dir, **BASE)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        assert [c.get(f"/v1/models/{m}").json()["tile_size"] for m in ("default", "real")] == [16, 16]
    service = Service(Settings(models_dir=models_dir, **{**own, "tile_overlap": 20}), Metrics())
    with pytest.raises(RegistryError, match=r"'real': SAMDIFFSR_TILE_OVERLAP \(20\) must be at most half of its tile"):
        service.start()


def _sized(src: Path, dst: Path, device: str) -> Path:
    """A copy of checkpoint `src` whose config says it was sized for `device` (`extras.device`)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model"]["extras"] = {**cfg["model"].get("extras", {}), "device": device}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_auto_prefers_the_model_sized_for_the_replicas_device(models_dir, tmp_path, photo) -> None:
    """A CPU replica serving a GPU-sized model, the default and a CPU-sized model: clean uploads that name no model
    get the CPU-sized one (a CUDA replica would pick the GPU-sized one the same way); the others by name."""
    gpu = _sized(models_dir / "default", tmp_path / "gpu", "cuda")
    small = _sized(models_dir / "default", tmp_path / "small", "cpu")
    img = Image.open(photo).convert("RGB").crop((0, 0, 24, 20))
    jpeg = io.BytesIO()
    img.save(jpeg, "JPEG", quality=75)
    models = f"gpu={gpu},default={models_dir / 'default'},small={small},real={models_dir / 'real'}"
    with LiveServer(Settings(models=models, **BASE)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        cards = {m["id"]: m for m in c.get("/v1/models").json()["models"]}
        assert {k: (v["sized_for"], v["default"]) for k, v in cards.items()} == {
            "gpu": ("cuda", False), "default": (None, False), "small": ("cpu", True), "real": (None, False)}
        assert upload(c, png(img)).headers["x-model"] == "small"
        assert upload(c, jpeg.getvalue()).headers["x-model"] == "real"  # lossy: the real-world model first
        assert upload(c, png(img), model="gpu").headers["x-model"] == "gpu"
    with LiveServer(Settings(models=f"gpu={gpu},default={models_dir / 'default'}", **BASE)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        assert upload(c, png(img)).headers["x-model"] == "default"  # nothing sized for the CPU: as before


def test_a_model_on_pretrained_weights_serves_their_notice_with_its_card(tmp_path: Path, photo: Path) -> None:
    """A checkpoint built on published weights (RLFN) carries their NOTICE; the service returns it in the card."""
    import dataclasses

    from conftest import SHARED

    from model.config import PRESETS
    from model.published import import_pretrained

    cfg = dataclasses.replace(PRESETS["tiny"], encoder="rlfn", denoiser_space="lr", prediction="sample",
                              residual_base="rrdb", extras={"default_tile": 32})
    import_pretrained(tmp_path / "rlfn", cfg, {"rlfn": SHARED / "pretrained" / "rlfn"}, "tiny-rlfn")
    with LiveServer(Settings(checkpoint=tmp_path / "rlfn", **BASE)) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        card = c.get("/v1/models/rlfn").json()
        assert [b["licence"] for b in card["builds_on"]] == ["MIT"]
        assert "RLFN" in card["builds_on"][0]["network"] and "Kong" in card["builds_on"][0]["paper"]
        assert card["notice"] == (tmp_path / "rlfn" / "NOTICE").read_text()
        assert "Permission is hereby granted" in card["notice"]
        data = png(Image.open(photo).convert("RGB").crop((0, 0, 40, 30)))
        r = upload(c, data, seed=1)
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (160, 120)
