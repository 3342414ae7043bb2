"""Model subcommands: verify-reference, import-upstream, export, upscale."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

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
