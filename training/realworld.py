"""The `real` degradation: a second-order pipeline in the manner of Real-ESRGAN (Wang et al., ICCV-W 2021).

HR patch -> [blur -> random resize -> noise -> JPEG] -> [the same again, with its own ranges] ->
final resize to HR/scale with a sinc (ringing) filter and a last JPEG, in either order. Every random choice
comes from one `numpy.random.Generator`, so a patch is a pure function of its seed (training resumes exactly).

The settings are pydantic models (read from the training YAML, `data.degradation.real`); their defaults are
Real-ESRGAN's (`options/train_realesrnet_x4plus.yml` of the xinntao/Real-ESRGAN repository):

- blur kernels of odd size 7..21: isotropic / anisotropic Gaussian, generalized Gaussian (shape beta 0.5..4) and
  plateau kernels (beta 1..2), with probabilities 0.45 / 0.25 / 0.12 / 0.03 / 0.12 / 0.03; sigma 0.2..3 in the
  first order, 0.2..1.5 in the second; a 2-D sinc (circular low-pass, ringing) instead with probability 0.1;
- resize up / down / keep with probabilities 0.2 / 0.7 / 0.1 by 0.15..1.5 (second order: 0.3 / 0.4 / 0.3 by
  0.3..1.2), area, bilinear or bicubic;
- Gaussian noise (sigma 1..30 of 255; 1..25 in the second order) or Poisson noise (scale 0.05..3; 0.05..2.5),
  grey (the same in every channel) with probability 0.4;
- JPEG at quality 30..95 (libjpeg through Pillow, 4:2:0 as most photos), after each order and at the end.

Kernels are written here (each is one formula of the paper's section 3.2); convolution and resizing are torch's,
noise is numpy's, JPEG is Pillow's.
"""

from __future__ import annotations

import io
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy.special import j1

KernelKind = Literal["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
# area, bilinear and bicubic as torch computes them (no antialiasing when shrinking, as in Real-ESRGAN);
# bicubic_aa: antialiased bicubic, as MATLAB's imresize and most photo software shrink.
ResizeMode = Literal["area", "bilinear", "bicubic", "bicubic_aa"]
Range = tuple[float, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _weights(v: dict[str, float], what: str) -> dict[str, float]:
    if not v or any(p < 0 for p in v.values()) or sum(v.values()) <= 0:
        raise ValueError(f"{what}: give at least one a positive probability, none a negative one")
    return v


def _ordered(v: Range, lo: float, hi: float, name: str) -> Range:
    if not (lo <= v[0] <= v[1] <= hi):
        raise ValueError(f"{name} must be an ordered pair within [{lo}, {hi}], got {list(v)}")
    return v


class BlurSettings(_Strict):
    """A random blur kernel (Real-ESRGAN's `generate_kernel1d`/`kernel2`)."""

    prob: float = Field(1.0, ge=0, le=1)  # the chance that this order blurs at all (second order: 0.8)
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kinds: dict[KernelKind, float] = Field(default_factory=lambda: {
        "iso": 0.45, "aniso": 0.25, "generalized_iso": 0.12, "generalized_aniso": 0.03,
        "plateau_iso": 0.12, "plateau_aniso": 0.03})
    sigma: Range = (0.2, 3.0)
    beta_generalized: Range = (0.5, 4.0)
    beta_plateau: Range = (1.0, 2.0)
    sinc_prob: float = Field(0.1, ge=0, le=1)

    @field_validator("kernel_sizes")
    @classmethod
    def _sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(k < 3 or k % 2 == 0 for k in v):
            raise ValueError(f"kernel_sizes must be a non-empty list of odd sizes >= 3, got {list(v)}")
        return v

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: dict[str, float]) -> dict[str, float]:
        return _weights(v, "kinds (the kernel kinds)")

    @field_validator("sigma")
    @classmethod
    def _sigma(cls, v: Range) -> Range:
        return _ordered(v, 0.05, 20.0, "sigma")

    @field_validator("beta_generalized", "beta_plateau")
    @classmethod
    def _beta(cls, v: Range) -> Range:
        return _ordered(v, 0.1, 10.0, "beta")


class ResizeSettings(_Strict):
    """A random rescale: up / down / keep, by a factor drawn from the range for up or down."""

    probs: dict[Literal["up", "down", "keep"], float] = Field(
        default_factory=lambda: {"up": 0.2, "down": 0.7, "keep": 0.1})
    scale: Range = (0.15, 1.5)
    modes: tuple[ResizeMode, ...] = ("area", "bilinear", "bicubic")

    @field_validator("probs")
    @classmethod
    def _probs(cls, v: dict[str, float]) -> dict[str, float]:
        return _weights(v, "probs (up / down / keep)")

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: Range) -> Range:
        return _ordered(v, 0.05, 4.0, "scale")

    @field_validator("modes")
    @classmethod
    def _modes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("modes must name at least one of area, bilinear, bicubic")
        return v


class NoiseSettings(_Strict):
    """Gaussian noise with probability `gaussian_prob`, else Poisson noise; grey with `gray_prob`."""

    prob: float = Field(1.0, ge=0, le=1)  # the chance that this order adds noise at all
    gaussian_prob: float = Field(0.5, ge=0, le=1)
    sigma: Range = (1.0, 30.0)  # of 255
    poisson_scale: Range = (0.05, 3.0)
    gray_prob: float = Field(0.4, ge=0, le=1)

    @field_validator("sigma")
    @classmethod
    def _sigma(cls, v: Range) -> Range:
        return _ordered(v, 0.0, 255.0, "sigma")

    @field_validator("poisson_scale")
    @classmethod
    def _poisson(cls, v: Range) -> Range:
        return _ordered(v, 0.0, 10.0, "poisson_scale")


class JpegSettings(_Strict):
    prob: float = Field(1.0, ge=0, le=1)
    quality: tuple[int, int] = (30, 95)

    @field_validator("quality")
    @classmethod
    def _quality(cls, v: tuple[int, int]) -> tuple[int, int]:
        return tuple(int(q) for q in _ordered(v, 1, 100, "quality"))  # type: ignore[return-value]


class OrderSettings(_Strict):
    """One degradation order: blur -> resize -> noise -> JPEG."""

    blur: BlurSettings = Field(default_factory=BlurSettings)
    resize: ResizeSettings = Field(default_factory=ResizeSettings)
    noise: NoiseSettings = Field(default_factory=NoiseSettings)
    jpeg: JpegSettings = Field(default_factory=JpegSettings)


def _second_order() -> OrderSettings:
    return OrderSettings(
        blur=BlurSettings(prob=0.8, sigma=(0.2, 1.5)),
        resize=ResizeSettings(probs={"up": 0.3, "down": 0.4, "keep": 0.3}, scale=(0.3, 1.2)),
        noise=NoiseSettings(sigma=(1.0, 25.0), poisson_scale=(0.05, 2.5)))


class FinalSettings(_Strict):
    """The last resize to HR/scale (a random mode), a sinc filter with `sinc_prob`, and a JPEG, in random order."""

    sinc_prob: float = Field(0.8, ge=0, le=1)
    jpeg: JpegSettings = Field(default_factory=JpegSettings)
    modes: tuple[ResizeMode, ...] = ("area", "bilinear", "bicubic")


class RealDegradation(_Strict):
    """The whole second-order pipeline. `second_prob` skips the second order sometimes (BSRGAN/Real-ESRGAN
    variants do; Real-ESRGAN itself always runs it: 1.0). `clean_prob` gives a patch the plain `bicubic` LR instead
    (0 in Real-ESRGAN): a faithful model then keeps clean inputs sharp, since it sees what they look like."""

    clean_prob: float = Field(0.0, ge=0, le=1)
    first: OrderSettings = Field(default_factory=OrderSettings)
    second: OrderSettings = Field(default_factory=_second_order)
    second_prob: float = Field(1.0, ge=0, le=1)
    final: FinalSettings = Field(default_factory=FinalSettings)


# ---------------------------------------------------------------------------------------------------
# Kernels (Real-ESRGAN, section 3.2)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(size, dtype=np.float64) - size // 2
    return np.meshgrid(r, r, indexing="xy")


def anisotropic_kernel(size: int, sigma_x: float, sigma_y: float, theta: float,
                       shape: Literal["gaussian", "generalized", "plateau"] = "gaussian",
                       beta: float = 1.0) -> np.ndarray:
    """A normalised (size, size) kernel of the quadratic form d = x^T S^-1 x, S = R diag(sx^2, sy^2) R^T:
    Gaussian exp(-d/2), generalized Gaussian exp(-(d)^beta / 2) (as Real-ESRGAN writes it: exp(-0.5 d^beta)),
    plateau 1 / (1 + d^beta)."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    inv = np.linalg.inv(cov)
    x, y = _grid(size)
    d = inv[0, 0] * x * x + (inv[0, 1] + inv[1, 0]) * x * y + inv[1, 1] * y * y
    if shape == "gaussian":
        k = np.exp(-0.5 * d)
    elif shape == "generalized":
        k = np.exp(-0.5 * np.power(d, beta))
    else:
        k = 1.0 / (1.0 + np.power(d, beta))
    return (k / k.sum()).astype(np.float32)


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """A normalised circular low-pass (2-D sinc) kernel with cutoff `cutoff` (radians per pixel, 0 < c <= pi):
    c J1(c r) / (2 pi r), which rings next to edges as over-sharpened or band-limited images do."""
    x, y = _grid(size)
    r = np.hypot(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cutoff * j1(cutoff * r) / (2 * math.pi * r)
    k[size // 2, size // 2] = cutoff**2 / (4 * math.pi)
    return (k / k.sum()).astype(np.float32)


def _choice(options: dict[str, float], rng: np.random.Generator) -> str:
    keys = list(options)
    p = np.array([options[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def random_kernel(s: BlurSettings, rng: np.random.Generator) -> np.ndarray:
    """One random kernel as Real-ESRGAN draws it."""
    size = int(rng.choice(s.kernel_sizes))
    if rng.random() < s.sinc_prob:
        lo = math.pi / 3 if size < 13 else math.pi / 5
        return sinc_kernel(size, float(rng.uniform(lo, math.pi)))
    kind = _choice(s.kinds, rng)
    sx = float(rng.uniform(*s.sigma))
    sy, theta = (sx, 0.0) if "aniso" not in kind else (
        float(rng.uniform(*s.sigma)), float(rng.uniform(-math.pi, math.pi)))
    if kind.startswith("generalized"):
        # Half the time a heavy-tailed kernel (beta below 1), half a flat-topped one (above), as Real-ESRGAN.
        lo, hi = s.beta_generalized
        mid = min(max(1.0, lo), hi)
        beta = float(rng.uniform(lo, mid) if rng.random() < 0.5 else rng.uniform(mid, hi))
        return anisotropic_kernel(size, sx, sy, theta, "generalized", beta)
    if kind.startswith("plateau"):
        return anisotropic_kernel(size, sx, sy, theta, "plateau", float(rng.uniform(*s.beta_plateau)))
    return anisotropic_kernel(size, sx, sy, theta)


# ---------------------------------------------------------------------------------------------------
# Operations on a (1, 3, H, W) float tensor in [0, 1]


def filter2d(img: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """Convolve every channel with `kernel` (reflected borders; replicated where the image is too small)."""
    k = torch.from_numpy(kernel).to(img.dtype)
    pad = k.shape[-1] // 2
    mode = "reflect" if min(img.shape[-2:]) > pad else "replicate"
    x = F.pad(img, (pad, pad, pad, pad), mode=mode)
    c = img.shape[1]
    return F.conv2d(x, k.expand(c, 1, *k.shape), groups=c)


def resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode == "area":
        return F.interpolate(img, size=size, mode="area")
    if mode == "bicubic_aa":
        return F.interpolate(img, size=size, mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(img, size=size, mode=mode, align_corners=False)


def gaussian_noise(img: torch.Tensor, sigma: float, gray: bool, rng: np.random.Generator) -> torch.Tensor:
    """Add N(0, sigma^2) noise (sigma in [0, 1] units), the same in every channel when `gray`."""
    _, c, h, w = img.shape
    n = rng.standard_normal((1, 1 if gray else c, h, w)).astype(np.float32) * sigma
    return (img + torch.from_numpy(n)).clamp(0, 1)


def poisson_noise(img: torch.Tensor, scale: float, gray: bool, rng: np.random.Generator) -> torch.Tensor:
    """Add shot noise: Poisson counts of the intensity at 256 levels, the difference times `scale`.

    Real-ESRGAN counts the image's distinct levels (2^ceil(log2(n))), which is 256 for a photo but 1 for a flat
    patch (noise of the size of the signal); the fixed 256 keeps patches consistent with whole photos."""
    x = img.numpy()
    if gray:
        x = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x8 = np.clip(np.round(x * 255), 0, 255) / 255
    noise = (rng.poisson(x8 * 256) / 256 - x8).astype(np.float32) * scale
    return (img + torch.from_numpy(noise)).clamp(0, 1)


def to_u8(img: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (img[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def jpeg_u8(u8: np.ndarray, quality: int) -> np.ndarray:
    """(H, W, 3) uint8 round-tripped through libjpeg (Pillow) at `quality`, with Pillow's default 4:2:0 chroma."""
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, "JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy()


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """`jpeg_u8` of a (1, 3, H, W) tensor in [0, 1]."""
    return torch.from_numpy(jpeg_u8(to_u8(img), quality)).permute(2, 0, 1)[None].float() / 255


# ---------------------------------------------------------------------------------------------------
# The pipeline


def apply_order(img: torch.Tensor, s: OrderSettings, base: tuple[int, int], rng: np.random.Generator
                ) -> torch.Tensor:
    """One order: blur, resize relative to `base` (h, w), noise, JPEG."""
    if rng.random() < s.blur.prob:
        img = filter2d(img, random_kernel(s.blur, rng))
    how = _choice(s.resize.probs, rng)
    factor = {"up": rng.uniform(1.0, max(1.0, s.resize.scale[1])),
              "down": rng.uniform(min(1.0, s.resize.scale[0]), 1.0), "keep": 1.0}[how]
    mode = str(rng.choice(s.resize.modes))
    size = (max(1, int(base[0] * factor)), max(1, int(base[1] * factor)))
    img = resize(img, size, mode).clamp(0, 1)
    if rng.random() < s.noise.prob:
        gray = rng.random() < s.noise.gray_prob
        if rng.random() < s.noise.gaussian_prob:
            img = gaussian_noise(img, float(rng.uniform(*s.noise.sigma)) / 255, gray, rng)
        else:
            img = poisson_noise(img, float(rng.uniform(*s.noise.poisson_scale)), gray, rng)
    if rng.random() < s.jpeg.prob:
        img = jpeg(img, int(rng.integers(s.jpeg.quality[0], s.jpeg.quality[1] + 1)))
    return img


def degrade_real(hr: np.ndarray, scale: int, s: RealDegradation, rng: np.random.Generator) -> np.ndarray:
    """HR (H, W, 3) uint8 or float in [0, 1], H and W divisible by `scale` -> LR (H/scale, W/scale, 3) uint8."""
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not divisible by {scale}")
    x = torch.from_numpy(np.ascontiguousarray(hr)).permute(2, 0, 1)[None]
    img = x.float() / 255 if hr.dtype == np.uint8 else x.float()
    img = apply_order(img, s.first, (h, w), rng)
    if rng.random() < s.second_prob:
        img = apply_order(img, s.second, (h // scale, w // scale), rng)
    out = (h // scale, w // scale)
    mode = str(rng.choice(s.final.modes))
    sinc = rng.random() < s.final.sinc_prob
    size = int(rng.choice((7, 9, 11, 13, 15, 17, 19, 21)))
    cutoff = float(rng.uniform(math.pi / 3, math.pi))
    quality = int(rng.integers(s.final.jpeg.quality[0], s.final.jpeg.quality[1] + 1))
    do_jpeg = rng.random() < s.final.jpeg.prob

    def resize_sinc(t: torch.Tensor) -> torch.Tensor:
        t = resize(t, out, mode).clamp(0, 1)
        return filter2d(t, sinc_kernel(size, cutoff)).clamp(0, 1) if sinc else t

    if rng.random() < 0.5:
        img = resize_sinc(img)
        img = jpeg(img, quality) if do_jpeg else img
    else:
        img = jpeg(img, quality) if do_jpeg else img
        img = resize_sinc(img)
    return to_u8(img)
