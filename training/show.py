"""A picture for people: the image, its masks in random colours, and its SPE map, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.masks import load_rgb8, read_masks
from training.spe import encode_masks

LABEL_H = 22
BAR_H = 14


def _fit(img: Image.Image, max_side: int, resample: int) -> Image.Image:
    scale = max_side / max(img.size)
    if scale >= 1:
        return img
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)


def mask_overlay(rgb: np.ndarray, masks: list[np.ndarray], alpha: float = 0.55, seed: int = 0) -> np.ndarray:
    """Paint each mask (in file order, later over earlier) in a random colour over the image."""
    rng = np.random.default_rng(seed)
    out = rgb.astype(np.float32)
    for m in masks:
        colour = rng.integers(40, 256, 3).astype(np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * colour
    return np.clip(out, 0, 255).astype(np.uint8)


def colorize(spe: np.ndarray, cmap: str = "viridis") -> tuple[np.ndarray, float, float]:
    """A float map as uint8 RGB with a matplotlib colormap over its [min, max] range."""
    import matplotlib

    lo, hi = float(spe.min()), float(spe.max())
    norm = (spe - lo) / (hi - lo) if hi > lo else np.zeros_like(spe)
    rgba = matplotlib.colormaps[cmap](norm)
    return (rgba[..., :3] * 255).astype(np.uint8), lo, hi


def render_overview(rgb: np.ndarray, masks: list[np.ndarray], spe: np.ndarray, title: str = "",
                    max_side: int = 512, cmap: str = "viridis") -> Image.Image:
    """[image | masks | SPE map] with captions and a colour bar for the SPE values."""
    spe_rgb, lo, hi = colorize(spe, cmap)
    panels = [
        (_fit(Image.fromarray(rgb), max_side, Image.Resampling.LANCZOS), title or "image"),
        (_fit(Image.fromarray(mask_overlay(rgb, masks)), max_side, Image.Resampling.LANCZOS),
         f"{len(masks)} masks"),
        (_fit(Image.fromarray(spe_rgb), max_side, Image.Resampling.NEAREST), "SPE map"),
    ]
    pw, ph = panels[0][0].size
    gap = 8
    canvas = Image.new("RGB", (3 * pw + 2 * gap, ph + LABEL_H + BAR_H + LABEL_H), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, caption) in enumerate(panels):
        x = i * (pw + gap)
        canvas.paste(panel, (x, LABEL_H))
        draw.text((x + 4, 5), caption, fill="black")
    # colour bar under the SPE panel
    x0, y0 = 2 * (pw + gap), LABEL_H + ph + 4
    bar, _, _ = colorize(np.tile(np.linspace(0, 1, pw, dtype=np.float32), (BAR_H, 1)), cmap)
    canvas.paste(Image.fromarray(bar), (x0, y0))
    draw.text((x0, y0 + BAR_H + 3), f"{lo:.4g}", fill="black")
    hi_text = f"{hi:.4g}"
    draw.text((x0 + pw - 6 * len(hi_text) - 2, y0 + BAR_H + 3), hi_text, fill="black")
    return canvas


def show(image: str | Path, masks_json: str | Path, out_png: str | Path, variant: str = "rope",
         spe_npy: str | Path | None = None, max_side: int = 512) -> Path:
    """Write the overview PNG of one image (the SPE map is read from `spe_npy` or computed)."""
    rgb = load_rgb8(image)
    shape = rgb.shape[:2]
    masks = read_masks(masks_json, shape)
    if spe_npy is not None:
        spe = np.load(spe_npy, allow_pickle=False)
        if spe.shape != shape:
            raise ValueError(f"{spe_npy}: SPE map is {spe.shape}, image is {shape}")
    else:
        spe = encode_masks(masks, variant, shape=shape)  # type: ignore[arg-type]
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    render_overview(rgb, masks, spe, title=Path(image).name, max_side=max_side).save(out_png)
    return out_png
