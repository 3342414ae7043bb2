"""Subcommands of this package for the `samdiffsr` command."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands. Heavy imports go inside the handlers."""
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (POST /v1/upscale)",
                       description="Serve a checkpoint over HTTP. Every setting can also be given as an "
                                   "environment variable SAMDIFFSR_<NAME> (e.g. SAMDIFFSR_MAX_TILES_PER_BATCH); "
                                   "command-line options win.")
    p.add_argument("--checkpoint", help="checkpoint directory or original .ckpt (SAMDIFFSR_CHECKPOINT)")
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
                                 backend=args.backend, device=args.device)
    except ValidationError as e:
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2
    return serve(settings)
