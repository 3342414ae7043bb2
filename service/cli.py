"""Subcommands of this package for the `samdiffsr` command."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands. Heavy imports go inside the handlers."""
    p = sub.add_parser("serve", help="serve the models over HTTP (POST /v1/upscale)",
                       description="Serve checkpoints over HTTP: every checkpoint in --models-dir (default "
                                   "checkpoints/), or the --model ones, or one --checkpoint. Every setting can also "
                                   "be given as an environment variable SAMDIFFSR_<NAME> (e.g. "
                                   "SAMDIFFSR_MAX_TILES_PER_BATCH); command-line options win.")
    p.add_argument("--model", action="append", metavar="ID=DIR",
                   help="serve this checkpoint as model ID (repeatable; SAMDIFFSR_MODELS=ID=DIR,ID=DIR)")
    p.add_argument("--checkpoint", help="serve only this checkpoint directory or original .ckpt, its id the "
                   "directory's name (SAMDIFFSR_CHECKPOINT)")
    p.add_argument("--models-dir", help="serve every checkpoint directory in it (SAMDIFFSR_MODELS_DIR, default "
                   "checkpoints)")
    p.add_argument("--default-model", help="model of requests that name none: an id or auto "
                   "(SAMDIFFSR_DEFAULT_MODEL)")
    p.add_argument("--host", help="address to listen on (SAMDIFFSR_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (SAMDIFFSR_PORT, default 8000)")
    p.add_argument("--backend", choices=["torch", "torchscript", "onnx"], help="SAMDIFFSR_BACKEND")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (SAMDIFFSR_DEVICE)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import sys

    from pydantic import ValidationError

    from service.server import serve
    from service.settings import describe_error, load_settings

    try:
        settings = load_settings(checkpoint=args.checkpoint, host=args.host, port=args.port,
                                 backend=args.backend, device=args.device, models_dir=args.models_dir,
                                 default_model=args.default_model,
                                 models=",".join(args.model) if args.model else None)
    except ValidationError as e:
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2
    return serve(settings)
