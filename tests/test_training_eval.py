"""Evaluation: metrics against independently computed values, LR degradation, `samdiffsr eval` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS
from PIL import Image

from samdiffsr.cli import main
from training.degrade import crop_to_multiple, make_lr, make_lr_numpy
from training.evaluate import Lpips
from training.metrics import psnr_y, rgb_to_y, ssim_y

C1 = (0.01 * 255) ** 2  # SSIM's stabilising constant for data range 255


def test_y_channel_is_bt601_as_in_matlab() -> None:
    from skimage.color import rgb2ycbcr  # an independent implementation of the same convention

    rgb = np.random.default_rng(0).random((5, 7, 3))
    np.testing.assert_allclose(rgb_to_y(rgb), rgb2ycbcr(rgb)[..., 0], atol=1e-9)
    assert rgb_to_y(np.zeros((1, 1, 3)))[0, 0] == pytest.approx(16.0)
    assert rgb_to_y(np.ones((1, 1, 3)))[0, 0] == pytest.approx(235.0)


def test_psnr_y_closed_form_and_border_crop() -> None:
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 230, (40, 52, 3)) / 255.0
    sr = hr + 4 / 255.0  # every channel +4 levels -> Y differs by 4 * 219 / 255 everywhere
    sr[:4] = rng.random((4, 52, 3))  # garbage in the 4-px border is cropped away
    sr[:, -4:] = 0.0
    expected = 10 * math.log10(255.0**2 / (4 * 219 / 255.0) ** 2)
    assert psnr_y(sr, hr, border=4) == pytest.approx(expected, abs=1e-9)
    assert psnr_y(sr, hr, border=0) < expected - 1
    assert math.isinf(psnr_y(hr, hr, border=4))
    with pytest.raises(ValueError, match="same size"):
        psnr_y(sr[:-1], hr, 4)
    with pytest.raises(ValueError, match="too small"):
        psnr_y(hr[:8, :8], hr[:8, :8], 4)


def test_ssim_closed_forms() -> None:
    # Two flat images: no variance, so SSIM reduces to the luminance term (2 ab + C1) / (a^2 + b^2 + C1).
    a_rgb, b_rgb = 0.2, 0.7
    a, b = 16 + 219 * a_rgb, 16 + 219 * b_rgb
    expected = (2 * a * b + C1) / (a * a + b * b + C1)
    flat_a, flat_b = np.full((32, 32, 3), a_rgb), np.full((32, 32, 3), b_rgb)
    assert ssim_y(flat_b, flat_a, border=4) == pytest.approx(expected, abs=1e-9)
    textured = np.random.default_rng(2).random((48, 48, 3))
    assert ssim_y(textured, textured, border=4) == pytest.approx(1.0)
    # differences confined to the border do not count
    other = textured.copy()
    other[:, :3] = 0
    assert ssim_y(other, textured, border=4) == pytest.approx(1.0)
    assert ssim_y(other, textured, border=0) < 0.999  # only windows reaching into columns 0-2


def test_ssim_matches_wang_et_al_gaussian_definition() -> None:
    """SSIM recomputed from its definition (11x11 Gaussian window, sigma 1.5, valid region)."""
    from scipy.signal import correlate2d

    rng = np.random.default_rng(3)
    hr = rng.random((40, 40, 3))
    sr = np.clip(hr + rng.normal(0, 0.05, hr.shape), 0, 1)
    x, y = rgb_to_y(hr), rgb_to_y(sr)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()

    def f(img: np.ndarray) -> np.ndarray:
        return correlate2d(img, win, mode="valid")

    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c2 = (0.03 * 255) ** 2
    s = ((2 * mx * my + C1) * (2 * cxy + c2)) / ((mx**2 + my**2 + C1) * (vx + vy + c2))
    # skimage averages over the image minus a (win-1)/2 border: exactly the 'valid' windows
    assert ssim_y(sr, hr, border=0) == pytest.approx(float(s.mean()), abs=1e-6)


def _matlab_cubic(x: np.ndarray) -> np.ndarray:
    """The kernel of MATLAB's imresize 'bicubic' (Keys, a = -0.5)."""
    ax = np.abs(x)
    return np.where(ax <= 1, 1.5 * ax**3 - 2.5 * ax**2 + 1,
                    np.where(ax <= 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0))


def test_make_lr_matches_matlab_imresize_weights() -> None:
    """An impulse far from the borders, against MATLAB's antialiased imresize(x, 1/4) written out: LR pixel j
    is centred on HR coordinate 4j + 1.5 and weighs HR pixel r by cubic((4j + 1.5 - r) / 4), normalised over
    its 16 taps; the filter is separable."""
    taps = np.arange(-7.5, 8.0)  # offsets of the 16 HR pixels an interior LR pixel sees
    norm = _matlab_cubic(taps / 4).sum()

    def weight(j: int, r: int) -> float:
        return float(_matlab_cubic(np.array((4 * j + 1.5 - r) / 4)) / norm)

    p = 37
    impulse = torch.full((3, 80, 80), 0.5)  # on grey: negative lobes are not clipped
    impulse[:, 40, p] = 0.9
    lr = make_lr(impulse, quantize=False)[0, 10].double().numpy()  # LR row 10 sees HR row 40
    expected = np.array([0.5 + 0.4 * weight(10, 40) * weight(j, p) for j in range(20)])
    np.testing.assert_allclose(lr[2:18], expected[2:18], atol=1e-6)  # columns whose taps avoid the borders
    assert (expected[2:18] != 0.5).sum() == 4 and expected.min() < 0.5  # the taps and a negative lobe


def test_make_lr_matlab_bicubic_properties() -> None:
    flat = torch.full((3, 16, 24), 0.4)
    lr = make_lr(flat)
    assert lr.shape == (3, 4, 6)
    torch.testing.assert_close(lr, torch.full_like(lr, round(0.4 * 255) / 255))
    # a horizontal ramp stays a ramp in the interior (symmetric kernel, weights sum to 1):
    ramp = torch.linspace(0, 1, 64).repeat(3, 32, 1)
    lr = make_lr(ramp, quantize=False)[0, 0]
    # pixel j of the LR image is centred on HR coordinate 4j + 1.5
    expected = (4 * torch.arange(16) + 1.5) / 63
    torch.testing.assert_close(lr[4:12], expected[4:12], atol=1e-5, rtol=0)
    assert torch.all(make_lr(ramp) * 255 == torch.round(make_lr(ramp) * 255))
    with pytest.raises(ValueError, match="divisible"):
        make_lr(torch.zeros(3, 10, 12))
    img = np.zeros((10, 13, 3))
    assert crop_to_multiple(img, 4).shape == (8, 12, 3)
    assert make_lr_numpy(np.zeros((8, 12, 3))).shape == (2, 3, 3)


def test_lpips_skips_with_a_reason_when_unavailable() -> None:
    lp = Lpips()
    if not lp.available:
        assert lp.reason and ("lpips" in lp.reason or "weights" in lp.reason)


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small real HR crops (sizes not multiples of 4 or 8, to exercise cropping and padding)."""
    folder = tmp_path_factory.mktemp("hr")
    Image.open(CORPUS / "val" / "skimage-coffee.png").convert("RGB").crop((200, 100, 299, 170)).save(
        folder / "coffee.png")
    Image.open(CORPUS / "val" / "skimage-chelsea.png").convert("RGB").crop((100, 50, 182, 130)).save(
        folder / "chelsea.png")
    return folder


def test_eval_command_end_to_end(tiny_checkpoint: Path, hr_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    args = ["eval", str(tiny_checkpoint), str(hr_dir), "--steps", "0,3", "--seed", "7", "--out", str(out),
            "--crops", "--crop-size", "32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    md = (out / "eval.md").read_text()
    assert printed == md
    assert f"`samdiffsr eval {tiny_checkpoint} {hr_dir} --sampler ddim --steps 0,3 --eta 0.0 --seed 7 --tile 0`" in md
    assert "| chelsea.png | 80x80 |" in md and "| coffee.png | 96x68 |" in md and "| **mean** |" in md
    assert "LPIPS: " in md and "| steps=0 (encoder) |" in md and " dB |" in md
    report = json.loads((out / "eval.json").read_text())
    assert [r["name"] for r in report["images"]] == ["chelsea.png", "coffee.png"]
    for r in report["images"]:
        assert set(r["metrics"]) == {"bicubic", "steps=0", "steps=3"}
        for m in r["metrics"].values():
            assert 0 < m["psnr_y"] < 60 and -1 <= m["ssim"] <= 1
    # bicubic on a smooth real photo is far better than a random network
    assert report["mean"]["bicubic"]["psnr_y"] > 25 > report["mean"]["steps=3"]["psnr_y"]
    for name in ("chelsea.png", "coffee.png"):
        with Image.open(out / "crops" / name) as img:
            assert img.format == "PNG" and img.width > 4 * 32
            row = img.size
    with Image.open(out / "crops" / "contact-sheet.png") as sheet:  # both rows, stacked
        assert sheet.width == row[0] and sheet.height > 2 * row[1]
    # deterministic: the same command gives the same table
    again = tmp_path / "again"
    assert main([*args[:-5], "--out", str(again)]) == 0
    capsys.readouterr()
    assert json.loads((again / "eval.json").read_text())["images"][0]["metrics"] == report["images"][0]["metrics"]


def test_eval_tiled_sampling_and_errors(tiny_checkpoint: Path, hr_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["eval", str(tiny_checkpoint), str(hr_dir), "--steps", "2", "--sampler", "ddpm", "--tile", "8",
                 "--overlap", "2", "--max-images", "1", "--ensemble", "2"]) == 0
    md = capsys.readouterr().out
    assert "--sampler ddpm --steps 2" in md and "--tile 8 --overlap 2" in md and "coffee" not in md
    assert "--ensemble 2" in md
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(tiny_checkpoint), str(empty)]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), str(hr_dir)]) == 2
    assert main(["eval", str(tiny_checkpoint), str(hr_dir), "--crops"]) == 2
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_checkpoint), str(hr_dir), "--steps", "1,x"])
    assert main(["eval", str(tiny_checkpoint), str(hr_dir), "--steps", "101"]) == 2
    assert main(["eval", str(tiny_checkpoint), str(hr_dir), "--ensemble", "3"]) == 2


def test_eval_batches_tiles_as_served_unless_told(tiny_checkpoint: Path, hr_dir: Path, tmp_path: Path,
                                                  capsys) -> None:
    """Without `--max-batch` the tiles per call are the service's (`model.sizing`); a batch given is recorded in
    the command that reproduces the table, and the figures do not depend on it."""
    base = ["eval", str(tiny_checkpoint), str(hr_dir), "--steps", "0,2", "--tile", "8", "--overlap", "2"]
    reports = {}
    for label, extra in (("served", []), ("three", ["--max-batch", "3"])):
        assert main([*base, *extra, "--out", str(tmp_path / label)]) == 0
        reports[label] = json.loads((tmp_path / label / "eval.json").read_text())
    capsys.readouterr()
    served, three = ((tmp_path / label / "eval.md").read_text() for label in ("served", "three"))
    assert "--max-batch" not in served and "--tile 8 --overlap 2 --max-batch 3`" in three
    for a, b in zip(reports["served"]["images"], reports["three"]["images"], strict=True):
        for method, m in a["metrics"].items():
            assert m["psnr_y"] == pytest.approx(b["metrics"][method]["psnr_y"], abs=1e-4)


def test_eval_with_a_named_degradation(tiny_checkpoint: Path, hr_dir: Path, tmp_path: Path, capsys) -> None:
    """`--degradation jpeg50`: the LR is that JPEG, and bicubic (the baseline) upscales the same JPEG."""
    runs = {}
    for name in ("bicubic", "jpeg50"):
        out = tmp_path / name
        assert main(["eval", str(tiny_checkpoint), str(hr_dir), "--steps", "0", "--degradation", name,
                     "--out", str(out)]) == 0
        runs[name] = json.loads((out / "eval.json").read_text())
    md = capsys.readouterr().out
    assert "--degradation jpeg50`" in md and "degradation `jpeg50`" in md
    assert runs["jpeg50"]["degradation"] == "jpeg50" and runs["bicubic"]["degradation"] == "bicubic"
    assert runs["jpeg50"]["mean"]["bicubic"]["psnr_y"] < runs["bicubic"]["mean"]["bicubic"]["psnr_y"] - 0.2
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_checkpoint), str(hr_dir), "--degradation", "jpeg42"])


def test_eval_under_several_degradations_and_the_compare_sheet(tiny_checkpoint: Path, hr_dir: Path, tmp_path: Path,
                                                              capsys) -> None:
    out = tmp_path / "eval"
    assert main(["eval", str(tiny_checkpoint), str(hr_dir), "--steps", "0", "--degradation", "bicubic,jpeg50",
                 "--out", str(out)]) == 0
    table = (out / "degradations.md").read_text()
    assert "| degradation | bicubic | steps=0 (encoder) |" in table
    assert "| bicubic | " in table and "| jpeg50 | " in table
    for name in ("bicubic", "jpeg50"):
        assert json.loads((out / name / "eval.json").read_text())["degradation"] == name
    assert "By degradation" in capsys.readouterr().out
    rows = (out / "degradations.csv").read_text().splitlines()
    assert rows[0] == "degradation,method,steps,psnr_y,ssim,flat" and len(rows) == 1 + 2 * 2
    from training.evalplot import main as plot_main

    assert plot_main([str(out / "degradations.csv"), "--out", str(tmp_path / "curves.png")]) == 0
    with Image.open(tmp_path / "curves.png") as img:
        assert img.format == "PNG" and img.width > 400
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_checkpoint), str(hr_dir), "--degradation", "bicubic,jpeg42"])
    sheet = tmp_path / "sheet.png"
    assert main(["compare", str(hr_dir), f"a={tiny_checkpoint}", f"b={tiny_checkpoint}", "--crop-size", "32",
                 "--tile", "16", "--out", str(sheet)]) == 0
    with Image.open(sheet) as img:  # HR | bicubic | a | b, one row per image
        assert img.width > 4 * 32 and img.height > 2 * 32
    assert main(["compare", str(hr_dir), str(tiny_checkpoint), "--out", str(sheet)]) == 2


def test_flat_error_counts_only_flat_areas() -> None:
    from training.metrics import flat_error

    rng = np.random.default_rng(3)
    hr = np.full((48, 48, 3), 0.5)
    hr[:, 24:] = rng.random((48, 24, 3))  # the right half is texture, the left half flat
    noisy_left, noisy_right = hr.copy(), hr.copy()
    noisy_left[:, :20] += rng.normal(0, 4 / 255, (48, 20, 3))
    noisy_right[:, 28:] += rng.normal(0, 4 / 255, (48, 20, 3))
    assert flat_error(hr, hr, 4) == 0
    assert 2 < flat_error(noisy_left, hr, 4) < 4  # |N(0, 4 levels)| averages 3.2 levels
    assert flat_error(noisy_right, hr, 4) < 0.2  # noise in texture is not counted
    assert math.isnan(flat_error(hr, hr, 4, max_std=0.0))
