"""Image-quality metrics of the SR literature (SRDiff / BasicSR conventions), shared by training
validation and evaluation: PSNR and SSIM on the BT.601 Y channel with `scale` pixels cropped at each border.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def quantize8(rgb01: np.ndarray) -> np.ndarray:
    """Round RGB in [0, 1] to 8 bits, as a served PNG is, before scoring."""
    return (np.round(np.clip(rgb01, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def rgb_to_y(rgb01: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of RGB in [0, 1], on the [16, 235] scale of MATLAB's rgb2ycbcr (float64)."""
    rgb = np.asarray(rgb01, dtype=np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2])


def _crop_border(a: np.ndarray, border: int) -> np.ndarray:
    if border <= 0:
        return a
    if a.shape[0] <= 2 * border or a.shape[1] <= 2 * border:
        raise ValueError(f"image {a.shape[0]}x{a.shape[1]} is too small to crop {border} px at each border")
    return a[border:-border, border:-border]


def _check_pair(sr: np.ndarray, hr: np.ndarray) -> None:
    if sr.shape != hr.shape or sr.ndim != 3 or sr.shape[2] != 3:
        raise ValueError(f"expected two (H, W, 3) images of the same size, got {sr.shape} and {hr.shape}")


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """PSNR (dB) on Y, peak 255, `border` pixels cropped at each side. Inputs: RGB in [0, 1]."""
    _check_pair(sr, hr)
    y_sr, y_hr = _crop_border(rgb_to_y(sr), border), _crop_border(rgb_to_y(hr), border)
    if np.array_equal(y_sr, y_hr):
        return math.inf
    return float(peak_signal_noise_ratio(y_hr, y_sr, data_range=255.0))


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """SSIM on Y (Wang et al. 2004 settings), `border` pixels cropped at each side. RGB in [0, 1]."""
    _check_pair(sr, hr)
    y_sr, y_hr = _crop_border(rgb_to_y(sr), border), _crop_border(rgb_to_y(hr), border)
    return float(structural_similarity(y_hr, y_sr, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def flat_error(sr: np.ndarray, hr: np.ndarray, border: int, window: int = 7, max_std: float = 2.0) -> float:
    """Mean |Y error| (8-bit levels) over the flat areas of HR: pixels whose `window` x `window` neighbourhood has a
    Y standard deviation under `max_std` levels (sky, walls, skin). A model that adds noise or sharpens JPEG blocks
    into texture has more error there than bicubic has; NaN when the image has no flat area."""
    from scipy.ndimage import uniform_filter

    _check_pair(sr, hr)
    y_hr, y_sr = rgb_to_y(hr) * 255 / 219, rgb_to_y(sr) * 255 / 219  # on the 0-255 scale of an 8-bit image
    mean = uniform_filter(y_hr, window)
    std = np.sqrt(np.maximum(uniform_filter(y_hr * y_hr, window) - mean * mean, 0))
    flat = _crop_border(std < max_std, border)
    err = _crop_border(np.abs(y_sr - y_hr), border)
    return float(err[flat].mean()) if flat.any() else math.nan
