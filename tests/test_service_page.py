"""The try-it page at `/` in a real headless Chromium (Debian's `chromium` and `chromedriver`, driven by
Selenium): upload, progress, before/after, download, errors in words, the bearer-token field.

`make system-deps` installs the browser; without it these tests are skipped with the reason. To refresh the
documentation's screenshot with the shipped models (their tile size and default step):

    SAMDIFFSR_PAGE_CHECKPOINT=checkpoints SAMDIFFSR_PAGE_STEPS=1 SAMDIFFSR_PAGE_SCREENSHOT=docs/page.png \\
        .venv/bin/python -m pytest tests/test_service_page.py -k finished
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.settings import Settings
from service.testing import LiveServer

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the dev extra is not installed
    webdriver = None

SETTINGS = dict(tile_size=32, tile_overlap=4, max_tiles_per_batch=4, default_steps=2, torch_threads=1,
                max_pixels=256 * 256, max_upload_bytes=1024 * 1024, drain_timeout_s=5, device="cpu")
CROP = (120, 30, 320, 160)  # 200x130 of the cat's face
STEPS = os.environ.get("SAMDIFFSR_PAGE_STEPS", "3")
WAIT_S = 120


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), or skip saying what is missing."""
    if webdriver is None:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no headless browser: run `make system-deps` (Debian: apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WebDriver, Path]]:
    chromium, driver_path = browser_paths()
    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,1400", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=opts, service=ChromeService(executable_path=driver_path))
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver, downloads
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    checkpoint = os.environ.get("SAMDIFFSR_PAGE_CHECKPOINT")  # a checkpoint, or a folder of them (checkpoints/)
    own = {"tile_size": 64, "tile_overlap": 8, "default_steps": None} if checkpoint else {}  # a real model's
    where = Path(checkpoint or tiny_checkpoint)
    source = {"checkpoint": where} if (where / "config.json").is_file() else {"models_dir": where}
    with LiveServer(Settings(**source, **{**SETTINGS, **own})) as srv:
        yield srv


@pytest.fixture(scope="module")
def image_file(photo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upload") / "chelsea.png"
    Image.open(photo).convert("RGB").crop(CROP).save(path)
    return path


def until(driver: WebDriver, script: str, what: str, timeout: float = WAIT_S) -> object:
    """Wait until the JavaScript expression `script` is truthy; on failure say what the page shows."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: d.execute_script(f"return {script}"))
    except TimeoutException:
        shown = driver.execute_script("return document.getElementById('error').textContent + ' | ' + "
                                      "document.getElementById('status-text').textContent")
        pytest.fail(f"the page never showed {what} (page says: {shown})")


def set_value(driver: WebDriver, element_id: str, value: str) -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
                          element_id, value)


def test_upscale_a_photo_on_the_finished_page(server, browser, image_file):
    driver, downloads = browser
    driver.get(server.url + "/")
    until(driver, "document.getElementById('model-select').options.length > 0", "the models")
    assert driver.find_element(By.ID, "submit").get_attribute("disabled")  # nothing chosen yet
    set_value(driver, "steps", STEPS)
    assert driver.find_element(By.ID, "steps-value").text == STEPS
    set_value(driver, "seed", "7")
    set_value(driver, "ensemble", "2")
    driver.find_element(By.ID, "file").send_keys(str(image_file))
    assert "chelsea.png" in driver.find_element(By.ID, "drop-text").text
    driver.find_element(By.ID, "submit").click()

    until(driver, "!document.getElementById('result').hidden", "the result")
    assert driver.find_element(By.ID, "progress").get_attribute("value") == "1"
    assert driver.find_element(By.ID, "error").is_displayed() is False
    w, h = CROP[2] - CROP[0], CROP[3] - CROP[1]
    sizes = driver.execute_script("return ['after', 'before'].map(id => { const i = document.getElementById(id);"
                                  "return [i.naturalWidth, i.naturalHeight, i.complete]; })")
    assert sizes == [[4 * w, 4 * h, True], [4 * w, 4 * h, True]]
    text = driver.find_element(By.ID, "result-text").text
    assert f"{w}×{h} → {4 * w}×{4 * h} in " in text and " s; model " in text, text
    assert driver.find_element(By.ID, "download").text == "Download chelsea_x4.png"
    assert "ensemble of 2" in driver.find_element(By.ID, "result-text").text
    set_value(driver, "slider", "30")  # the before/after slider moves the split
    assert driver.execute_script("return document.getElementById('after').style.clipPath") == "inset(0px 0px 0px 30%)"
    set_value(driver, "slider", "50")

    if os.environ.get("SAMDIFFSR_PAGE_SCREENSHOT"):
        driver.save_screenshot(os.environ["SAMDIFFSR_PAGE_SCREENSHOT"])
    driver.find_element(By.ID, "download").click()
    target = downloads / "chelsea_x4.png"
    end = time.monotonic() + 30
    while not target.exists() and time.monotonic() < end:
        time.sleep(0.1)
    assert target.exists(), f"no download; the folder holds {sorted(p.name for p in downloads.iterdir())}"
    sync = httpx.post(f"{server.url}/v1/upscale", files={"image": ("a.png", image_file.read_bytes(), "image/png")},
                      params={"steps": STEPS, "seed": 7, "ensemble": 2}, timeout=WAIT_S)
    assert target.read_bytes() == sync.content  # the downloaded file is the service's image


def test_a_bad_file_shows_an_error_in_words(server, browser, tmp_path):
    driver, _ = browser
    driver.get(server.url + "/")
    until(driver, "document.getElementById('model-select').options.length > 0", "the models")
    bad = tmp_path / "holiday.png"
    bad.write_text("this is a shopping list, not a picture")
    driver.find_element(By.ID, "file").send_keys(str(bad))
    driver.find_element(By.ID, "submit").click()
    until(driver, "!document.getElementById('error').hidden", "an error")
    text = driver.find_element(By.ID, "error").text
    assert text.startswith("This file could not be read as an image."), text
    assert driver.find_element(By.ID, "result").is_displayed() is False
    assert driver.find_element(By.ID, "submit").is_enabled()  # ready for another try


def test_the_token_field(tiny_checkpoint, browser, image_file):
    driver, _ = browser
    with LiveServer(Settings(checkpoint=tiny_checkpoint, auth_token="s3cret", **SETTINGS)) as srv:
        assert httpx.get(srv.url + "/").status_code == 200  # the page is public; its API calls carry the token
        driver.get(srv.url + "/")
        until(driver, "!document.getElementById('error').hidden", "the missing-token error")
        assert "needs an access token" in driver.find_element(By.ID, "error").text
        set_value(driver, "token", "s3cret")
        until(driver, "document.getElementById('model-select').options.length > 0", "the models")
        assert driver.find_element(By.ID, "error").is_displayed() is False
        set_value(driver, "steps", "0")  # the fidelity mode
        assert driver.find_element(By.ID, "steps-value").text.startswith("0 (fidelity")
        driver.find_element(By.ID, "file").send_keys(str(image_file))
        driver.find_element(By.ID, "submit").click()
        until(driver, "!document.getElementById('result').hidden", "the result")
        assert "0 steps" in driver.find_element(By.ID, "result-text").text


def test_pick_a_model_that_is_not_the_default(models_dir, browser, image_file):
    """Two models served: the selector lists both with their cards; the non-default one answers."""
    driver, _ = browser
    with LiveServer(Settings(models_dir=models_dir, **SETTINGS)) as srv:
        driver.get(srv.url + "/")
        until(driver, "document.getElementById('model-select').options.length === 3", "both models and auto")
        options = driver.execute_script("return [...document.getElementById('model-select').options]"
                                        ".map(o => [o.value, o.text])")
        assert options == [["auto", "auto"], ["default", "default"], ["real", "real"]]  # ids, short: no overflow
        assert driver.execute_script("return document.getElementById('model-select').value") == "auto"
        set_value(driver, "model-select", "real")
        card = driver.find_element(By.ID, "model-card").text
        assert card.startswith("real: a tiny model for JPEGs") and "real-world" in card
        set_value(driver, "seed", "3")
        driver.find_element(By.ID, "file").send_keys(str(image_file))
        driver.find_element(By.ID, "submit").click()
        until(driver, "!document.getElementById('result').hidden", "the result")
        assert "model real" in driver.find_element(By.ID, "result-text").text
        shown = driver.execute_script("return document.getElementById('download').href")
        page_bytes = bytes(driver.execute_async_script(
            "const done = arguments[1]; fetch(arguments[0]).then(r => r.arrayBuffer())"
            ".then(b => done(Array.from(new Uint8Array(b))));", shown))
        steps = driver.execute_script("return document.getElementById('steps').value")
        files = {"image": ("a.png", image_file.read_bytes(), "image/png")}
        real = httpx.post(f"{srv.url}/v1/upscale", files=files, params={"model": "real", "seed": 3, "steps": steps},
                          timeout=WAIT_S)
        default = httpx.post(f"{srv.url}/v1/upscale", files=files, params={"seed": 3, "steps": steps},
                             timeout=WAIT_S)
        assert real.headers["x-model"] == "real" and default.headers["x-model"] == "default"
        assert page_bytes == real.content != default.content


def overflow(driver: WebDriver) -> int:
    """How many CSS pixels the document is wider than the window (0: no horizontal scrollbar)."""
    return driver.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")


@pytest.fixture(scope="module")
def wordy_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two tiny models with summaries as long as the shipped ones' (what widened the page before)."""
    import json

    root = tmp_path_factory.mktemp("wordy")
    for name in ("default", "real"):
        shutil.copytree(models_dir / name, root / name)
        cfg = json.loads((root / name / "config.json").read_text())
        cfg.setdefault("card", {})["summary"] = ("for JPEGs and noisy photos (web, phones, messengers); trained on "
                                                 "220 photos with blur, noise and JPEG at qualities 30 to 95")
        (root / name / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.mark.parametrize("width", [1280, 390])
def test_the_page_fits_the_window_without_horizontal_scrolling(wordy_models, browser, image_file, width):
    """At a desktop's and a phone's width nothing is wider than the window: the form, the model's card, the
    result and its before/after viewer."""
    driver, _ = browser
    size = driver.get_window_size()
    with LiveServer(Settings(models_dir=wordy_models, **SETTINGS)) as srv:
        try:
            driver.set_window_size(width, 900)
            assert driver.execute_script("return window.innerWidth") <= width
            driver.get(srv.url + "/")
            until(driver, "document.getElementById('model-select').options.length === 3", "the models")
            assert overflow(driver) == 0, f"the page is {overflow(driver)} px wider than the window at {width} px"
            set_value(driver, "steps", "0")
            driver.find_element(By.ID, "file").send_keys(str(image_file))
            driver.find_element(By.ID, "submit").click()
            until(driver, "!document.getElementById('result').hidden", "the result")
            shown = driver.execute_script("const r = document.getElementById('after').getBoundingClientRect();"
                                          "return [r.left, r.right, document.documentElement.clientWidth]")
            assert shown[0] >= 0 and shown[1] <= shown[2], f"the result is outside the window: {shown}"
            assert overflow(driver) == 0, f"with a result, the page is {overflow(driver)} px too wide at {width} px"
        finally:
            driver.set_window_size(size["width"], size["height"])


def test_auto_shows_which_model_the_chosen_file_gets(models_dir, browser, image_file, tmp_path):
    """With `auto`, the page names (by id) the model the server will give the chosen file: `real` for a JPEG,
    `default` for a PNG; and that model answers."""
    driver, _ = browser
    jpeg = tmp_path / "chelsea.jpg"
    Image.open(image_file).save(jpeg, quality=80)
    with LiveServer(Settings(models_dir=models_dir, **SETTINGS)) as srv:
        listed = httpx.get(srv.url + "/v1/models").json()
        assert listed["default"] == "auto" and listed["auto"] == {"lossy": "real", "other": "default"}
        driver.get(srv.url + "/")
        until(driver, "document.getElementById('model-select').options.length === 3", "the models")
        card = driver.find_element(By.ID, "model-card").text
        assert "JPEG and lossy WebP images go to real, other images to default" in card, card
        assert "tiny-" not in card  # ids, not the checkpoints' internal names
        for path, model in ((jpeg, "real"), (image_file, "default")):
            driver.find_element(By.ID, "file").send_keys(str(path))
            until(driver, f"document.getElementById('model-card').dataset.model === '{model}'", f"the model {model}")
            card = driver.find_element(By.ID, "model-card").text
            assert card.startswith(f"auto: this {'lossy' if model == 'real' else 'lossless'}"), card
            assert f"goes to {model}." in card and "tiny-" not in card, card
        set_value(driver, "steps", "0")
        driver.find_element(By.ID, "submit").click()
        until(driver, "!document.getElementById('result').hidden", "the result")
        assert "model default" in driver.find_element(By.ID, "result-text").text


@pytest.fixture(scope="module")
def measured_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two tiny models; `real`'s card has validation figures at the served steps and two self-ensembles."""
    import json

    root = tmp_path_factory.mktemp("measured")
    for name in ("default", "real"):
        shutil.copytree(models_dir / name, root / name)
    cfg = json.loads((root / "real" / "config.json").read_text())
    cfg["card"]["validation"] = {"jpeg75": {"steps=1": [19.0, 0.5], f"steps={SETTINGS['default_steps']}": [20.0, 0.6],
                                            "ensemble=2": [20.25, 0.61], "ensemble=4": [20.25, 0.62]},
                                 "bicubic": {f"steps={SETTINGS['default_steps']}": [25.0, 0.7]}}
    (root / "real" / "config.json").write_text(json.dumps(cfg))
    return root


def test_the_card_shows_what_each_self_ensemble_measured(measured_models, browser):
    """The figures a model's card carries for its own inputs are on the page, and the self-ensemble that measured
    highest (the fewer members among equals) is named beside the menu, for that model only."""
    driver, _ = browser
    label = "return document.querySelector('label[for=ensemble]').textContent"
    with LiveServer(Settings(models_dir=measured_models, **SETTINGS)) as srv:
        driver.get(srv.url + "/")
        until(driver, "document.getElementById('model-select').options.length === 3", "the models")
        set_value(driver, "model-select", "real")
        card = driver.find_element(By.ID, "model-card").text
        assert card.endswith("On our validation photos (saved as JPEG at quality 75): 20.00 dB PSNR-Y; "
                             "self-ensemble 2: 20.25; self-ensemble 4: 20.25."), card
        assert driver.execute_script(label) == "Self-ensemble (more work, higher fidelity; best for real: 2)"
        set_value(driver, "model-select", "default")  # its card has no figures: nothing measured, nothing named
        assert "validation photos" not in driver.find_element(By.ID, "model-card").text
        assert driver.execute_script(label) == "Self-ensemble (more work, higher fidelity)"
