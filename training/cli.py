"""Training subcommands for the `samdiffsr` command: masks, eval, train, fuse and narrow."""

from __future__ import annotations

import argparse

from training import cli_eval, cli_fuse, cli_masks, cli_narrow, cli_train


def register(sub: argparse._SubParsersAction) -> None:
    for module in (cli_masks, cli_eval, cli_train, cli_fuse, cli_narrow):
        module.register(sub)
