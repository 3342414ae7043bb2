"""Training subcommands for the `samdiffsr` command: masks, eval and train."""

from __future__ import annotations

import argparse

from training import cli_eval, cli_masks, cli_train


def register(sub: argparse._SubParsersAction) -> None:
    for module in (cli_masks, cli_eval, cli_train):
        module.register(sub)
