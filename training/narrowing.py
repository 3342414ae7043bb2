"""Narrow a pretrained member's blocks (RLFN's 3x3 convolutions, 48 -> W channels) by least-squares reconstruction.

In each block, the W outputs of the first convolution that matter most to the second (their mean square times the
second's weights on them) are kept, and the second convolution is refitted on them to give the whole network's
output before its activation; then the same for the second and the third. Every fit is on random LR patches of the
training photos and aims at the whole network's own output for the same patch, so errors do not pile up from block
to block. The narrowed network is a start for distillation, not a finished one (docs/model-card.md).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.network import SRDiffNet
from model.pretrained import RLFN
from model.pretrained_encoder import encoder_name, member_blocks, member_widths
from training.data import prepare_images, random_crops
from training.fusion import fit_mix

log = logging.getLogger(__name__)


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.05)


def lr_batches(train_dir: str | Path, cache_dir: str | Path, batches: int, batch: int = 16, size: int = 48,
               seed: int = 0) -> list[Tensor]:
    """`batches` batches of random `size`-px LR crops of the training photos, RGB in [0, 255]."""
    images = prepare_images(train_dir, cache_dir, 4, min_hr=size * 4)
    if not images:
        raise ValueError(f"{train_dir}: no usable training images")
    crops = np.stack([lr for _, lr in random_crops(images, batches * batch, size, 4, np.random.default_rng(seed))])
    return list(torch.from_numpy(crops).permute(0, 3, 1, 2).float().split(batch))


@torch.no_grad()
def fit_conv(conv: nn.Conv2d, inputs: list[Tensor], targets: list[Tensor], ridge: float = 1e-6) -> None:
    """Set a stride-1 'same' convolution's weights and bias to the least-squares fit of `targets` from `inputs`."""
    k = conv.kernel_size[0]
    d = conv.in_channels * k * k + 1
    gram = torch.zeros(d, d, dtype=torch.float64)
    rhs = torch.zeros(d, conv.out_channels, dtype=torch.float64)
    for x, y in zip(inputs, targets, strict=True):
        cols = F.unfold(x, k, padding=k // 2).transpose(1, 2).reshape(-1, d - 1).double()
        cols = torch.cat([cols, torch.ones(len(cols), 1, dtype=cols.dtype)], 1)
        gram += cols.T @ cols
        rhs += cols.T @ y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels).double()
    eye = torch.eye(d, dtype=gram.dtype)
    sol = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * eye, rhs)
    conv.weight.copy_(sol[:-1].T.reshape(conv.weight.shape).to(conv.weight))
    conv.bias.copy_(sol[-1].to(conv.bias))


def _kept(acts: list[Tensor], reader: nn.Conv2d, width: int) -> Tensor:
    """The `width` channels of `acts` that matter most to the convolution that reads them, in order."""
    energy = sum((a.double() ** 2).mean((0, 2, 3)) for a in acts)
    importance = energy * reader.weight.double().pow(2).sum((0, 2, 3))
    return importance.argsort(descending=True)[:width].sort().values


@torch.no_grad()
def narrow_rlfn(whole: RLFN, width: int, batches: list[Tensor]) -> RLFN:
    """A copy of `whole` whose blocks convolve `width` channels, fitted on `batches` (LR in [0, 255])."""
    if not 1 <= width < whole.block_1.c1_r.out_channels:
        raise ValueError(f"width {width}: narrower than the network's {whole.block_1.c1_r.out_channels} and >= 1")
    narrow = RLFN(nf=whole.channels, mid=width, blocks=whole.blocks).to(whole.conv_1.weight)
    same = {k: v for k, v in whole.state_dict().items() if not any(f".c{i}_r." in k for i in (1, 2, 3))}
    missing, _ = narrow.load_state_dict(same, strict=False)
    assert all(any(f".c{i}_r." in k for i in (1, 2, 3)) for k in missing)
    x_whole = [whole.conv_1(b) for b in batches]
    x_narrow = [narrow.conv_1(b) for b in batches]
    for i in range(1, whole.blocks + 1):
        w, n = getattr(whole, f"block_{i}"), getattr(narrow, f"block_{i}")
        a1 = [_lrelu(w.c1_r(x)) for x in x_whole]
        keep = _kept(a1, w.c2_r, width)
        n.c1_r.weight.copy_(w.c1_r.weight[keep])
        n.c1_r.bias.copy_(w.c1_r.bias[keep])
        y2 = [w.c2_r(a) for a in a1]
        refit = nn.Conv2d(width, w.c2_r.out_channels, 3, 1, 1).to(w.c2_r.weight)
        b1 = [_lrelu(n.c1_r(x)) for x in x_narrow]
        fit_conv(refit, b1, y2)
        a2 = [_lrelu(y) for y in y2]
        keep = _kept(a2, w.c3_r, width)
        n.c2_r.weight.copy_(refit.weight[keep])
        n.c2_r.bias.copy_(refit.bias[keep])
        fit_conv(n.c3_r, [_lrelu(n.c2_r(b)) for b in b1], [w.c3_r(a) for a in a2])
        x_whole, x_narrow = [w(x) for x in x_whole], [n(x) for x in x_narrow]
        err = sum(F.mse_loss(a, b).item() for a, b in zip(x_narrow, x_whole, strict=True)) / len(batches)
        log.info("block %d narrowed to %d channels: its output's mean squared error %.3g", i, width, err)
    return narrow.eval()


def narrow_member(net: SRDiffNet, name: str, width: int, train_dir: str | Path, cache_dir: str | Path,
                  patches: int = 400, seed: int = 0) -> SRDiffNet:
    """`net` with its pretrained member `name` narrowed to `width` (in place; returned): fitted on `patches`
    48-px LR patches, the fusion's mix then refitted by least squares (`training.fusion.fit_mix`)."""
    blocks, widths = member_blocks(net.cfg.encoder), member_widths(net.cfg.encoder)
    if name not in blocks:
        raise ValueError(f"{name!r} is not a member of the encoder {net.cfg.encoder!r}")
    if name != "rlfn":
        raise ValueError(f"{name}: only rlfn's blocks can be narrowed")
    if name in widths:
        raise ValueError(f"{name} is narrowed already ({net.cfg.encoder!r})")
    encoder = net.rrdb
    encoder.nets[name] = narrow_rlfn(encoder.nets[name], width, lr_batches(train_dir, cache_dir, -(-patches // 16),
                                                                         seed=seed))
    encoder.widths[name] = width
    net.cfg = dataclasses.replace(net.cfg, encoder=encoder_name(blocks, encoder.widths))
    if len(blocks) > 1:
        fit_mix(encoder, train_dir, cache_dir, seed=seed)
    return net
