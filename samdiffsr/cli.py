"""The `samdiffsr` command. Each package registers its own subcommands (`register(subparsers)`)."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from importlib import metadata

DISTRIBUTION = "sam-diffsr-serve"


def build_parser() -> argparse.ArgumentParser:
    from model import cli as model_cli
    from service import cli as service_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(prog="samdiffsr", description="SAM-DiffSR x4 diffusion super-resolution")
    parser.add_argument("--version", action="version", version=f"samdiffsr {version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (model_cli, training_cli, service_cli):
        module.register(sub)
    return parser


def version() -> str:
    """The installed package's version ("unknown" where it is not installed, e.g. run from a bare checkout)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def run() -> None:
    """The console script and `python -m samdiffsr`: `main`, then the process ends."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    # Frozen objects are left out of the collection at interpreter exit, which would otherwise walk every object
    # torch made only to free memory the exit gives back anyway. Here, not in `main`: `main` also runs in-process
    # (tests), where the freeze would outlive the call.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
