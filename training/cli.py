"""Training subcommands for the `samdiffsr` command: masks, eval (cli_masks / cli_eval) and train (cli_train)."""

from __future__ import annotations

import argparse
import importlib

# Each module defines `register(subparsers)`; a module that is not written yet is skipped.
_MODULES = ("training.cli_masks", "training.cli_eval", "training.cli_train")


def register(sub: argparse._SubParsersAction) -> None:
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
