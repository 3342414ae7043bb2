"""`samdiffsr masks generate|embed|show`: segmentation masks -> SPE maps for SAM-DiffSR training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("masks", help="segment training images (SAM or a classical stand-in) and build SPE maps")
    msub = p.add_subparsers(dest="masks_command", required=True, metavar="SUBCOMMAND")

    g = msub.add_parser("generate", help="write <stem>.json (SAM's RLE format) for every image of a folder",
                        description="Segment every image of IMAGES into OUT/<stem>.json, in the format of "
                        "SAM's scripts/amg.py --convert-to-rle. Resumable: existing files are skipped.")
    g.add_argument("images", type=Path, help="folder of HR images")
    g.add_argument("out", type=Path, help="output folder for the mask JSON files")
    g.add_argument("--backend", choices=("sam", "felzenszwalb", "slic"), default="sam",
                   help="sam (the paper's; needs SAM weights) or a scikit-image stand-in (default: sam)")
    g.add_argument("--overwrite", action="store_true", help="redo images whose JSON already exists")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = g.add_argument_group("SAM")
    s.add_argument("--model-type", default="vit_h", help="vit_h (paper), vit_l or vit_b (default: vit_h)")
    s.add_argument("--checkpoint", type=Path, help="official SAM weights, e.g. sam_vit_h_4b8939.pth")
    s.add_argument("--device", default="cpu", help="torch device for SAM (default: cpu)")
    s.add_argument("--points-per-side", type=int, default=32)
    s.add_argument("--points-per-batch", type=int, default=64)
    s.add_argument("--pred-iou-thresh", type=float, default=0.88)
    s.add_argument("--stability-score-thresh", type=float, default=0.95)
    s.add_argument("--box-nms-thresh", type=float, default=0.7)
    s.add_argument("--crop-n-layers", type=int, default=0)
    c = g.add_argument_group("classical stand-in (felzenszwalb / slic)")
    c.add_argument("--scale", type=float, default=400.0, help="felzenszwalb scale (default: 400)")
    c.add_argument("--sigma", type=float, default=0.8, help="pre-smoothing sigma (default: 0.8)")
    c.add_argument("--min-size", type=int, default=200, help="felzenszwalb minimum segment size (default: 200)")
    c.add_argument("--n-segments", type=int, default=100, help="slic segment count (default: 100)")
    c.add_argument("--compactness", type=float, default=10.0, help="slic compactness (default: 10)")
    c.add_argument("--min-area-frac", type=float, default=0.0005,
                   help="drop segments smaller than this fraction of the image (default: 0.0005)")
    g.set_defaults(func=cmd_generate)

    e = msub.add_parser("embed", help="write the SPE map <stem>.npy (float32, image size) of every image",
                        description="Merge each image's masks into one structural position encoding map. "
                        "An image whose mask file holds no masks gets an all-zero map.")
    e.add_argument("images", type=Path, help="folder of HR images (gives the names and sizes)")
    e.add_argument("masks", type=Path, help="folder of mask JSON files from `masks generate`")
    e.add_argument("out", type=Path, help="output folder for the .npy maps")
    e.add_argument("--variant", choices=("rope", "sincos", "linear", "cosine"), default="rope",
                   help="position encoding (default: rope, the paper's)")
    e.add_argument("--overwrite", action="store_true", help="redo images whose .npy already exists")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_embed)

    v = msub.add_parser("show", help="PNG with the image, its masks and its SPE map side by side")
    v.add_argument("image", type=Path, help="an image file")
    v.add_argument("masks", type=Path, help="its mask JSON file, or the folder holding <stem>.json")
    v.add_argument("out", type=Path, help="output PNG")
    v.add_argument("--spe", type=Path, help="show this .npy map instead of computing it")
    v.add_argument("--variant", choices=("rope", "sincos", "linear", "cosine"), default="rope")
    v.add_argument("--max-side", type=int, default=512, help="panel size in pixels (default: 512)")
    v.set_defaults(func=cmd_show)


def _backend(args: argparse.Namespace):
    from training.masks import ClassicalBackend, ClassicalConfig, SamBackend, SamConfig

    if args.backend == "sam":
        return SamBackend.from_checkpoint(SamConfig(
            model_type=args.model_type, checkpoint=args.checkpoint, device=args.device,
            points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
            box_nms_thresh=args.box_nms_thresh, crop_n_layers=args.crop_n_layers))
    return ClassicalBackend(ClassicalConfig(
        method=args.backend, scale=args.scale, sigma=args.sigma, min_size=args.min_size,
        n_segments=args.n_segments, compactness=args.compactness, min_area_frac=args.min_area_frac))


def cmd_generate(args: argparse.Namespace) -> int:
    from training.masks import SamUnavailableError, generate_masks

    try:
        backend = _backend(args)
        report = generate_masks(args.images, args.out, backend, overwrite=args.overwrite,
                                progress=not args.no_progress)
    except (SamUnavailableError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.backend == "sam":
        from training import sam_compat

        print(f"segment-anything ran with torchvision helpers from: {sam_compat.torchvision_source}",
              file=sys.stderr)
    else:
        print(f"note: {args.backend} segments are a classical stand-in for SAM masks, not SAM's", file=sys.stderr)
    print(report.summary(f"mask files written to {args.out}"))
    return 1 if report.failed else 0


def cmd_embed(args: argparse.Namespace) -> int:
    from training.masks import embed_masks

    try:
        report = embed_masks(args.images, args.masks, args.out, args.variant, overwrite=args.overwrite,
                             progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary(f"{args.variant} SPE maps written to {args.out}"))
    return 1 if report.failed else 0


def cmd_show(args: argparse.Namespace) -> int:
    from model.imaging import ImageDecodeError
    from training.masks import MaskFileError
    from training.show import show

    masks = args.masks / f"{args.image.stem}.json" if args.masks.is_dir() else args.masks
    try:
        out = show(args.image, masks, args.out, variant=args.variant, spe_npy=args.spe, max_side=args.max_side)
    except (FileNotFoundError, MaskFileError, ImageDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
