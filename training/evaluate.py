"""Evaluate a checkpoint on HR images: bicubic vs. the model at each number of steps (0: the encoder's output).

Protocol (SRDiff / SAM-DiffSR conventions):

- HR images are cropped at the bottom/right to a multiple of the scale; LR = `training.degrade.degrade_named`:
  by default `bicubic` (`make_lr`, MATLAB antialiased bicubic, 8-bit), or a fixed real-world degradation (JPEG,
  noise, blur, `real`). The bicubic baseline is bicubic upscaling of that same degraded LR.
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bicubic_pytorch import core as bicubic
from PIL import Image, ImageDraw

from model.diffusion import check_steps
from model.imaging import decode_image, list_images
from model.loading import load_any
from model.runtime import TorchRuntime, resolve_device, resolve_precision
from model.sizing import choose_batch
from model.upscale import Upscaler, default_steps, default_tile, ensemble_flips
from training.degrade import crop_to_multiple, degrade_named
from training.metrics import flat_error, psnr_y, quantize8, ssim_y

BICUBIC = "bicubic"
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # what lpips.LPIPS(net="alex") loads through torchvision


# ---------------------------------------------------------------------------------------------------
# Metrics


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


def bicubic_upscale(lr01: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB-style bicubic upscaling of (h, w, 3) RGB in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(lr01, np.float32)).permute(2, 0, 1)
    return bicubic.imresize(t, scale=scale).clamp(0, 1).permute(1, 2, 0).numpy()


def method_key(steps: int) -> str:
    return f"steps={steps}"


def method_title(method: str) -> str:
    return {BICUBIC: "bicubic", method_key(0): "steps=0 (encoder)"}.get(method, method)


@dataclass
class SamplerSettings:
    sampler: str = "ddim"
    steps: tuple[int, ...] = ()  # one column per value; 0 is the encoder's own x4 output; () = 0 and the default
    eta: float = 0.0
    seed: int = 0
    tile: int = 0  # LR tile size, as the service tiles; 0 = the whole image at once
    overlap: int = 8
    max_batch: int | None = None  # tiles per call; None: as served (`model.sizing.choose_batch`)
    ensemble: int = 1  # self-ensemble members (model.upscale.ensemble_flips)


class Models:
    """A checkpoint, run through `model.upscale.Upscaler` (the one inference path) on the torch backend."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu", precision: str = "fp32") -> None:
        net, self.info = load_any(checkpoint, "cpu")
        self.device = resolve_device(device)
        self.runtime = TorchRuntime(net, self.info, self.device, resolve_precision(precision, self.device))
        self.config = self.info.config
        self._batches: dict[int, int] = {}  # tiles per call as served, by tile size (`model.sizing`)

    def upscale(self, lr01: np.ndarray, s: SamplerSettings, steps: int) -> np.ndarray:
        if not s.max_batch and s.tile not in self._batches:  # chosen once per tile size: on a GPU it is timed
            self._batches[s.tile] = choose_batch(self.runtime, (s.tile, s.tile)).batch
        up = Upscaler(self.runtime, tile=s.tile, overlap=s.overlap, max_batch=s.max_batch or self._batches[s.tile])
        return up.upscale_rgb(lr01, steps, s.sampler, s.eta, s.seed, ensemble=s.ensemble)  # type: ignore[arg-type]


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
    crops_dir: Path | None = None  # write side-by-side crops here, and all of them stacked: contact-sheet.png
    crop_size: int = 128  # HR size of those crops
    precision: str = "fp32"  # the denoiser's (model.runtime.PRECISIONS)
    degradation: str = "bicubic"  # training.degrade.EVAL_DEGRADATIONS

    def command(self) -> str:
        """The `samdiffsr eval` command line that reproduces this evaluation."""
        s = self.sampler
        args = ["samdiffsr", "eval", str(self.checkpoint), str(self.hr_dir), "--sampler", s.sampler,
                "--steps", ",".join(map(str, s.steps)), "--eta", str(s.eta), "--seed", str(s.seed),
                "--tile", str(s.tile)]
        if s.tile:
            args += ["--overlap", str(s.overlap)]
        if s.max_batch is not None:
            args += ["--max-batch", str(s.max_batch)]
        if s.ensemble != 1:
            args += ["--ensemble", str(s.ensemble)]
        if self.hr_crop:
            args += ["--hr-crop", str(self.hr_crop)]
        if self.max_images:
            args += ["--max-images", str(self.max_images)]
        if self.precision != "fp32":
            args += ["--precision", self.precision]
        if self.degradation != "bicubic":
            args += ["--degradation", self.degradation]
        return shlex.join(args)


@dataclass
class ImageResult:
    name: str
    hr_size: tuple[int, int]  # (height, width) after cropping
    metrics: dict[str, dict[str, float]]  # method (bicubic, steps=N) -> {"psnr_y": .., "ssim": .., "lpips": ..}
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
    degradation: str = "bicubic"

    @property
    def methods(self) -> list[str]:
        return list(self.images[0].metrics) if self.images else []

    def mean(self) -> dict[str, dict[str, float]]:
        """Each method's metrics averaged over the images (NaN, e.g. no flat area, left out)."""
        out: dict[str, dict[str, float]] = {}
        for method in self.methods:
            keys = self.images[0].metrics[method].keys() if self.images else ()
            out[method] = {k: float(np.nanmean([r.metrics[method].get(k, math.nan) for r in self.images]))
                           for k in keys}
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = self.mean()
        return d

    def markdown(self) -> str:
        has_lpips = bool(self.images) and "lpips" in self.images[0].metrics[BICUBIC]
        cols = ["psnr_y", "ssim"] + (["lpips"] if has_lpips else [])
        col_names = {"psnr_y": "PSNR-Y", "ssim": "SSIM", "lpips": "LPIPS"}
        methods = self.methods
        s = self.sampler
        lines = [
            f"Evaluation of `{self.checkpoint_name}` (x{self.scale}), {len(self.images)} images",
            "",
            f"Command: `{self.command}`",
            "",
            f"LR: MATLAB antialiased bicubic x{self.scale} of the HR image (cropped to a multiple of "
            f"{self.scale}), 8-bit, degradation `{self.degradation}` (bicubic: the baseline, upscaling that same "
            f"LR). Outputs quantised to 8 bits. PSNR-Y: BT.601 Y, {self.scale} px border "
            f"cropped. SSIM: on Y, Gaussian 11x11, sigma 1.5. Sampler: {s['sampler']}, eta {s['eta']}, "
            f"seed {s['seed']}, " + (f"tiles of {s['tile']} LR px (overlap {s['overlap']})." if s["tile"] else
                                     "whole image.") + f" LPIPS: {self.lpips}.",
            "",
        ]

        def fmt(c: str, v: float) -> str:
            return "inf" if math.isinf(v) else (f"{v:.2f}" if c == "psnr_y" else f"{v:.4f}")

        mean = self.mean()
        if self.images:
            lines += ["| method | " + " | ".join(col_names[c] for c in cols) + " | PSNR-Y gain | flat error / "
                      "bicubic's | s/image |", "|---|" + "---:|" * (len(cols) + 3)]
            for m in methods:
                secs = float(np.mean([r.seconds[m] for r in self.images]))
                gain = mean[m]["psnr_y"] - mean[BICUBIC]["psnr_y"]
                flat = mean[m].get("flat", math.nan) / mean[BICUBIC].get("flat", math.nan)
                lines.append(f"| {method_title(m)} | " + " | ".join(fmt(c, mean[m][c]) for c in cols)
                             + f" | {gain:+.2f} dB | {flat:.2f} | {secs:.2f} |")
            lines.append("")
        lines += [
            "| image | HR size | " + " | ".join(f"{method_title(m)} {col_names[c]}" for m in methods
                                             for c in cols) + " |",
            "|---|---|" + "---:|" * (len(methods) * len(cols)),
        ]
        for r in self.images:
            cells = [fmt(c, r.metrics[m][c]) for m in methods for c in cols]
            lines.append(f"| {r.name} | {r.hr_size[1]}x{r.hr_size[0]} | " + " | ".join(cells) + " |")
        if self.images:
            cells = [fmt(c, mean[m][c]) for m in methods for c in cols]
            lines.append("| **mean** | | " + " | ".join(f"**{x}**" for x in cells) + " |")
        return "\n".join(lines) + "\n"


def load_hr(path: Path, scale: int, hr_crop: int = 0) -> np.ndarray:
    """HR RGB in [0, 1], optionally centre-cropped to `hr_crop`, then cropped to a multiple of `scale`."""
    rgb = decode_image(path).rgb
    if hr_crop:
        h, w = rgb.shape[:2]
        ch, cw = min(h, hr_crop), min(w, hr_crop)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        rgb = rgb[y0:y0 + ch, x0:x0 + cw]
    return np.ascontiguousarray(crop_to_multiple(rgb, scale))


def contact_sheet(rows: list[Image.Image], gap: int = 8) -> Image.Image:
    """Side-by-side crops (`side_by_side`) stacked top to bottom on white."""
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + gap * (len(rows) - 1)),
                      "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + gap
    return sheet


def side_by_side(hr: np.ndarray, outputs: dict[str, np.ndarray], crop_size: int) -> Image.Image:
    """A labelled PIL image: the same centre crop of HR and of every output, side by side."""
    h, w = hr.shape[:2]
    c = min(crop_size, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    panels = [("HR", hr)] + [(method_title(k), v) for k, v in outputs.items()]
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
    torch.manual_seed(opts.sampler.seed)
    models = Models(opts.checkpoint, opts.device, opts.precision)
    if not opts.sampler.steps:
        opts.sampler.steps = (0, default_steps(models.config))
    for steps in opts.sampler.steps:
        check_steps(steps, models.config.timesteps)
    ensemble_flips(opts.sampler.ensemble)  # raises ValueError for an unknown member count
    scale = models.config.scale
    images = list_images(opts.hr_dir)
    if opts.max_images:
        images = images[: opts.max_images]
    if not images:
        raise FileNotFoundError(f"no images in {opts.hr_dir}")
    lp = Lpips(models.device)
    if opts.crops_dir:
        opts.crops_dir.mkdir(parents=True, exist_ok=True)
    sheet: list[Image.Image] = []
    results = []
    for index, path in enumerate(images):
        hr = load_hr(path, scale, opts.hr_crop)
        lr = degrade_named(hr, opts.degradation, scale, seed=index)
        outputs, seconds = {}, {}
        t0 = time.perf_counter()
        outputs[BICUBIC] = quantize8(bicubic_upscale(lr, scale))
        seconds[BICUBIC] = round(time.perf_counter() - t0, 3)
        for steps in opts.sampler.steps:
            t0 = time.perf_counter()
            out = models.upscale(lr, opts.sampler, steps)
            seconds[method_key(steps)] = round(time.perf_counter() - t0, 3)
            outputs[method_key(steps)] = quantize8(out)
        metrics = {}
        for method, out in outputs.items():
            m = {"psnr_y": psnr_y(out, hr, scale), "ssim": ssim_y(out, hr, scale), "flat": flat_error(out, hr, scale)}
            if lp.available:
                m["lpips"] = lp(out, hr)
            metrics[method] = m
        results.append(ImageResult(path.name, (hr.shape[0], hr.shape[1]), metrics, seconds))
        if opts.crops_dir:
            sheet.append(side_by_side(hr, outputs, opts.crop_size))
            sheet[-1].save(opts.crops_dir / f"{path.stem}.png")
        if progress:
            progress(f"{path.name}: " + ", ".join(
                f"{method_title(k)} {v['psnr_y']:.2f} dB / {v['ssim']:.4f}" for k, v in metrics.items()))
    if sheet:
        contact_sheet(sheet).save(opts.crops_dir / "contact-sheet.png")  # type: ignore[operator]
    return EvalReport(
        command=opts.command(), checkpoint=str(opts.checkpoint), checkpoint_name=models.info.name,
        scale=scale, sampler=asdict(opts.sampler), lpips="AlexNet" if lp.available else f"skipped: {lp.reason}",
        images=results, degradation=opts.degradation,
    )


def degradation_table(reports: list[EvalReport]) -> str:
    """One markdown table for the same checkpoint under several degradations: rows = degradation, columns =
    bicubic of the same degraded LR and each step count, cells = mean PSNR-Y / SSIM; last, each step count's error
    in flat areas over bicubic's (`training.metrics.flat_error`; above 1: noise or artefacts added)."""
    methods = reports[0].methods
    lines = ["| degradation | " + " | ".join(method_title(m) for m in methods) + " | flat error / bicubic's |",
             "|---|" + "---:|" * (len(methods) + 1)]
    for r in reports:
        mean = r.mean()
        flats = [f"{mean[m].get('flat', math.nan) / mean[BICUBIC].get('flat', math.nan):.2f}"
                 for m in methods if m != BICUBIC]
        lines.append(f"| {r.degradation} | " + " | ".join(
            f"{mean[m]['psnr_y']:.2f} / {mean[m]['ssim']:.4f}" for m in methods) + f" | {' / '.join(flats)} |")
    return "\n".join(lines) + "\n"


def degradation_csv(reports: list[EvalReport]) -> str:
    """The same as `degradation_table`, one row per (degradation, method): what `training.evalplot` draws."""
    rows = ["degradation,method,steps,psnr_y,ssim,flat"]
    for r in reports:
        for method, m in r.mean().items():
            steps = "" if method == BICUBIC else method.removeprefix("steps=")
            flat = m.get("flat", math.nan)
            rows.append(f"{r.degradation},{method},{steps},{m['psnr_y']:.4f},{m['ssim']:.5f},{flat:.4f}")
    return "\n".join(rows) + "\n"


def compare_sheet(models: dict[str, Models], hr_paths: list[Path], degradation: str, sampler: SamplerSettings,
                  crop_size: int = 96) -> Image.Image:
    """HR | bicubic | each model (at its default steps), the same centre crop of every image, on LR made by
    `degradation`: a contact sheet that shows what each model does with, say, JPEG block edges. A `sampler.tile`
    of 0 tiles each model at its own served size (`model.upscale.default_tile`)."""
    rows = []
    scale = next(iter(models.values())).config.scale
    served = {label: replace(sampler, tile=sampler.tile or default_tile(m.config)) for label, m in models.items()}
    for index, path in enumerate(hr_paths):
        hr = load_hr(path, scale)
        lr = degrade_named(hr, degradation, scale, seed=index)
        outputs = {"bicubic": quantize8(bicubic_upscale(lr, scale))}
        for label, m in models.items():
            outputs[label] = quantize8(m.upscale(lr, served[label], default_steps(m.config)))
        rows.append(side_by_side(hr, outputs, crop_size))
    return contact_sheet(rows)


def write_report(report: EvalReport, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "eval.md", out / "eval.json"
    md.write_text(report.markdown())
    js.write_text(json.dumps(report.to_json(), indent=2, allow_nan=True) + "\n")
    return md, js
