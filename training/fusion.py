"""Fit the fusion of several pretrained encoders: the per-channel weights of their x4 images (`mix`) that minimise
the squared error to HR on training patches, by least squares (the PSNR-optimal linear fusion)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from model.pretrained_encoder import PretrainedEncoder
from training.data import prepare_images, random_crops

log = logging.getLogger(__name__)


@torch.no_grad()
def fit_mix(encoder: PretrainedEncoder, train_dir: str | Path, cache_dir: str | Path, patches: int = 256,
            lr_patch: int = 48, seed: int = 0) -> torch.Tensor:
    """Least-squares mixing weights (members x 3) over `patches` random LR crops of the training images (border of
    8 output pixels left out); sets `encoder.mix` and returns it."""
    if len(encoder.names) < 2:
        raise ValueError("a fusion needs at least two networks")
    scale, n = encoder.scale, len(encoder.names)
    images = prepare_images(train_dir, cache_dir, scale, min_hr=lr_patch * scale)
    if not images:
        raise ValueError(f"{train_dir}: no usable training images")
    rng = np.random.default_rng(seed)
    gram = torch.zeros(3, n, n, dtype=torch.float64)
    rhs = torch.zeros(3, n, dtype=torch.float64)
    for hr_c, lr_c in random_crops(images, patches, lr_patch, scale, rng):
        lr_t = torch.from_numpy(np.array(lr_c)).permute(2, 0, 1)[None].float() / 255
        hr_t = torch.from_numpy(np.array(hr_c)).permute(2, 0, 1).double() / 255
        _, feats = encoder(lr_t * 2 - 1)
        outs = torch.stack([o[0].double() for o in encoder.member_images(feats)])  # members x 3 x H x W, in [0, 1]
        b = 8
        a = outs[..., b:-b, b:-b].flatten(2)  # members x 3 x P
        t = hr_t[..., b:-b, b:-b].flatten(1)  # 3 x P
        gram += torch.einsum("mcp,ncp->cmn", a, a)
        rhs += torch.einsum("mcp,cp->cm", a, t)
    mix = torch.linalg.solve(gram, rhs).T.float()  # members x 3
    encoder.mix.data.copy_(mix)
    log.info("fusion of %s: mix %s", "+".join(encoder.names), mix.tolist())
    return mix
