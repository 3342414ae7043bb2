"""`samdiffsr train rrdb|diffusion`: the two training stages (see `training.train`), also in windows of a few
minutes with `--minutes`, `--resume-from` and `--export` (see `training.window`)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model: stage 1 (rrdb) then stage 2 (diffusion)",
                       description="Train SAM-DiffSR. Multi-GPU / multi-node: launch with torchrun, e.g. "
                       "`torchrun --nproc-per-node 8 -m samdiffsr train diffusion ...`.")
    tsub = p.add_subparsers(dest="train_command", required=True, metavar="STAGE")
    for stage, text in (("rrdb", "stage 1: pretrain the RRDB encoder with an L1 loss"),
                        ("diffusion", "stage 2: train the denoiser (RRDB frozen), noise modulated by SPE")):
        s = tsub.add_parser(stage, help=text, description=text)
        s.add_argument("--config", type=Path, help="YAML / TOML / JSON training config (see configs/)")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
        s.add_argument("--out", type=Path, required=True, help="run directory (checkpoint/, state/, logs)")
        s.add_argument("--steps", type=int, help="shortcut for --set run.steps=N")
        s.add_argument("--fresh", action="store_true",
                       help="ignore a training state in --out instead of resuming from it")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
        s.add_argument("--minutes", type=float, help="stop (with a checkpoint) after this many minutes: shortcut "
                       "for --set run.max_minutes=M")
        s.add_argument("--resume-from", type=Path, metavar="DIR",
                       help="a previous window's --export folder: its state goes into --out where --out is behind")
        s.add_argument("--export", type=Path, metavar="DIR",
                       help="after every checkpoint, copy the state, weights, metrics and this window's figures "
                       "(window.json) here (training.window)")
        s.add_argument("--export-max-state-mib", type=float, default=0, metavar="MIB",
                       help="export the exact state only up to this size (a transfer's limit); above it, the weights "
                       "alone (default 0: always)")
        if stage == "diffusion":
            s.add_argument("--rrdb", type=Path, help="stage-1 checkpoint (shortcut for diffusion.rrdb_checkpoint)")
            s.add_argument("--spe-dir", type=Path, help="SPE maps folder (shortcut for data.spe_dir)")
            s.add_argument("--no-structure", action="store_true",
                           help="plain SRDiff: no structure modulation (ablation)")
        s.set_defaults(func=cmd_train, stage=stage)


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import ConfigError, load_config
    from training.train import train
    from training.window import Exporter, import_state, saved_step

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    if args.minutes is not None:
        overrides.append(f"run.max_minutes={args.minutes}")
    if args.stage == "diffusion":
        if args.rrdb is not None:
            overrides.append(f"diffusion.rrdb_checkpoint={args.rrdb}")
        if args.spe_dir is not None:
            overrides.append(f"data.spe_dir={args.spe_dir}")
        if args.no_structure:
            overrides.append("diffusion.structure=false")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"samdiffsr train: {e}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if os.environ.get("RANK", "0") == "0":
        handlers.append(logging.FileHandler(args.out / "train.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    exporter = None
    try:
        if args.resume_from is not None:
            import_state(args.resume_from, args.out)
        if args.export is not None:
            exporter = Exporter(args.export, max(saved_step(args.out / "state"), 0), cfg.run.device,
                                args.export_max_state_mib)
        ckpt = train(cfg, args.stage, args.out, resume=not args.fresh, progress=not args.no_progress,
                     on_save=exporter)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"samdiffsr train: {e}") from None
    finally:
        if exporter is not None:
            exporter.close()
    logging.getLogger("training").info("checkpoint: %s", ckpt)
    return 0
