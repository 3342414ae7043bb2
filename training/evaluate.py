"""Evaluate a checkpoint on HR images: bicubic vs. the RRDB encoder's output vs. the diffusion output.

Protocol (SRDiff / SAM-DiffSR conventions):

- HR images are cropped at the bottom/right to a multiple of the scale; LR = `training.degrade.make_lr`
  (MATLAB antialiased bicubic, 8-bit).
- Outputs are quantised to 8 bits (as a served PNG is) before scoring.
- PSNR on Y (ITU-R BT.601 as MATLAB's ``rgb2ycbcr``: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255
  on [0, 255]) with `scale` pixels cropped at each border; SSIM on the same Y (scikit-image with
  Wang et al.'s settings: 11x11 Gaussian window, sigma 1.5, population covariance).
- LPIPS only where the `lpips` package and its AlexNet weights are already on the machine (never
  downloaded); otherwise it is reported as skipped, with the reason.

Everything is seeded, so the same command gives the same table.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

METHODS = ("bicubic", "rrdb", "diffusion")
METHOD_TITLES = {"bicubic": "bicubic", "rrdb": "RRDB", "diffusion": "diffusion"}
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # what lpips.LPIPS(net="alex") loads through torchvision


# ---------------------------------------------------------------------------------------------------
# Metrics


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
    from skimage.metrics import peak_signal_noise_ratio

    _check_pair(sr, hr)
    y_sr, y_hr = _crop_border(rgb_to_y(sr), border), _crop_border(rgb_to_y(hr), border)
    if np.array_equal(y_sr, y_hr):
        return math.inf
    return float(peak_signal_noise_ratio(y_hr, y_sr, data_range=255.0))


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """SSIM on Y (Wang et al. 2004 settings), `border` pixels cropped at each side. RGB in [0, 1]."""
    from skimage.metrics import structural_similarity

    _check_pair(sr, hr)
    y_sr, y_hr = _crop_border(rgb_to_y(sr), border), _crop_border(rgb_to_y(hr), border)
    return float(structural_similarity(y_hr, y_sr, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


class Lpips:
    """LPIPS (AlexNet) when it can run without downloading anything; `reason` says why not."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.model: Any = None
        self.reason = ""
        try:
            import lpips
        except Exception as e:  # not installed, or its torchvision import fails
            self.reason = f"the lpips package is not importable ({type(e).__name__}: {e})"
            return
        weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
        if not weights.is_file():
            self.reason = f"AlexNet weights not found at {weights} (they are never downloaded here)"
            return
        self.model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
        self.device = device

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.inference_mode()
    def __call__(self, sr: np.ndarray, hr: np.ndarray) -> float:
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, np.float32)).permute(2, 0, 1)[None] * 2 - 1

        return float(self.model(t(sr).to(self.device), t(hr).to(self.device)).item())


# ---------------------------------------------------------------------------------------------------
# Super-resolution methods


def quantize8(rgb01: np.ndarray) -> np.ndarray:
    return (np.round(np.clip(rgb01, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def bicubic_upscale(lr01: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB-style bicubic upscaling of (h, w, 3) RGB in [0, 1]."""
    from bicubic_pytorch import core

    t = torch.from_numpy(np.ascontiguousarray(lr01, np.float32)).permute(2, 0, 1)
    return core.imresize(t, scale=scale).clamp(0, 1).permute(1, 2, 0).numpy()


@dataclass
class SamplerSettings:
    sampler: str = "ddim"
    steps: int = 20
    eta: float = 0.0
    seed: int = 0
    tile: int = 0  # LR tile size for the diffusion output; 0 = the whole image at once
    overlap: int = 8
    max_batch: int = 16


class Models:
    """A checkpoint's RRDB encoder and diffusion sampler, on whole images or tiles."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        from model.checkpoint import load_checkpoint
        from model.runtime import TorchRuntime, resolve_device

        net, self.info = load_checkpoint(checkpoint, "cpu")
        self.device = resolve_device(device)
        self.runtime = TorchRuntime(net, self.info, self.device)
        self.net = self.runtime.net
        self.config = self.info.config

    def _padded_inputs(self, lr01: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        from model.tiling import pad_to
        from model.upscale import lr_inputs

        h, w = lr01.shape[:2]
        m = self.config.lr_multiple
        img = torch.from_numpy(np.ascontiguousarray(lr01, np.float32)).permute(2, 0, 1)
        img = pad_to(img, -(-h // m) * m, -(-w // m) * m)
        img_lr, img_lr_up = lr_inputs(img[None], self.config)
        return img_lr, img_lr_up, (h, w)

    @staticmethod
    def _to_rgb(x: torch.Tensor, h: int, w: int, scale: int) -> np.ndarray:
        x = x[0, :, : h * scale, : w * scale].clamp(-1, 1)
        return ((x + 1) / 2).permute(1, 2, 0).cpu().numpy()

    @torch.inference_mode()
    def rrdb(self, lr01: np.ndarray) -> np.ndarray:
        img_lr, _, (h, w) = self._padded_inputs(lr01)
        out, _ = self.net.rrdb(img_lr.to(self.device))
        return self._to_rgb(out, h, w, self.config.scale)

    @torch.inference_mode()
    def diffusion(self, lr01: np.ndarray, s: SamplerSettings) -> np.ndarray:
        from model.diffusion import res2img
        from model.sampler import new_track, sample
        from model.upscale import Upscaler

        if s.tile:
            up = Upscaler(self.runtime, tile=s.tile, overlap=s.overlap, max_batch=s.max_batch)
            return up.upscale_rgb(lr01, s.steps, s.sampler, s.eta, s.seed)  # type: ignore[arg-type]
        cfg = self.config
        img_lr, img_lr_up, (h, w) = self._padded_inputs(lr01)
        cond = self.runtime.encode(img_lr)
        track = new_track(cond[0], cfg.timesteps, s.steps, s.sampler, s.eta, s.seed, 0)  # type: ignore[arg-type]
        (x0,) = sample(self.runtime.denoise, self.runtime.schedule, [track])
        out = res2img(x0[None].cpu(), img_lr_up, cfg.res_rescale, cfg.clip_input)
        return self._to_rgb(out, h, w, cfg.scale)


# ---------------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class EvalOptions:
    checkpoint: Path
    hr_dir: Path
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    device: str = "cpu"
    hr_crop: int = 0  # centre-crop HR images to at most this size (0 = whole images)
    max_images: int = 0  # evaluate only the first N images by name (0 = all)
    crops_dir: Path | None = None  # write side-by-side crops here
    crop_size: int = 128  # HR size of those crops

    def command(self) -> str:
        """The `samdiffsr eval` command line that reproduces this evaluation."""
        s = self.sampler
        args = ["samdiffsr", "eval", str(self.checkpoint), str(self.hr_dir), "--sampler", s.sampler,
                "--steps", str(s.steps), "--eta", str(s.eta), "--seed", str(s.seed), "--tile", str(s.tile)]
        if s.tile:
            args += ["--overlap", str(s.overlap), "--max-batch", str(s.max_batch)]
        if self.hr_crop:
            args += ["--hr-crop", str(self.hr_crop)]
        if self.max_images:
            args += ["--max-images", str(self.max_images)]
        return shlex.join(args)


@dataclass
class ImageResult:
    name: str
    hr_size: tuple[int, int]  # (height, width) after cropping
    metrics: dict[str, dict[str, float]]  # method -> {"psnr_y": .., "ssim": .., "lpips": ..}
    seconds: dict[str, float]


@dataclass
class EvalReport:
    command: str
    checkpoint: str
    checkpoint_name: str
    scale: int
    sampler: dict[str, Any]
    lpips: str  # "AlexNet" or why it was skipped
    images: list[ImageResult]

    def mean(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for method in METHODS:
            keys = self.images[0].metrics[method].keys() if self.images else ()
            out[method] = {k: float(np.mean([r.metrics[method][k] for r in self.images])) for k in keys}
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = self.mean()
        return d

    def markdown(self) -> str:
        has_lpips = bool(self.images) and "lpips" in self.images[0].metrics["bicubic"]
        cols = ["psnr_y", "ssim"] + (["lpips"] if has_lpips else [])
        col_names = {"psnr_y": "PSNR-Y", "ssim": "SSIM", "lpips": "LPIPS"}
        s = self.sampler
        lines = [
            f"Evaluation of `{self.checkpoint_name}` (x{self.scale}), {len(self.images)} images",
            "",
            f"Command: `{self.command}`",
            "",
            f"LR: MATLAB antialiased bicubic x{self.scale} of the HR image (cropped to a multiple of "
            f"{self.scale}), 8-bit. Outputs quantised to 8 bits. PSNR-Y: BT.601 Y, {self.scale} px border "
            f"cropped. SSIM: on Y, Gaussian 11x11, sigma 1.5. Diffusion: {s['sampler']}, {s['steps']} steps, "
            f"eta {s['eta']}, seed {s['seed']}, " + (f"tiles of {s['tile']} LR px." if s["tile"] else
                                                     "whole image.") + f" LPIPS: {self.lpips}.",
            "",
            "| image | HR size | " + " | ".join(f"{METHOD_TITLES[m]} {col_names[c]}" for m in METHODS
                                             for c in cols) + " |",
            "|---|---|" + "---:|" * (len(METHODS) * len(cols)),
        ]

        def fmt(c: str, v: float) -> str:
            return "inf" if math.isinf(v) else (f"{v:.2f}" if c == "psnr_y" else f"{v:.4f}")

        for r in self.images:
            cells = [fmt(c, r.metrics[m][c]) for m in METHODS for c in cols]
            lines.append(f"| {r.name} | {r.hr_size[1]}x{r.hr_size[0]} | " + " | ".join(cells) + " |")
        mean = self.mean()
        if self.images:
            cells = [fmt(c, mean[m][c]) for m in METHODS for c in cols]
            lines.append("| **mean** | | " + " | ".join(f"**{x}**" for x in cells) + " |")
        return "\n".join(lines) + "\n"


def load_hr(path: Path, scale: int, hr_crop: int = 0) -> np.ndarray:
    """HR RGB in [0, 1], optionally centre-cropped to `hr_crop`, then cropped to a multiple of `scale`."""
    from model.imaging import decode_image
    from training.degrade import crop_to_multiple

    rgb = decode_image(path).rgb
    if hr_crop:
        h, w = rgb.shape[:2]
        ch, cw = min(h, hr_crop), min(w, hr_crop)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        rgb = rgb[y0:y0 + ch, x0:x0 + cw]
    return np.ascontiguousarray(crop_to_multiple(rgb, scale))


def side_by_side(hr: np.ndarray, outputs: dict[str, np.ndarray], crop_size: int):
    """A labelled PIL image: the same centre crop of HR and of every output, side by side."""
    from PIL import Image, ImageDraw

    h, w = hr.shape[:2]
    c = min(crop_size, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    panels = [("HR", hr)] + [(METHOD_TITLES[k], v) for k, v in outputs.items()]
    zoom = max(1, 256 // c)
    size, gap, label = c * zoom, 6, 18
    canvas = Image.new("RGB", (len(panels) * (size + gap) - gap, size + label), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, img) in enumerate(panels):
        crop = (np.clip(img[y0:y0 + c, x0:x0 + c], 0, 1) * 255).round().astype(np.uint8)
        tile = Image.fromarray(crop).resize((size, size), Image.Resampling.NEAREST)
        canvas.paste(tile, (i * (size + gap), label))
        draw.text((i * (size + gap) + 3, 3), name, fill="black")
    return canvas


def evaluate(opts: EvalOptions, progress: Callable[[str], None] | None = None) -> EvalReport:
    """Run the evaluation; `progress` gets one line per image."""
    from training.degrade import make_lr_numpy
    from training.masks import list_images

    torch.manual_seed(opts.sampler.seed)
    models = Models(opts.checkpoint, opts.device)
    scale = models.config.scale
    images = list_images(opts.hr_dir)
    if opts.max_images:
        images = images[: opts.max_images]
    if not images:
        raise FileNotFoundError(f"no images in {opts.hr_dir}")
    lp = Lpips(models.device)
    if opts.crops_dir:
        opts.crops_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in images:
        hr = load_hr(path, scale, opts.hr_crop)
        lr = make_lr_numpy(hr, scale)
        outputs, seconds = {}, {}
        for method in METHODS:
            t0 = time.perf_counter()
            if method == "bicubic":
                out = bicubic_upscale(lr, scale)
            elif method == "rrdb":
                out = models.rrdb(lr)
            else:
                out = models.diffusion(lr, opts.sampler)
            seconds[method] = round(time.perf_counter() - t0, 3)
            outputs[method] = quantize8(out)
        metrics = {}
        for method, out in outputs.items():
            m = {"psnr_y": psnr_y(out, hr, scale), "ssim": ssim_y(out, hr, scale)}
            if lp.available:
                m["lpips"] = lp(out, hr)
            metrics[method] = m
        results.append(ImageResult(path.name, (hr.shape[0], hr.shape[1]), metrics, seconds))
        if opts.crops_dir:
            side_by_side(hr, outputs, opts.crop_size).save(opts.crops_dir / f"{path.stem}.png")
        if progress:
            progress(f"{path.name}: " + ", ".join(
                f"{METHOD_TITLES[k]} {v['psnr_y']:.2f} dB / {v['ssim']:.4f}" for k, v in metrics.items()))
    return EvalReport(
        command=opts.command(), checkpoint=str(opts.checkpoint), checkpoint_name=models.info.name,
        scale=scale, sampler=asdict(opts.sampler), lpips="AlexNet" if lp.available else f"skipped: {lp.reason}",
        images=results,
    )


def write_report(report: EvalReport, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "eval.md", out / "eval.json"
    md.write_text(report.markdown())
    js.write_text(json.dumps(report.to_json(), indent=2, allow_nan=True) + "\n")
    return md, js
