"""`samdiffsr fuse`: a checkpoint whose encoder is several pretrained networks, their mix fitted by least squares."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuse", help="fuse pretrained networks (rfdn+rlfn...) with least-squares mixing weights",
                       description="Write a checkpoint whose encoder fuses pretrained networks: their x4 images "
                       "weighted per colour channel by the least-squares fit to HR on random training patches "
                       "(training.fusion), served at steps=0, with a NOTICE of their licences.")
    p.add_argument("encoder", help="two or more of rfdn, rlfn, safmn joined by '+' ('rfdn:3': its first 3 blocks)")
    p.add_argument("output", help="output checkpoint directory")
    p.add_argument("--weights", type=Path, default=Path("../shared/pretrained"),
                   help="folder with one sub-folder per network (default: %(default)s)")
    p.add_argument("--train-dir", type=Path, default=Path("../shared/data/corpus-hr/train"),
                   help="HR training photos (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/cache"), help="(default: %(default)s)")
    p.add_argument("--patches", type=int, default=256, help="48-px LR patches to fit on (default: %(default)s)")
    p.add_argument("--name", help="model name recorded in the checkpoint (default: samdiffsr-ENCODER)")
    p.set_defaults(func=cmd_fuse)


def cmd_fuse(args: argparse.Namespace) -> int:
    from model.published import pretrained_net, refiner_config, save_untrained
    from training.fusion import fit_mix

    try:
        cfg = refiner_config(args.encoder)
        if len(cfg.pretrained) < 2:
            raise ValueError(f"{args.encoder!r}: a fusion needs two or more pretrained networks")
        net = pretrained_net(cfg, {n: args.weights / n for n in cfg.pretrained})
        mix = fit_mix(net.rrdb, args.train_dir, args.cache_dir, args.patches)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    card = {"summary": f"{' + '.join(n.upper() for n in cfg.pretrained)} (published weights), fused by "
                       "least squares, at steps=0"}
    out = save_untrained(args.output, net, args.name or f"samdiffsr-{args.encoder}", card,
                         {"source": "samdiffsr fuse", "patches": args.patches, "mix": mix.tolist()})
    print(f"fused {args.encoder} -> {out}; mix (member x RGB) {[[round(v, 4) for v in r] for r in mix.tolist()]}")
    return 0
