"""Benchmark of the model core: denoiser steps and whole tiles, per backend and batch size.

Prints Markdown to stdout (progress goes to stderr), so `python bench/model_bench.py > bench.md` keeps
only the tables. Three tables:

1. **Denoiser step**: seconds per call of `Runtime.encode` and `Runtime.denoise` for every backend
   (torch, torchscript, onnx, all through `model.runtime.load_runtime`) and batch size.
2. **Per image**: one LR tile per image, encoded once and then sampled with N calls of
   `model.sampler.step_tracks`, for every backend, batch size and sampler/steps.
3. **Sampler vs the original loop**: our DDPM-100 (eager torch) against a plain eager loop written the
   way the original SRDiff/SAM-DiffSR code samples: RRDB once per image, then 100 U-Net calls, each of
   which projects the RRDB features again (the original `Unet.forward` owns `cond_proj`). Both draw the
   same noises, so their outputs must agree; the table shows the largest difference.

Step timings are medians of `--repeats` calls after `--warmup` untimed ones; whole sampling runs are timed
`--image-repeats` times on shapes already warmed up (`time.perf_counter`, CUDA synchronised). Random weights
of `--preset` are used unless `--checkpoint` is given: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from model.checkpoint import save_random_checkpoint
from model.config import PRESETS, ModelConfig
from model.diffusion import Schedule, ddpm_step
from model.loading import load_any
from model.network import SRDiffNet
from model.runtime import BACKENDS, Runtime, load_runtime, resolve_device
from model.sampler import SamplerName, new_track, sample, track_generator

# The default run takes a few minutes on two CPU cores; `--quick` (tiny model) takes about 20 s, mostly exporting.
DEFAULTS = dict(preset="small", batch_sizes="1,4", tile=32, steps="ddim:4,ddim:20", repeats=5, image_repeats=1,
                warmup=2, naive_batch=1)
QUICK = dict(preset="tiny", batch_sizes="1,2", tile=8, steps="ddim:2,ddim:4", repeats=2, image_repeats=1, warmup=2,
             naive_batch=1)


@dataclass(frozen=True)
class StepRow:
    backend: str
    batch: int
    load_s: float
    encode_s: float
    step_s: float


@dataclass(frozen=True)
class ImageRow:
    backend: str
    batch: int
    sampler: str
    steps: int
    batch_s: float


# ----------------------------------------------------------------------------- arguments


def parse_steps(spec: str, timesteps: int) -> list[tuple[SamplerName, int]]:
    """'ddim:4,ddim:20,ddpm:100' -> [('ddim', 4), ...]; a bare number means DDIM."""
    plans: list[tuple[SamplerName, int]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.rpartition(":")
        sampler = name or "ddim"
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r} in {item!r} (ddim or ddpm)")
        steps = int(n)
        if not 1 <= steps <= timesteps:
            raise ValueError(f"steps must be in 1..{timesteps}, got {item!r}")
        plans.append((sampler, steps))  # type: ignore[arg-type]
    return plans


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoint directory or original .ckpt (default: random --preset weights)")
    src.add_argument("--preset", choices=sorted(PRESETS), help=f"model preset (default {DEFAULTS['preset']})")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when there is one), cpu, cuda, cuda:N")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default: all of "
                                                                  f"{','.join(BACKENDS)})")
    p.add_argument("--batch-sizes", help=f"tiles per denoiser call (default {DEFAULTS['batch_sizes']})")
    p.add_argument("--tile", type=int, help=f"LR tile size in pixels (default {DEFAULTS['tile']})")
    p.add_argument("--steps", help=f"per-image sampler:steps list (default {DEFAULTS['steps']}); '' skips")
    p.add_argument("--repeats", type=int, help=f"timed repetitions of each step (default {DEFAULTS['repeats']})")
    p.add_argument("--image-repeats", type=int, help="timed repetitions of each whole sampling run (default "
                                                      f"{DEFAULTS['image_repeats']})")
    p.add_argument("--warmup", type=int, help=f"untimed calls before timing steps (default {DEFAULTS['warmup']}; "
                                               "TorchScript optimises on its second call)")
    p.add_argument("--naive-batch", type=int, help=f"batch of the sampler comparison (default "
                                                    f"{DEFAULTS['naive_batch']}); 0 skips it")
    p.add_argument("--threads", type=int, help="intra-op threads for torch and ONNX Runtime (default: theirs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, inputs and noises (default 0)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 8 px tiles (explicit options win)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.checkpoint:
        args.preset = None
    return args


# ----------------------------------------------------------------------------- timing helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- what is timed


def sample_ours(rt: Runtime, img_lr: Tensor, sampler: SamplerName, steps: int, seed: int) -> Tensor:
    """Our path: encode once, then `steps` batched sampler steps. Returns the final residuals."""
    cond, sr = rt.encode(img_lr)
    tracks = [new_track(cond[i], sr[i], rt.config.timesteps, steps, sampler, 0.0, seed, i) for i in range(len(cond))]
    return torch.stack(sample(rt.denoise, rt.schedule, tracks, prediction=rt.config.prediction))


@torch.no_grad()
def sample_naive(net: SRDiffNet, sched: Schedule, img_lr: Tensor, seed: int) -> Tensor:
    """The original code's loop, plainly: eager, full schedule, the condition projected inside every call.

    Noises come from the same per-image generators as `new_track`, so the result equals our DDPM output.
    """
    b, scale = img_lr.shape[0], net.cfg.scale
    shape = (3, img_lr.shape[-2] * scale, img_lr.shape[-1] * scale)
    gens = [track_generator(seed, i) for i in range(b)]

    def noise() -> Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(img_lr.device)

    sr, feats = net.rrdb(img_lr)  # once per image, as in the original `sample()`
    feats = net.rrdb.condition(sr, feats)
    x = noise()
    for i in reversed(range(sched.num_timesteps)):
        t = torch.full((b,), i, device=img_lr.device, dtype=torch.long)
        cond = net.denoise_fn.project_cond(feats)  # the original `Unet.forward` runs `cond_proj` every step
        eps = net.denoise_fn(x, t, cond)
        x = ddpm_step(sched, eps, t, x, noise())
    return x


def random_lr(batch: int, tile: int, device: torch.device, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, tile, tile, generator=g) * 2 - 1).to(device)


# ----------------------------------------------------------------------------- report


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args: argparse.Namespace, device: torch.device, cfg: ModelConfig, n_params: int) -> list[str]:
    import onnxruntime as ort

    dev = str(device)
    if device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    source = args.checkpoint or f"random weights, preset `{args.preset}`"
    ort_threads = args.threads or "ORT default"
    return [
        "## Model benchmark",
        "",
        "```",
        shlex.join(["python", *sys.argv]),
        "```",
        "",
        f"- python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"{platform.system()} {platform.machine()}",
        f"- device: {dev}; CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; torch threads: "
        f"{torch.get_num_threads()}, ONNX Runtime intra-op threads: {ort_threads}",
        f"- model: {source}; {n_params / 1e6:.2f} M parameters; x{cfg.scale}, {cfg.encoder.upper()} "
        f"{cfg.rrdb_num_block} blocks x {cfg.rrdb_num_feat} features (growth {cfg.rrdb_growth}), "
        f"{cfg.denoiser_space.upper()}-space U-Net width {cfg.hidden_size} x {'|'.join(map(str, cfg.dim_mults))}, "
        f"{cfg.timesteps} timesteps",
        f"- tile: {args.tile}x{args.tile} LR -> {args.tile * cfg.scale}x{args.tile * cfg.scale} HR, one tile per "
        f"image",
        f"- timing: median of {args.repeats} timed calls after {args.warmup} warm-up calls per denoiser step; "
        f"median of {args.image_repeats} whole sampling run(s) per image, on warmed-up shapes",
    ]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" ---: " if i else " --- " for i in
                                                             range(len(header))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def fmt(s: float) -> str:
    return f"{s:.4f}" if s < 1 else f"{s:.2f}"


# ----------------------------------------------------------------------------- main


def prepare_model(args: argparse.Namespace, tmp_dir: Path, device: torch.device
                  ) -> tuple[str | Path, SRDiffNet, ModelConfig]:
    """The checkpoint to load runtimes from, an eager copy of its network on `device`, and its config."""
    if args.checkpoint:
        net, info = load_any(args.checkpoint, device)
        return args.checkpoint, net, info.config
    ckpt = save_random_checkpoint(tmp_dir / "checkpoint", PRESETS[args.preset], f"bench-{args.preset}", args.seed)
    net, info = load_any(ckpt, device)
    return ckpt, net, info.config


def bench_batch(rt: Runtime, args: argparse.Namespace, batch: int, plans: list[tuple[SamplerName, int]],
                load_s: float) -> tuple[StepRow, list[ImageRow]]:
    """Encoder and denoiser-step timings at one batch size, then whole sampling runs for every plan."""
    device = rt.device
    img_lr = random_lr(batch, args.tile, device, args.seed)
    cond, _ = rt.encode(img_lr)
    x = torch.randn(batch, 3, *cond.shape[-2:]).to(device)
    t = torch.randint(0, rt.config.timesteps, (batch,)).to(device)
    enc_s = timed(partial(rt.encode, img_lr), device, args.warmup, args.repeats)
    step_s = timed(partial(rt.denoise, x, t, cond), device, args.warmup, args.repeats)
    images = []
    for sampler, steps in plans:
        progress(f"{rt.backend}: batch {batch}, {sampler.upper()}-{steps} per image")
        # The step timings above warmed these shapes up: no further warm-up.
        run = partial(sample_ours, rt, img_lr, sampler, steps, args.seed)
        images.append(ImageRow(rt.backend, batch, sampler, steps, timed(run, device, 0, args.image_repeats)))
    return StepRow(rt.backend, batch, load_s, enc_s, step_s), images


def compare_naive(args: argparse.Namespace, ckpt: str | Path, net: SRDiffNet, device: torch.device) -> list[str]:
    """Our full-schedule DDPM sampler (eager torch) against the original code's loop: same batch, same noises."""
    b = args.naive_batch
    rt = load_runtime(ckpt, "torch", str(device))
    steps = rt.config.timesteps
    img_lr = random_lr(b, args.tile, device, args.seed)
    progress(f"original loop vs our sampler: batch {b}, DDPM-{steps}")

    outputs: dict[str, Tensor] = {}

    def ours() -> None:
        outputs["ours"] = sample_ours(rt, img_lr, "ddpm", steps, args.seed)

    def naive() -> None:
        outputs["naive"] = sample_naive(net, rt.schedule, img_lr, args.seed)

    # Warm both paths up with a few calls at these shapes (a whole 100-step run would double the cost).
    x_t = torch.randn(b, 3, args.tile * net.cfg.scale, args.tile * net.cfg.scale).to(device)
    t = torch.zeros(b, dtype=torch.long, device=device)
    for _ in range(args.warmup):
        with torch.no_grad():
            net.denoise_fn(x_t, t, net.encode(img_lr)[0])
        rt.denoise(x_t, t, rt.encode(img_lr)[0])
    # Alternate the two, so that a change in machine load affects both alike.
    naive_times, ours_times = [], []
    for _ in range(args.image_repeats):
        naive_times.append(timed(naive, device, 0, 1))
        ours_times.append(timed(ours, device, 0, 1))
    naive_s, ours_s = statistics.median(naive_times), statistics.median(ours_times)
    diff = (outputs["ours"] - outputs["naive"]).abs().max().item()
    title = f"### Our sampler vs the original loop (eager torch, batch {b}, DDPM-{steps}, same noises)"
    rows = [["original: RRDB once, condition projected in every U-Net call", fmt(naive_s), fmt(naive_s / b), "1.00x"],
            ["ours: encode once + `step_tracks`", fmt(ours_s), fmt(ours_s / b), f"{naive_s / ours_s:.2f}x"]]
    return ["", title, "", *table(["loop", "s/batch", "s/image", "speed-up"], rows), "",
            f"Largest absolute difference between the two outputs: {diff:.3g}."]



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := set(backends) - set(BACKENDS):
        raise SystemExit(f"unknown backend(s) {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    step_rows: list[StepRow] = []
    image_rows: list[ImageRow] = []
    providers = ""
    with tempfile.TemporaryDirectory(prefix="samdiffsr-bench-") as tmp:
        ckpt, net, cfg = prepare_model(args, Path(tmp), device)
        if args.tile % cfg.lr_multiple:
            raise SystemExit(f"--tile must be a multiple of {cfg.lr_multiple} for this model")
        try:
            plans = parse_steps(args.steps, cfg.timesteps)
        except ValueError as e:
            raise SystemExit(f"--steps: {e}") from e
        out = environment(args, device, cfg, sum(p.numel() for p in net.parameters()))
        export_dir = Path(tmp) / "exports"
        for backend in backends:
            progress(f"loading {backend} (exporting if needed)")
            t0 = time.perf_counter()
            rt = load_runtime(ckpt, backend, str(device), export_dir=export_dir, threads=args.threads)
            if backend == "onnx":
                providers = ", ".join(rt.denoiser.get_providers())  # type: ignore[attr-defined]
            load_s = time.perf_counter() - t0
            for batch in batch_sizes:
                progress(f"{backend}: batch {batch}, encoder and denoiser step")
                step, images = bench_batch(rt, args, batch, plans, load_s)
                step_rows.append(step)
                image_rows += images
            del rt
        naive_lines = compare_naive(args, ckpt, net, device) if args.naive_batch else []

    out += ["", "### Denoiser step", ""]
    if providers:
        out += [f"ONNX Runtime providers in use: {providers}.", ""]
    out += table(
        ["backend", "batch", "load + export s", "encode s/batch", "step s/batch", "step s/image"],
        [[r.backend, str(r.batch), f"{r.load_s:.2f}", fmt(r.encode_s), fmt(r.step_s), fmt(r.step_s / r.batch)]
         for r in step_rows])
    if image_rows:
        out += ["", "### Per image (one tile: encode once + N sampler steps)", ""]
        out += table(
            ["backend", "batch", "sampler", "steps", "s/batch", "s/image", "images/s"],
            [[r.backend, str(r.batch), r.sampler.upper(), str(r.steps), fmt(r.batch_s), fmt(r.batch_s / r.batch),
              f"{r.batch / r.batch_s:.3g}"] for r in image_rows])
    print("\n".join(out + naive_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
