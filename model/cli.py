"""Model subcommands: verify-reference, import-upstream, import-pretrained, repack, export, upscale."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.upscale import Upscaler

CONFORMANCE_GROUP = "samdiffsr.conformance"
# Tensors of a reference directory that are inputs; every other tensor is an expected output.
REFERENCE_INPUTS = {"img_lr", "img_lr_up", "img_hr", "denoise_x", "denoise_t", "train_t", "train_noise",
                    "train_sam_mask", "sample_noises", "spe_masks"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify-reference", help="check this implementation against the original code's tensors")
    p.add_argument("ref_dir", help="directory with upstream_checkpoint.ckpt, config.json, vectors.safetensors")
    p.set_defaults(func=cmd_verify_reference)

    p = sub.add_parser("import-upstream", help="convert an original SAM-DiffSR/SRDiff checkpoint")
    p.add_argument("input", help="original .ckpt file")
    p.add_argument("output", help="output checkpoint directory")
    p.add_argument("--name", help="model name recorded in the checkpoint (default: the file's stem)")
    p.set_defaults(func=cmd_import_upstream)

    p = sub.add_parser("import-pretrained", help="a checkpoint whose encoder is published pretrained networks",
                       description="Write a checkpoint whose encoder is one pretrained network (rfdn, rlfn, safmn) or "
                       "several fused (rfdn+rlfn), with the published weights loaded strictly and checked by sha256, "
                       "a fresh denoiser and a NOTICE of their licences. Served at steps=0 it is the networks "
                       "themselves. configs/refine.yaml trains a refiner over the published networks directly "
                       "(diffusion.pretrained_dir).")
    p.add_argument("encoder", help="rfdn, rlfn, safmn, or several joined by '+'; 'rfdn:3' keeps its first 3 blocks")
    p.add_argument("output", help="output checkpoint directory")
    p.add_argument("--weights", default="../shared/pretrained",
                   help="folder with one sub-folder per network holding its published file (default: %(default)s)")
    p.add_argument("--name", help="model name recorded in the checkpoint (default: samdiffsr-ENCODER)")
    p.set_defaults(func=cmd_import_pretrained)

    p = sub.add_parser("repack", help="rewrite a checkpoint with its weights stored in another precision",
                       description="Rewrite a checkpoint (ours or an original .ckpt) in our format with its weights "
                       "stored as fp16, bf16 or fp32. Storage only: they are computed in the precision the runtime "
                       "chooses. fp16 halves the size; measured on the validation photos it changes PSNR-Y by "
                       "less than 0.01 dB (docs/model-card.md).")
    p.add_argument("input", help="checkpoint directory or original .ckpt")
    p.add_argument("output", help="output checkpoint directory")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="default: fp16")
    p.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="set a serving default in the config's extras, e.g. default_steps=0 or default_tile=256 "
                   "(a JSON value; repeatable)")
    p.add_argument("--card", type=Path, metavar="JSON",
                   help="replace the model card (summary, validation) by this file's")
    p.add_argument("--name", help="replace the model's name")
    p.add_argument("--member", metavar="NETWORK",
                   help="keep only this network of a fused encoder (e.g. rfdn of rfdn+rlfn), with a fresh denoiser "
                   "that returns its image at any step count; served at steps=0 unless --extra says otherwise")
    p.set_defaults(func=cmd_repack)

    p = sub.add_parser("export", help="export a checkpoint's encoder and denoiser step to TorchScript / ONNX")
    p.add_argument("checkpoint", help="checkpoint directory (or original .ckpt)")
    p.add_argument("output", help="export directory")
    p.add_argument("--format", choices=["torchscript", "onnx", "all"], default="all")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("upscale", help="upscale an image file or a folder of images x4")
    p.add_argument("input", help="image file or folder")
    p.add_argument("output", help="output file (extension picks the format) or folder (PNG files)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default="auto",
                       help="the model's id in --models-dir, as the service names it, or auto (the default, the "
                       "service's rule: a model trained on real-world degradations for JPEG and lossy WebP "
                       "files, else a clean one); see docs/models.md")
    which.add_argument("--checkpoint", help="a checkpoint directory or original .ckpt instead of --model")
    p.add_argument("--models-dir", type=Path,
                   help="where --model looks (default: SAMDIFFSR_MODELS_DIR, else ./checkpoints, else the "
                   "checkpoints folder this package was installed from)")
    p.add_argument("--steps", type=int, help="denoiser steps (default: the checkpoint's default)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], help="default: the checkpoint's default (ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ensemble", type=int, default=1,
                   help="self-ensemble of 1, 2 or 4 members: also upscale the image's mirror (2) or all its flips (4) "
                   "and average them, for 2x or 4x the work and a higher PSNR (default 1: off)")
    p.add_argument("--tile", type=int, help="LR tile size (default: the checkpoint's extras.default_tile, else 64)")
    p.add_argument("--overlap", type=int, default=8, help="LR overlap between tiles")
    p.add_argument("--snug-tiles", action=argparse.BooleanOptionalAction, default=True,
                   help="size the tiles to each image (up to 1.25x --tile) so that it needs fewer (default: on)")
    p.add_argument("--batch", type=int, help="tiles per denoiser call (default: what suits the device, "
                   "model/sizing.py)")
    p.add_argument("--backend", choices=["torch", "torchscript", "onnx"], default="torch")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="the network's precision (default auto: the measured default for the device)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no line per image, no summary; "
                   "errors only")
    p.set_defaults(func=cmd_upscale)


def _extra_checks() -> tuple[list, list[str]]:
    """Conformance checks that other installed packages provide (e.g. the SPE, in `training`)."""
    checks, names = [], []
    for ep in entry_points(group=CONFORMANCE_GROUP):
        checks.append(ep.load())
        names.append(ep.name)
    return checks, names


def cmd_verify_reference(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from model.conformance import format_rows, verify_reference

    checks, _ = _extra_checks()
    try:
        rows = verify_reference(args.ref_dir, extra=checks)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    with safe_open(f"{args.ref_dir}/vectors.safetensors", "pt") as f:
        outputs = set(f.keys()) - REFERENCE_INPUTS
    unchecked = sorted(outputs - {r.name for r in rows})
    for name in unchecked:
        print(f"{name}: NOT CHECKED (no installed check computes it)")
    failed = [r.name for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)}/{len(rows)} tensors match" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed or unchecked else 0


def cmd_import_upstream(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError, save_checkpoint
    from model.upstream import import_upstream_checkpoint

    try:
        net, info = import_upstream_checkpoint(args.input)
    except (CheckpointError, FileNotFoundError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.name:
        info.name = args.name
    out = save_checkpoint(args.output, net, info)
    n = sum(p.numel() for p in net.parameters())
    print(f"imported {args.input} -> {out} ({n:,} parameters; config {info.config.to_dict()})")
    return 0


def cmd_import_pretrained(args: argparse.Namespace) -> int:
    from model.published import import_pretrained, refiner_config

    try:
        cfg = refiner_config(args.encoder)  # served at steps=0, its denoiser is never run
        folders = {n: Path(args.weights) / n for n in cfg.pretrained}
        out = import_pretrained(args.output, cfg, folders, args.name or f"samdiffsr-{args.encoder}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {args.encoder} ({', '.join(str(f) for f in folders.values())}) -> {out}")
    return 0


def cmd_repack(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from model.checkpoint import CheckpointError, save_checkpoint
    from model.loading import load_any
    from model.published import member_net

    if Path(args.output).resolve() == Path(args.input).resolve():
        print("error: write the repacked checkpoint to another directory", file=sys.stderr)
        return 2
    try:
        net, info = load_any(args.input)
        if args.member:
            net = member_net(net, args.member)
            info.config = net.cfg = dataclasses.replace(net.cfg, extras={**net.cfg.extras, "default_steps": 0})
            info.card = {}  # the fused model's figures are not the member's
            info.provenance = {**info.provenance, "member": f"{args.member} of {args.input}"}
        extras = dict(info.config.extras)
        for item in args.extra:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--extra {item!r}: expected KEY=VALUE")
            extras[key] = json.loads(value)
        info.config = net.cfg = dataclasses.replace(info.config, extras=extras)
        if args.card:
            info.card = json.loads(args.card.read_text())
        if args.name:
            info.name = args.name
    except (CheckpointError, FileNotFoundError, IsADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_checkpoint(args.output, net, info, dtype=args.dtype)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"repacked {args.input} -> {out} (weights stored as {args.dtype}, {size:.1f} MiB)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError
    from model.export import export
    from model.loading import load_any

    try:
        net, info = load_any(args.checkpoint)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    formats = ("torchscript", "onnx") if args.format == "all" else (args.format,)
    out = export(net, info, args.output, formats)
    print(f"exported {', '.join(formats)} -> {out}")
    return 0


def _load(path: Path, args: argparse.Namespace) -> tuple[Upscaler, int]:
    """One model's upscaler as the options ask, and its steps (checked against its timesteps)."""
    from model.diffusion import timestep_plan
    from model.runtime import load_runtime
    from model.sizing import SNUG_GROW, choose_batch
    from model.upscale import Upscaler, default_steps, default_tile

    runtime = load_runtime(path, args.backend, args.device, precision=args.precision)
    tile = args.tile or default_tile(runtime.config)
    batch = choose_batch(runtime, (tile, tile), args.batch).batch
    upscaler = Upscaler(runtime, tile=tile, overlap=args.overlap, max_batch=batch,
                        grow=SNUG_GROW if args.snug_tiles else 1.0)
    steps = default_steps(runtime.config) if args.steps is None else args.steps
    timestep_plan(runtime.config.timesteps, steps)
    return upscaler, steps


def cmd_upscale(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from model.checkpoint import CheckpointError
    from model.files import Candidate, Summary, UsageError, choose_models, header_size, plan_outputs
    from model.imaging import ImageDecodeError, decode_image, save_image
    from model.repository import default_models_dir
    from model.runtime import resolve_device
    from model.upscale import ensemble_flips

    src = Path(args.input)
    try:  # every user error fails here, before any image is decoded
        pairs = plan_outputs(src, args.output)
        if not pairs:
            raise UsageError(f"no images in {src}")
        inputs = [p for p, _ in pairs]
        ensemble_flips(args.ensemble)
        device = resolve_device(args.device)
        if args.checkpoint:
            one = Candidate(Path(args.checkpoint).stem, Path(args.checkpoint), "", False)
            chosen = dict.fromkeys(inputs, one)
        else:
            chosen = choose_models(inputs, args.model, args.models_dir or default_models_dir(), device.type)
        loaded = {c.id: _load(c.path, args) for c in dict.fromkeys(chosen.values())}
    except (UsageError, CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def tiles(path: Path, size: tuple[int, int] | None) -> int:
        return 0 if size is None else len(loaded[chosen[path].id][0].plan(*size)) * args.ensemble

    expected = {p: tiles(p, header_size(p)) for p in inputs}
    summary, t0, n = Summary(), time.perf_counter(), len(pairs)
    first = "image 1 of {n}" if n > 1 else inputs[0].name[:40]
    with tqdm(total=sum(expected.values()), unit="tile", desc=first.format(n=n), disable=args.quiet,
              dynamic_ncols=True) as bar:
        for i, (path_in, path_out) in enumerate(pairs, 1):
            upscaler, steps = loaded[chosen[path_in].id]
            bar.set_description(f"image {i} of {n}" if n > 1 else path_in.name[:40])
            try:
                image = decode_image(path_in)
            except (ImageDecodeError, OSError) as e:
                bar.write(f"skipping {path_in}: {e}", file=sys.stderr)
                summary.failed += 1
                bar.total -= expected[path_in]
                continue
            bar.total += tiles(path_in, (image.height, image.width)) - expected[path_in]
            bar.refresh()
            out = upscaler.upscale(image, steps=steps, sampler=args.sampler, eta=args.eta, seed=args.seed,
                                   ensemble=args.ensemble, on_tiles=bar.update)
            try:
                save_image(out, path_out, quality=args.quality)
            except OSError as e:
                bar.write(f"error: cannot write {path_out}: {e.strerror or e}", file=sys.stderr)
                summary.failed += 1
                continue
            summary.images += 1
            summary.output_pixels += out.width * out.height
            if not args.quiet:
                bar.write(f"{path_in} ({image.width}x{image.height}) -> {path_out} ({out.width}x{out.height}, "
                          f"model {chosen[path_in].id})")
    summary.seconds = time.perf_counter() - t0
    if not args.quiet:
        print(summary.line())
    return 1 if summary.failed else 0
