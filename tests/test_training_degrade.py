"""Degradations: the `real` pipeline's stages each do what they say, seeded; the named evaluation degradations;
config validation; `bicubic` unchanged; a training run with `real` resumes exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import ConfigError, load_config
from training.data import PatchDataset, prepare_images
from training.degrade import EVAL_DEGRADATIONS, degrade_named, make_lr, make_lr_numpy
from training.realworld import (
    BlurSettings,
    JpegSettings,
    NoiseSettings,
    OrderSettings,
    RealDegradation,
    ResizeSettings,
    anisotropic_kernel,
    apply_order,
    degrade_real,
    filter2d,
    jpeg,
    random_kernel,
    sinc_kernel,
)

SCALE = 4


def _photo(seed: int = 0, h: int = 128, w: int = 128) -> np.ndarray:
    """A photo-like uint8 image: smooth colour regions with sharp edges and some texture."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float64)
    img[h // 3:, : w // 2] *= 0.4
    img[:, (2 * w) // 3:] = 200 - img[:, (2 * w) // 3:] * 0.3
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def _t(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(u8)).permute(2, 0, 1)[None].float() / 255


def _u8(t: torch.Tensor) -> np.ndarray:
    return (t[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def blockiness(u8: np.ndarray) -> float:
    """Mean |step| across 8x8 block boundaries over the mean |step| elsewhere (1 = no blocks)."""
    y = u8.astype(np.float64).mean(axis=2)
    dx = np.abs(np.diff(y, axis=1))
    at = dx[:, 7::8].mean()
    other = np.delete(dx, np.s_[7::8], axis=1).mean()
    return float(at / other)


def high_freq(u8: np.ndarray) -> float:
    y = u8.astype(np.float64).mean(axis=2)
    return float(np.abs(np.diff(y, axis=0)).mean() + np.abs(np.diff(y, axis=1)).mean())


# ---------------------------------------------------------------------------------------------------
# The stages


def test_same_seed_same_lr_and_output_is_8bit_in_range() -> None:
    hr, s = _photo(), RealDegradation()
    a = degrade_real(hr, SCALE, s, np.random.default_rng(7))
    b = degrade_real(hr, SCALE, s, np.random.default_rng(7))
    c = degrade_real(hr, SCALE, s, np.random.default_rng(8))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Float HR in [0, 1] gives the same as its uint8 levels.
    assert np.array_equal(a, degrade_real(hr.astype(np.float32) / 255, SCALE, s, np.random.default_rng(7)))
    with pytest.raises(ValueError, match="divisible"):
        degrade_real(hr[:126], SCALE, s, np.random.default_rng(0))


def test_jpeg_stage_at_low_quality_raises_blockiness() -> None:
    img = _t(_photo(1, 96, 96))
    base = blockiness(_u8(img))
    assert blockiness(_u8(jpeg(img, 95))) < base + 0.15
    assert blockiness(_u8(jpeg(img, 10))) > base + 0.5
    assert blockiness(_u8(jpeg(img, 10))) > blockiness(_u8(jpeg(img, 50)))


@pytest.mark.parametrize("gray", [False, True])
def test_noise_stage_sigma_matches_its_setting(gray: bool) -> None:
    flat = torch.full((1, 3, 128, 128), 0.5)
    order = OrderSettings(blur=BlurSettings(prob=0), resize=ResizeSettings(probs={"keep": 1}),
                          noise=NoiseSettings(gaussian_prob=1, sigma=(10, 10), gray_prob=float(gray)),
                          jpeg=JpegSettings(prob=0))
    out = apply_order(flat, order, (128, 128), np.random.default_rng(0))
    noise = (out - flat)[0].numpy() * 255
    assert abs(noise.std() - 10) < 0.3
    assert np.allclose(noise[0], noise[1]) == gray


def test_poisson_noise_grows_with_brightness_and_scale() -> None:
    def measured(level: float, scale: float) -> float:
        img = torch.full((1, 3, 96, 96), level)
        order = OrderSettings(blur=BlurSettings(prob=0), resize=ResizeSettings(probs={"keep": 1}),
                              noise=NoiseSettings(gaussian_prob=0, poisson_scale=(scale, scale), gray_prob=0),
                              jpeg=JpegSettings(prob=0))
        return float((apply_order(img, order, (96, 96), np.random.default_rng(0)) - img).std())

    assert measured(0.8, 1.0) > measured(0.2, 1.0) > 0
    assert measured(0.5, 2.0) > 1.8 * measured(0.5, 1.0)


def test_blur_lowers_high_frequencies_and_kernels_are_normalised() -> None:
    img = _t(_photo(2))
    for kernel in (anisotropic_kernel(11, 2.0, 2.0, 0.0), anisotropic_kernel(15, 3.0, 0.8, 0.7),
                   anisotropic_kernel(13, 1.5, 1.0, 0.3, "generalized", 2.0),
                   anisotropic_kernel(13, 1.5, 1.5, 0.0, "plateau", 1.5), sinc_kernel(13, np.pi / 3)):
        assert kernel.shape[0] == kernel.shape[1] and abs(kernel.sum() - 1) < 1e-5
        assert high_freq(_u8(filter2d(img, kernel))) < 0.8 * high_freq(_u8(img))
    # The anisotropic kernel is elongated along theta; isotropic ones are symmetric.
    iso = anisotropic_kernel(11, 2.0, 2.0, 0.0)
    assert np.allclose(iso, iso.T, atol=1e-7)
    aniso = anisotropic_kernel(21, 4.0, 0.5, 0.0)
    assert aniso[10, :].sum() > 3 * aniso[:, 10].sum()
    # The sinc kernel rings: it has negative lobes.
    assert sinc_kernel(21, np.pi / 4).min() < 0
    # Every kind and size is drawn over many draws.
    rng, s = np.random.default_rng(0), BlurSettings(sinc_prob=0.2)
    sizes = {random_kernel(s, rng).shape[0] for _ in range(200)}
    assert sizes == set(s.kernel_sizes)


def test_resize_draws_within_its_range_in_every_mode() -> None:
    img = _t(_photo(3))
    for mode in ("area", "bilinear", "bicubic", "bicubic_aa"):
        for how, lo, hi in (("down", 64, 128), ("up", 128, 192), ("keep", 128, 128)):
            order = OrderSettings(blur=BlurSettings(prob=0), noise=NoiseSettings(prob=0), jpeg=JpegSettings(prob=0),
                                  resize=ResizeSettings(probs={how: 1}, scale=(0.5, 1.5), modes=(mode,)))
            for seed in range(3):
                _, _, h, w = apply_order(img, order, (128, 128), np.random.default_rng(seed)).shape
                assert h == w and lo <= h <= hi, (mode, how, h)


# ---------------------------------------------------------------------------------------------------
# Named evaluation degradations


def test_named_degradations() -> None:
    hr = _photo(4).astype(np.float32) / 255
    bic = degrade_named(hr, "bicubic")
    assert np.array_equal(bic, make_lr_numpy(hr, SCALE))
    outs = {name: degrade_named(hr, name, SCALE, seed=0) for name in EVAL_DEGRADATIONS}
    for name, lr in outs.items():
        assert lr.shape == (32, 32, 3) and lr.dtype == np.float32, name
        assert lr.min() >= 0 and lr.max() <= 1 and np.allclose(lr * 255, np.round(lr * 255), atol=1e-4), name
        assert np.array_equal(lr, degrade_named(hr, name, SCALE, seed=0)), name
    err = {name: float(np.abs(outs[name] - bic).mean()) for name in outs}
    assert err["jpeg50"] > err["jpeg75"] > err["jpeg90"] > 0
    assert abs(float((outs["noise10"] - bic).std()) * 255 - 10) < 1.0
    assert high_freq(np.round(outs["blur"] * 255)[..., :3]) < high_freq(np.round(bic * 255))
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade_named(hr, "jpeg42")


def test_bicubic_training_lr_is_unchanged(tmp_path: Path) -> None:
    """`bicubic` (the default) is today's cached MATLAB bicubic, bit for bit."""
    d = tmp_path / "hr"
    d.mkdir()
    Image.fromarray(_photo(5, 64, 64)).save(d / "a.png")
    items = prepare_images(d, tmp_path / "cache", SCALE)
    ds = PatchDataset(items, hr_patch=32, scale=SCALE, augment=False, seed=0)
    hr_img = np.asarray(Image.open(d / "a.png"), np.float32) / 255
    full_lr = make_lr(torch.from_numpy(hr_img).permute(2, 0, 1), SCALE)
    item = ds[0]
    lr = item["lr"]
    found = any(torch.equal(lr, full_lr[:, y:y + 8, x:x + 8]) for y in range(9) for x in range(9))
    assert found
    assert load_config(None).data.degradation.kind == "bicubic"


def test_real_patches_are_seeded_and_differ_from_bicubic(tmp_path: Path) -> None:
    d = tmp_path / "hr"
    d.mkdir()
    Image.fromarray(_photo(6, 96, 96)).save(d / "a.png")
    items = prepare_images(d, tmp_path / "cache", SCALE)
    real = PatchDataset(items, 64, SCALE, repeat=4, seed=1, real=RealDegradation())
    plain = PatchDataset(items, 64, SCALE, repeat=4, seed=1)
    a, b = real[2], PatchDataset(items, 64, SCALE, repeat=4, seed=1, real=RealDegradation())[2]
    assert torch.equal(a["lr"], b["lr"]) and torch.equal(a["hr"], plain[2]["hr"])
    assert not torch.equal(a["lr"], plain[2]["lr"]) and a["lr"].shape == (3, 16, 16)
    real.set_epoch(1)
    assert not torch.equal(real[2]["lr"], a["lr"])


# ---------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("override, key", [
    ("data.degradation.kind=jpegish", "kind"),
    ("data.degradation.real.first.sharpen={prob: 1}", "sharpen"),
    ("data.degradation.real.first.jpeg.quality=[0, 90]", "quality"),
    ("data.degradation.real.final.jpeg.quality=[50, 101]", "quality"),
    ("data.degradation.real.second.noise.sigma=[-1, 5]", "sigma"),
    ("data.degradation.real.first.blur.sigma=[2, 1]", "sigma"),
    ("data.degradation.real.first.blur.kinds={}", "kinds"),
    ("data.degradation.real.first.blur.kinds={box: 1}", "kinds"),
    ("data.degradation.real.first.blur.kernel_sizes=[]", "kernel_sizes"),
    ("data.degradation.real.first.blur.kernel_sizes=[8]", "kernel_sizes"),
    ("data.degradation.real.first.resize.modes=[nearest]", "modes"),
    ("val.degradation=jpeg42", "degradation"),
])
def test_bad_degradation_configs_are_refused_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["data.degradation.kind=real", override])


def test_shipped_real_config_loads() -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "real.yaml")
    assert cfg.data.degradation.kind == "real" and cfg.val.degradation == "jpeg75"
    assert cfg.data.degradation.real.final.jpeg.quality == (40, 95)


def test_clean_prob_gives_some_patches_the_bicubic_lr(tmp_path: Path) -> None:
    d = tmp_path / "hr"
    d.mkdir()
    Image.fromarray(_photo(7, 64, 64)).save(d / "a.png")
    items = prepare_images(d, tmp_path / "cache", SCALE)
    plain = PatchDataset(items, 32, SCALE, repeat=40, seed=2)
    mixed = PatchDataset(items, 32, SCALE, repeat=40, seed=2, real=RealDegradation(clean_prob=0.5))
    same = [torch.equal(mixed[i]["lr"], plain[i]["lr"]) for i in range(40)]
    assert 8 < sum(same) < 32  # about half are the cached bicubic LR, the rest degraded
    assert all(torch.equal(mixed[i]["hr"], plain[i]["hr"]) for i in range(40))
