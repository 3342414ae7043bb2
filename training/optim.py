"""Optimisation helpers: the EMA of the trained weights and the step-decay learning rate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from training.config import TrainConfig


class EMA:
    """Exponential moving average of a module's parameters (kept in float32 on the same device)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, p in module.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into `module`."""
        saved = {k: p.detach().clone() for k, p in module.named_parameters()}
        with torch.no_grad():
            for k, p in module.named_parameters():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in module.named_parameters():
                    p.copy_(saved[k])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Step decay as in the original: lr * gamma ** (step // decay_every), from `decay_start` on, not below `min_lr`."""
    o = cfg.optim
    return max(o.min_lr, o.lr * o.gamma ** (max(0, step - o.decay_start) // o.decay_every))
