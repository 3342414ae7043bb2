"""What a checkpoint built on pretrained networks owes them: attribution and licence texts (its NOTICE)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from model.config import ModelConfig
from model.pretrained import PUBLISHED

LICENCE_DIR = Path(__file__).parent / "licences"
NOTICE = "NOTICE"


def builds_on(cfg: ModelConfig) -> list[dict[str, Any]]:
    """One entry per pretrained network in the model's encoder: what it is, where its weights come from, its
    licence, and which of its blocks it keeps where it is pruned. Empty for a model of our own networks only."""
    entries = []
    for n, kept in cfg.pretrained_blocks.items():
        pub, whole = PUBLISHED[n], PUBLISHED[n].network.published_blocks
        kept_text = [f"its first {kept} of {whole} blocks"] if kept < whole else []
        if width := cfg.pretrained_widths.get(n):
            kept_text.append(f"its blocks narrowed from {pub.network.published_width} to {width} channels")
        pruned = {"kept": "; ".join(kept_text)} if kept_text else {}
        entries.append({"network": pub.title, "paper": pub.paper, "weights": pub.source, "sha256": pub.sha256,
                        "licence": pub.licence, **pruned})
    return entries


@functools.cache
def licence_texts(name: str) -> tuple[tuple[str, str], ...]:
    """(file name, text) of each licence file that came with network `name`'s weights (read once: model cards
    are answered per request)."""
    return tuple((f, (LICENCE_DIR / f"{name}-{f}").read_text()) for f in PUBLISHED[name].licence_files)


def notice(cfg: ModelConfig) -> str:
    """The NOTICE of a checkpoint whose encoder is made of pretrained networks ('' if none): attribution and the
    full text of every licence they came with."""
    if not cfg.pretrained:
        return ""
    parts = ["This model's weights are derived from the following pretrained networks, used under their licences.\n"]
    for entry, name in zip(builds_on(cfg), cfg.pretrained, strict=True):
        kept = f"  kept: {entry['kept']}\n" if "kept" in entry else ""
        parts.append(f"{entry['network']}\n  paper: {entry['paper']}\n  weights: {entry['weights']}\n{kept}"
                     f"  sha256: {entry['sha256']}\n  licence: {entry['licence']}\n")
        for file, text in licence_texts(name):
            parts.append(f"----- {name}: {file} -----\n{text.rstrip()}\n")
    return "\n".join(parts)
