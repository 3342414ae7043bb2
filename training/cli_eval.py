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
    p.add_argument("--max-batch", type=int, default=None,
                   help="tiles sampled together (default: as served, the rule of model.sizing)")
    p.add_argument("--ensemble", type=int, default=1,
                   help="self-ensemble members: 1, 2 (and the mirror) or 4 (all flips) (default: 1)")
    p.add_argument("--hr-crop", type=int, default=0,
                   help="centre-crop HR images to at most NxN first, to keep CPU runs short (default: 0 = off)")
    p.add_argument("--max-images", type=int, default=0, help="only the first N images by name (default: all)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto (default: cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                   help="the network's compute precision (default: fp32)")
    p.add_argument("--degradation", type=_degradations, default=("bicubic",),
                   help="how LR inputs are made from HR: bicubic (the paper's), jpeg90/jpeg75/jpeg50 (that LR saved "
                   "as JPEG), noise10 (Gaussian sigma 10/255), blur (Gaussian sigma 1.2, then bicubic) or real "
                   "(the Real-ESRGAN-style pipeline at a fixed seed); several comma-separated, or all: one "
                   "evaluation each (OUT/NAME/) and a table of them (OUT/degradations.md); default: bicubic")
    p.add_argument("--out", type=Path, help="write eval.md and eval.json here")
    p.add_argument("--crops", action="store_true", help="also write side-by-side crops to OUT/crops/")
    p.add_argument("--crop-size", type=int, default=128, help="HR size of those crops (default: 128)")
    p.set_defaults(func=cmd_eval)
    register_compare(sub)


def _degradations(text: str) -> tuple[str, ...]:
    names = EVAL_DEGRADATIONS if text == "all" else tuple(dict.fromkeys(v.strip() for v in text.split(",")))
    unknown = [n for n in names if n not in EVAL_DEGRADATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown degradation {', '.join(unknown)!s}; choose from "
                                         f"{', '.join(EVAL_DEGRADATIONS)} or all")
    return names


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
    from training.evaluate import (
        EvalOptions,
        SamplerSettings,
        degradation_csv,
        degradation_table,
        evaluate,
        write_report,
    )

    if args.crops and not args.out:
        print("error: --crops needs --out", file=sys.stderr)
        return 2
    if args.hr_crop < 0 or args.tile < 0:
        print("error: --hr-crop and --tile must be >= 0", file=sys.stderr)
        return 2
    reports = []
    for name in args.degradation:
        several = len(args.degradation) > 1
        out = args.out / name if args.out and several else args.out
        opts = EvalOptions(
            checkpoint=args.checkpoint, hr_dir=args.hr_dir, device=args.device, hr_crop=args.hr_crop,
            max_images=args.max_images, crops_dir=out / "crops" if args.crops and out else None,
            crop_size=args.crop_size, precision=args.precision, degradation=name,
            sampler=SamplerSettings(sampler=args.sampler, steps=args.steps or (), eta=args.eta, seed=args.seed,
                                    tile=args.tile, overlap=args.overlap, max_batch=args.max_batch,
                                    ensemble=args.ensemble))
        try:
            report = evaluate(opts, progress=lambda line: print(line, file=sys.stderr))
        except (CheckpointError, FileNotFoundError, ImageDecodeError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(report.markdown(), end="")
        if out:
            md, js = write_report(report, out)
            print(f"wrote {md} and {js}", file=sys.stderr)
        reports.append(report)
    if len(reports) > 1:
        table = degradation_table(reports)
        print(f"\nBy degradation (mean PSNR-Y / SSIM):\n\n{table}", end="")
        if args.out:
            (args.out / "degradations.md").write_text(f"`{reports[0].command}` and the other degradations\n\n"
                                                       + table)
            (args.out / "degradations.csv").write_text(degradation_csv(reports))
    return 0


def register_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="a contact sheet: HR | bicubic | each checkpoint, on degraded LR",
                       description="The same centre crop of every image: HR, bicubic of the degraded LR, and each "
                       "checkpoint at its default steps (tiled as served), side by side.")
    p.add_argument("hr_dir", type=Path, help="folder of HR images")
    p.add_argument("checkpoints", nargs="+", metavar="LABEL=DIR", help="checkpoints to compare, labelled")
    p.add_argument("--degradation", choices=EVAL_DEGRADATIONS, default="jpeg75", help="default: jpeg75")
    p.add_argument("--crop-size", type=int, default=96, help="HR size of the crops (default: 96)")
    p.add_argument("--tile", type=int, default=0, help="LR tile size (default: each model's, as served)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="auto")
    p.add_argument("--out", type=Path, required=True, help="the sheet (PNG)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError
    from model.imaging import list_images
    from training.evaluate import Models, SamplerSettings, compare_sheet

    try:
        pairs = [c.split("=", 1) for c in args.checkpoints]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError("checkpoints are given as LABEL=DIR")
        models = {label: Models(path, "cpu", args.precision) for label, path in pairs}
        sheet = compare_sheet(models, list_images(args.hr_dir), args.degradation,
                              SamplerSettings(tile=args.tile), args.crop_size)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")
    return 0
