"""`samdiffsr narrow`: a checkpoint with one pretrained member's blocks narrowed (`training.narrowing`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("narrow", help="narrow a pretrained member's blocks (rlfn: 48 -> W channels) by least squares",
                       description="Write a copy of a checkpoint whose pretrained member (rlfn) convolves fewer "
                       "channels in its blocks: the channels that matter most are kept and the next convolution "
                       "refitted by least squares to the whole network's output, on random LR patches of the "
                       "training photos; a fusion's mix is then refitted. A start for distillation "
                       "(docs/model-card.md).")
    p.add_argument("checkpoint", help="checkpoint directory whose encoder has the member whole")
    p.add_argument("output", help="output checkpoint directory")
    p.add_argument("--member", default="rlfn", help="the network to narrow (default: %(default)s)")
    p.add_argument("--width", type=int, required=True, help="the channels its blocks keep (RLFN: of 48)")
    p.add_argument("--train-dir", type=Path, default=Path("../shared/data/corpus-hr/train"),
                   help="HR training photos (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/cache"), help="(default: %(default)s)")
    p.add_argument("--patches", type=int, default=400, help="48-px LR patches to fit on (default: %(default)s)")
    p.set_defaults(func=cmd_narrow)


def cmd_narrow(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError, save_checkpoint
    from model.loading import load_any
    from training.narrowing import narrow_member

    if Path(args.output).resolve() == Path(args.checkpoint).resolve():
        print("error: write the narrowed checkpoint to another directory", file=sys.stderr)
        return 2
    try:
        net, info = load_any(args.checkpoint)
        narrow_member(net, args.member, args.width, args.train_dir, args.cache_dir, args.patches)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info.config, info.card = net.cfg, {}  # the whole model's figures are not the narrowed one's
    info.provenance = {**info.provenance, "narrowed": f"{args.member} to {args.width} channels from "
                       f"{args.checkpoint} ({args.patches} patches)"}
    out = save_checkpoint(args.output, net, info)
    mix = getattr(net.rrdb, "mix", None)
    mixed = f"; mix (member x RGB) {[[round(v, 4) for v in r] for r in mix.tolist()]}" if mix is not None else ""
    print(f"narrowed {args.member} of {args.checkpoint} to {args.width} channels -> {out} "
          f"({net.cfg.encoder}){mixed}")
    return 0
