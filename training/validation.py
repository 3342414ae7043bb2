"""Validation during training: PSNR-Y of the model on fixed crops, through the one inference path."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from model.checkpoint import CheckpointInfo
from model.network import SRDiffNet
from model.runtime import TorchRuntime
from model.upscale import Upscaler
from training.evaluate import bicubic_upscale
from training.metrics import psnr_y, quantize8
from training.objectives import Stage


def bicubic_psnr(pairs: list[tuple[str, Tensor, Tensor]], scale: int) -> float:
    """Mean PSNR-Y of MATLAB-bicubic upscaling over the validation crops."""
    return float(np.mean([psnr_y(quantize8(bicubic_upscale(lr01.permute(1, 2, 0).numpy(), scale)),
                                 hr01.permute(1, 2, 0).numpy(), scale) for _, hr01, lr01 in pairs]))


@torch.no_grad()
def validate(net: SRDiffNet, stage: Stage, pairs: list[tuple[str, Tensor, Tensor]], steps: int,
             device: torch.device) -> float:
    """Mean PSNR-Y over validation crops, each upscaled whole by `model.upscale.Upscaler`: the encoder's own
    output (stage 1, or `steps=0`), else DDIM (eta=0) with `steps` steps."""
    runtime = TorchRuntime(net, CheckpointInfo(config=net.cfg), device, channels_last=False)  # the training layout
    upscaler = Upscaler(runtime, tile=0)
    scores = []
    for _, hr01, lr01 in pairs:
        sr01 = upscaler.upscale_rgb(lr01.permute(1, 2, 0).numpy(), 0 if stage == "rrdb" else steps, "ddim")
        scores.append(psnr_y(quantize8(sr01), hr01.permute(1, 2, 0).numpy(), net.cfg.scale))
    net.train()
    return float(np.mean(scores))
