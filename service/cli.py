"""Subcommands of this package for the `samdiffsr` command."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands. Heavy imports go inside the handlers."""
