"""`samdiffsr upscale` as a newcomer meets it: --version, user errors before any work and without a traceback,
the models found from any folder, `--model auto` (the service's rule), progress in tiles, a summary, --quiet."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from model.choice import is_lossy, pick_auto
from model.files import Candidate, choose_models, plan_outputs
from model.repository import MODELS_DIR_ENV, default_models_dir, shipped_models_dir
from samdiffsr.cli import main

COMMON = ["--steps", "1", "--tile", "16", "--overlap", "4", "--seed", "3"]


def samdiffsr(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it: a process, from `cwd`."""
    full = {k: v for k, v in os.environ.items() if k != MODELS_DIR_ENV}
    full.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "samdiffsr", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def inputs(photo: Path, tmp_path: Path) -> Path:
    """A folder with a PNG (a clean upload) and a JPEG (a lossy one)."""
    src = tmp_path / "in"
    src.mkdir()
    img = Image.open(photo).convert("RGB")
    img.crop((0, 0, 24, 20)).save(src / "a.png")
    img.crop((40, 40, 60, 60)).save(src / "b.jpg", quality=80)
    return src


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert re.fullmatch(r"samdiffsr \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_user_errors_fail_before_any_work_in_one_line(models_dir: Path, inputs: Path, tmp_path: Path) -> None:
    """No traceback; a missing output folder is made first (not found missing after the upscale)."""
    (tmp_path / "afile").write_text("x")
    cases = [
        ([str(inputs / "a.png"), str(tmp_path / "afile" / "sub" / "o.png")], "cannot make the folder"),
        ([str(inputs / "a.png"), str(tmp_path / "o.gif")], "use a .png, .jpg or .webp"),
        ([str(inputs), str(tmp_path / "afile")], "is a file"),
        ([str(tmp_path / "missing.png"), str(tmp_path / "o.png")], "does not exist"),
        ([str(inputs / "a.png"), str(tmp_path / "o.png"), "--model", "nope"], "no model 'nope'"),
        ([str(inputs / "a.png"), str(tmp_path / "o.png"), "--ensemble", "3"], "ensemble must be one of"),
    ]
    for args, words in cases:
        r = samdiffsr("upscale", *args, "--models-dir", str(models_dir), *COMMON, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and words in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    deep = tmp_path / "no" / "such" / "dir" / "out.png"
    r = samdiffsr("upscale", str(inputs / "a.png"), str(deep), "--models-dir", str(models_dir), *COMMON, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Image.open(deep).size == (96, 80)


def test_models_dir_from_the_environment_from_any_folder(models_dir: Path, inputs: Path, tmp_path: Path) -> None:
    """SAMDIFFSR_MODELS_DIR is honoured by `upscale`, whatever the working folder; `auto`, the default, gives the
    JPEG to `real` and the PNG to `default`, as the service does."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = samdiffsr("upscale", str(inputs), str(tmp_path / "out"), *COMMON, cwd=elsewhere,
                  env={MODELS_DIR_ENV: str(models_dir)})
    assert r.returncode == 0, r.stderr
    assert f"{inputs / 'a.png'} (24x20) -> {tmp_path / 'out' / 'a.png'} (96x80, model default)" in r.stdout
    assert f"{inputs / 'b.jpg'} (20x20) -> {tmp_path / 'out' / 'b.png'} (80x80, model real)" in r.stdout
    r = samdiffsr("upscale", str(inputs / "b.jpg"), str(tmp_path / "real.png"), "--model", "real", *COMMON,
                  cwd=elsewhere, env={MODELS_DIR_ENV: str(models_dir)})
    assert r.returncode == 0 and (tmp_path / "real.png").read_bytes() == (tmp_path / "out" / "b.png").read_bytes()


def test_the_shipped_models_are_found_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = shipped_models_dir()
    assert shipped is not None and (shipped / "default" / "config.json").is_file()  # an editable install
    monkeypatch.chdir(tmp_path)
    assert default_models_dir({}) == shipped
    assert default_models_dir({MODELS_DIR_ENV: "/m"}) == Path("/m")
    (tmp_path / "checkpoints").mkdir()
    assert default_models_dir({}) == Path("checkpoints")  # a local folder wins over the shipped one


def test_progress_in_tiles_of_the_whole_run_and_a_summary(models_dir: Path, inputs: Path, tmp_path: Path) -> None:
    r = samdiffsr("upscale", str(inputs), str(tmp_path / "out"), "--models-dir", str(models_dir), *COMMON,
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "image 1 of 2" in r.stderr and "image 2 of 2" in r.stderr
    done = re.findall(r"\b(\d+)/(\d+) \[", r.stderr)
    assert done and done[-1][0] == done[-1][1] and int(done[-1][1]) >= 2, r.stderr  # tiles of the whole run
    assert all(total == done[-1][1] for _, total in done), done  # one bar for the run, not one per image
    summary = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"upscaled 2 images: 0\.01 MP out in \d+\.\d s", summary), summary  # 96x80 + 80x80
    quiet = samdiffsr("upscale", str(inputs), str(tmp_path / "quiet"), "--models-dir", str(models_dir), *COMMON,
                      "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert sorted(p.name for p in (tmp_path / "quiet").iterdir()) == ["a.png", "b.png"]


def test_auto_is_the_services_rule(models_dir: Path, inputs: Path) -> None:
    chosen = choose_models([inputs / "a.png", inputs / "b.jpg"], "auto", models_dir, "cpu")
    assert [chosen[inputs / n].id for n in ("a.png", "b.jpg")] == ["default", "real"]
    assert is_lossy((inputs / "b.jpg").read_bytes()) and not is_lossy((inputs / "a.png").read_bytes())
    gpu = Candidate("gpu", Path("g"), "bicubic", True)
    clean, real = Candidate("default", Path("d"), "bicubic", False), Candidate("real", Path("r"), "real", False)
    assert pick_auto([clean, real, gpu], lossy=False) is gpu  # sized for the device first
    assert pick_auto([clean, real, gpu], lossy=True) is real
    assert pick_auto([clean], lossy=True) is clean  # no real-world model: the clean one


def test_outputs_of_a_folder_and_into_a_folder(inputs: Path, tmp_path: Path) -> None:
    assert plan_outputs(inputs / "a.png", tmp_path / "new") == [(inputs / "a.png", tmp_path / "new")]
    made = tmp_path / "made"
    pairs = plan_outputs(inputs / "a.png", f"{made}/")
    assert made.is_dir() and pairs == [(inputs / "a.png", made / "a.png")]
    pairs = plan_outputs(inputs, tmp_path / "all")
    assert [p.name for _, p in pairs] == ["a.png", "b.png"] and (tmp_path / "all").is_dir()
