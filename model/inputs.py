"""Model inputs: an RGB image in [0, 1] -> the encoder's LR input and bicubic up(LR), as the model was trained."""

from __future__ import annotations

from bicubic_pytorch import core as bicubic
from torch import Tensor

from model.config import ModelConfig


def uses_up(cfg: ModelConfig) -> bool:
    """Whether sampling needs bicubic up(LR): only for models whose residual base is bicubic."""
    return cfg.residual_base == "bicubic"


def lr_inputs(rgb01: Tensor, cfg: ModelConfig, with_up: bool = True) -> tuple[Tensor, Tensor | None]:
    """(B, 3, h, w) RGB in [0, 1] -> (img_lr, img_lr_up), both in [-1, 1].

    up(LR) is MATLAB-style bicubic on LR * 255 / `cfg.lr_up_divisor` (256 for original checkpoints);
    `with_up=False` skips it (None), for callers that do not use it.
    """
    img_lr = rgb01 * 2 - 1
    if not with_up:
        return img_lr, None
    up = bicubic.imresize(rgb01 * (255.0 / cfg.lr_up_divisor), scale=cfg.scale)
    return img_lr, up * 2 - 1
