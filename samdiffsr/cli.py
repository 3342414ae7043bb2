"""The `samdiffsr` command. Each package registers its own subcommands (`register(subparsers)`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from model import cli as model_cli
    from service import cli as service_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(prog="samdiffsr", description="SAM-DiffSR x4 diffusion super-resolution")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (model_cli, training_cli, service_cli):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
