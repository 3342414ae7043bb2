"""Load any checkpoint: a directory of our format, or an original SAM-DiffSR/SRDiff `.ckpt` (imported on the fly)."""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import CheckpointInfo, load_checkpoint_dir
from model.network import SRDiffNet
from model.upstream import import_upstream_checkpoint


def load_any(path: str | Path, device: str | torch.device = "cpu") -> tuple[SRDiffNet, CheckpointInfo]:
    """The network (in eval mode, on `device`) and its description, from either kind of checkpoint."""
    p = Path(path)
    if p.is_file():
        net, info = import_upstream_checkpoint(p)
        return net.to(device).eval(), info
    return load_checkpoint_dir(p, device)
