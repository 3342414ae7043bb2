"""The SRDiff-shaped network: a low-resolution encoder and a conditional U-Net denoiser.

Module and parameter names follow the original code, so an original state dict loads unchanged
(see `model.upstream`). One deliberate change of structure: the U-Net's projection of the encoder
features (`cond_proj`) is exposed as its own method, because it depends only on the LR image and
must be computed once per image rather than once per diffusion step.

Two options of ours (`ModelConfig.encoder`, `ModelConfig.denoiser_space`) trade the original's shapes
for cheaper ones: an encoder of residual local feature blocks, and a U-Net that works on the
pixel-unshuffled residual at LR resolution. The interfaces stay the same.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.pretrained_encoder import PretrainedEncoder

# ----------------------------------------------------------------------------- RRDB encoder


def block_features(feats: list[Tensor]) -> Tensor:
    """What conditions the U-Net for our own encoders (RRDB, RLFB): their block features 2, 5, 8, ... concatenated,
    as in the original."""
    return torch.cat(feats[2::3], 1)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convolutions with a scaled residual (ESRGAN)."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.RDB1 = ResidualDenseBlock(nf, gc)
        self.RDB2 = ResidualDenseBlock(nf, gc)
        self.RDB3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: Tensor) -> Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """The LR encoder. Takes LR in [-1, 1]; returns its xscale image in [-1, 1] and its features."""

    def __init__(self, nf: int, nb: int, gc: int, scale: int) -> None:
        super().__init__()
        self.num_up = int(math.log2(scale))
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        for i in range(1, self.num_up + 1):
            self.add_module(f"upconv{i}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        feas: list[Tensor] = []
        x = (x + 1) / 2
        fea_first = fea = self.conv_first(x)
        for block in self.RRDB_trunk:
            fea = block(fea)
            feas.append(fea)
        fea = fea_first + self.trunk_conv(fea)
        feas.append(fea)
        for i in range(1, self.num_up + 1):
            upconv = getattr(self, f"upconv{i}")
            fea = self.lrelu(upconv(F.interpolate(fea, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.lrelu(self.HRconv(fea)))
        return out.clamp(0, 1) * 2 - 1, feas

    def condition(self, sr: Tensor, feats: list[Tensor]) -> Tensor:
        return block_features(feats)


class ESA(nn.Module):
    """Enhanced spatial attention (RFANet, as RLFN uses it): a gate from a reduced, strided, max-pooled view.
    Padded so that any input size works (tiles and training patches can be small)."""

    def __init__(self, nf: int, f: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv2 = nn.Conv2d(f, f, 3, 2, 1)
        self.conv3 = nn.Conv2d(f, f, 3, 1, 1)
        self.conv4 = nn.Conv2d(f, nf, 1)

    def forward(self, x: Tensor) -> Tensor:
        c1 = self.conv1(x)
        c = self.conv3(F.max_pool2d(self.conv2(c1), 7, 3, 3))
        c = F.interpolate(c, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.conv4(c + self.conv_f(c1)))


class RLFB(nn.Module):
    """Residual local feature block (RLFN): three 3x3 convolutions with a residual, a 1x1, spatial attention."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.c1_r = nn.Conv2d(nf, nf, 3, 1, 1)
        self.c2_r = nn.Conv2d(nf, nf, 3, 1, 1)
        self.c3_r = nn.Conv2d(nf, nf, 3, 1, 1)
        self.c5 = nn.Conv2d(nf, nf, 1)
        self.esa = ESA(nf)
        self.act = nn.LeakyReLU(negative_slope=0.05)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.c3_r(self.act(self.c2_r(self.act(self.c1_r(x))))))
        return self.esa(self.c5(out + x))


class RLFBNet(nn.Module):
    """The efficient encoder: RLFB blocks at LR resolution and a pixel-shuffle upsampler. Same contract as
    `RRDBNet`: LR in [-1, 1] -> (its x`scale` image in [-1, 1], the blocks' features and the trunk's output)."""

    def __init__(self, nf: int, nb: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.blocks = nn.ModuleList(RLFB(nf) for _ in range(nb))
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up = nn.Conv2d(nf, 3 * scale * scale, 3, 1, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        feas: list[Tensor] = []
        fea_first = fea = self.conv_first((x + 1) / 2)
        for block in self.blocks:
            fea = block(fea)
            feas.append(fea)
        fea = fea_first + self.conv_body(fea)
        feas.append(fea)
        out = F.pixel_shuffle(self.conv_up(fea), self.scale)
        return out.clamp(0, 1) * 2 - 1, feas

    def condition(self, sr: Tensor, feats: list[Tensor]) -> Tensor:
        return block_features(feats)


def build_encoder(cfg: ModelConfig) -> nn.Module:
    if cfg.pretrained:
        return PretrainedEncoder(cfg.pretrained, cfg.scale, cfg.pretrained_blocks, cfg.pretrained_widths)
    if cfg.encoder == "rlfb":
        return RLFBNet(cfg.rrdb_num_feat, cfg.rrdb_num_block, cfg.scale)
    return RRDBNet(cfg.rrdb_num_feat, cfg.rrdb_num_block, cfg.rrdb_growth, cfg.scale)


# ----------------------------------------------------------------------------- U-Net denoiser


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        emb = t.float()[:, None] * freqs[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class Block(nn.Module):
    """Reflection-padded 3x3 convolution and Mish; no normalisation."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim_out, 3), nn.Mish())

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block(dim, dim_out)
        self.block2 = Block(dim_out, dim_out)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, time_emb: Tensor) -> Tensor:
        h = self.block1(x) + self.mlp(time_emb)[:, :, None, None]
        return self.block2(h) + self.res_conv(x)


class Downsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.ConvTranspose2d(dim, dim, 4, 2, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Unet(nn.Module):
    """Predicts the noise (or v, or x0: `ModelConfig.prediction`) of a residual x_t, given the timestep
    and the projected LR condition.

    With `unshuffle` > 1 it works at 1/unshuffle of the residual's resolution: x_t is pixel-unshuffled on the
    way in, the prediction shuffled back on the way out, and the condition projected without upsampling."""

    def __init__(self, dim: int, dim_mults: tuple[int, ...], cond_channels: int, scale: int,
                 unshuffle: int = 1) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        channels = 3 * unshuffle * unshuffle
        dims = [channels, *(dim * m for m in dim_mults)]
        in_out = list(pairwise(dims))
        n = len(in_out)

        up = scale // unshuffle
        self.cond_proj = nn.ConvTranspose2d(cond_channels, dim, up * 2, up, up // 2) if up > 1 else \
            nn.Conv2d(cond_channels, dim, 3, 1, 1)
        self.time_pos_emb = SinusoidalPosEmb(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))

        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            self.downs.append(nn.ModuleList([
                ResnetBlock(d_in, d_out, dim),
                ResnetBlock(d_out, d_out, dim),
                Downsample(d_out) if i < n - 1 else nn.Identity(),
            ]))
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, dim)
        self.mid_block2 = ResnetBlock(mid, mid, dim)
        self.ups = nn.ModuleList()
        for d_in, d_out in reversed(in_out[1:]):
            self.ups.append(nn.ModuleList([
                ResnetBlock(d_out * 2, d_in, dim),
                ResnetBlock(d_in, d_in, dim),
                Upsample(d_in),
            ]))
        self.final_conv = nn.Sequential(Block(dim, dim), nn.Conv2d(dim, channels, 1))

    def project_cond(self, cond: Tensor) -> Tensor:
        """Project the encoder's conditioning features (`encoder.condition`) to the U-Net's input size. Depends
        on the LR image only."""
        return self.cond_proj(cond)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """`cond` is the output of `project_cond`; `t` holds one timestep per sample."""
        temb = self.mlp(self.time_pos_emb(t).to(x.dtype))  # a no-op but for a network whose weights are bf16
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        skips = []
        for i, (resnet, resnet2, downsample) in enumerate(self.downs):
            x = resnet2(resnet(x, temb), temb)
            if i == 0:
                x = x + cond
            skips.append(x)
            x = downsample(x)
        x = self.mid_block2(self.mid_block1(x, temb), temb)
        for resnet, resnet2, upsample in self.ups:
            x = torch.cat((x, skips.pop()), dim=1)
            x = upsample(resnet2(resnet(x, temb), temb))
        x = self.final_conv(x)
        return F.pixel_shuffle(x, self.unshuffle) if self.unshuffle > 1 else x


# ----------------------------------------------------------------------------- the whole network


class SRDiffNet(nn.Module):
    """Encoder + U-Net denoiser, with the original code's parameter names (`rrdb` whatever the encoder's blocks)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rrdb = build_encoder(cfg)
        self.denoise_fn = Unet(cfg.hidden_size, cfg.dim_mults, cfg.cond_channels, cfg.scale, cfg.unshuffle)

    def encode(self, img_lr: Tensor) -> tuple[Tensor, Tensor]:
        """LR image in [-1, 1] -> (the U-Net condition, `cfg.cond_shape`; the encoder's own x4 image in [-1, 1]).

        Computed once per image; the x4 image is the fidelity answer (`steps=0`) and, for models with
        `residual_base="rrdb"`, the base the diffusion residual is added to."""
        sr, feats = self.rrdb(img_lr)
        return self.denoise_fn.project_cond(self.rrdb.condition(sr, feats)), sr

    def encode_image(self, img_lr: Tensor) -> Tensor:
        """The encoder's x4 image alone: all that `steps=0` needs (the U-Net's condition is not made)."""
        if isinstance(self.rrdb, PretrainedEncoder):
            return self.rrdb.image(img_lr)
        return self.rrdb(img_lr)[0]

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.denoise_fn(x, t, cond)


class Encoder(nn.Module):
    """Exportable view: LR image -> (projected condition, x4 image)."""

    def __init__(self, net: SRDiffNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, img_lr: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.encode(img_lr)


class Denoiser(nn.Module):
    """Exportable view: one denoiser step (x_t, t, condition) -> the prediction (noise, v or x0)."""

    def __init__(self, net: SRDiffNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.net.denoise(x, t, cond)
