"""`samdiffsr eval`: PSNR-Y / SSIM (/ LPIPS) of bicubic, RRDB and diffusion outputs on HR images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.degrade import EVAL_DEGRADATIONS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint on a folder of HR images (bicubic vs the model at each step count)",
        description="LR images are made from the HR images (MATLAB bicubic x4); the table compares bicubic "
        "upscaling with the model at each number of steps (0: the RRDB encoder's own output). Seeded: the "
        "same command gives the same numbers.")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (or an original .ckpt)")
    p.add_argument("hr_dir", type=Path, help="folder of HR images")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim", help="default: ddim")
    p.add_argument("--steps", type=_steps_list, default=None,
                   help="comma-separated sampling steps, one column each, e.g. 0,1,2,4 (0: the encoder's own "
                   "output; default: 0 and the checkpoint's default steps)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--tile", type=int, default=0,
                   help="sample in LR tiles of this size as the service does (default: 0 = whole image)")
    p.add_argument("--overlap", type=int, default=8, help="tile overlap in LR pixels (default: 8)")
    p.add_argument("--max-batch", type=int, default=16, help="tiles sampled together (default: 16)")
    p.add_argument("--ensemble", type=int, default=1,
                   help="self-ensemble members: 1, 2 (and the mirror) or 4 (all flips) (default: 1)")
    p.add_argument("--hr-crop", type=int, default=0,
                   help="centre-crop HR images to at most NxN first, to keep CPU runs short (default: 0 = off)")
    p.add_argument("--max-images", type=int, default=0, help="only the first N images by name (default: all)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto (default: cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                   help="the network's compute precision (default: fp32)")
    p.add_argument("--degradation", choices=EVAL_DEGRADATIONS, default="bicubic",
                   help="how LR inputs are made from HR: bicubic (the paper's), jpeg90/jpeg75/jpeg50 (that LR saved "
                   "as JPEG), noise10 (Gaussian sigma 10/255), blur (Gaussian sigma 1.2, then bicubic) or real "
                   "(the Real-ESRGAN-style pipeline at a fixed seed); default: bicubic")
    p.add_argument("--out", type=Path, help="write eval.md and eval.json here")
    p.add_argument("--crops", action="store_true", help="also write side-by-side crops to OUT/crops/")
    p.add_argument("--crop-size", type=int, default=128, help="HR size of those crops (default: 128)")
    p.set_defaults(func=cmd_eval)


def _steps_list(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError("steps must be integers >= 0")
    return steps


def cmd_eval(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError
    from model.imaging import ImageDecodeError
    from training.evaluate import EvalOptions, SamplerSettings, evaluate, write_report

    if args.crops and not args.out:
        print("error: --crops needs --out", file=sys.stderr)
        return 2
    if args.hr_crop < 0 or args.tile < 0:
        print("error: --hr-crop and --tile must be >= 0", file=sys.stderr)
        return 2
    opts = EvalOptions(
        checkpoint=args.checkpoint, hr_dir=args.hr_dir, device=args.device, hr_crop=args.hr_crop,
        max_images=args.max_images, crops_dir=args.out / "crops" if args.crops else None,
        crop_size=args.crop_size, precision=args.precision, degradation=args.degradation,
        sampler=SamplerSettings(sampler=args.sampler, steps=args.steps or (), eta=args.eta, seed=args.seed,
                                tile=args.tile, overlap=args.overlap, max_batch=args.max_batch,
                                ensemble=args.ensemble))
    try:
        report = evaluate(opts, progress=lambda line: print(line, file=sys.stderr))
    except (CheckpointError, FileNotFoundError, ImageDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.markdown(), end="")
    if args.out:
        md, js = write_report(report, args.out)
        print(f"wrote {md} and {js}", file=sys.stderr)
    return 0
