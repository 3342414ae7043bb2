"""Pretrained x4 networks of the efficient-SR field as LR encoders: RFDN, RLFN and SAFMN.

Written from the architectures' published descriptions (RFDN: Liu et al., ECCV Workshops 2020; RLFN: Kong et al.,
CVPR Workshops 2022; SAFMN: Sun et al., ICCV 2023). Module names follow the published state dicts, so their weights
load strictly, key for key (`load_published`). Each network works in its own input range (RFDN and RLFN: [0, 255];
SAFMN: [0, 1]); `model.pretrained_encoder.PretrainedEncoder` wraps one or several of them in our encoder contract.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Where no gradient is recorded (serving), the activations and sums below overwrite a tensor just made instead
# of allocating another as large: about a tenth of the networks' time in fp32 on a CPU.


def _lrelu(fresh: Tensor) -> Tensor:
    """LeakyReLU(0.05) of a tensor nothing else holds."""
    return F.leaky_relu(fresh, 0.05, inplace=not torch.is_grad_enabled())


def _plus(fresh: Tensor, other: Tensor) -> Tensor:
    """`fresh + other`, into `fresh` (a tensor nothing else holds) where no gradient is recorded."""
    return fresh + other if torch.is_grad_enabled() else fresh.add_(other)


class ESA(nn.Module):
    """Enhanced spatial attention: a gate computed on a strided, max-pooled view of the features.

    `full` is RFDN's variant (three 3x3 convolutions on the pooled view), else RLFN's light one (one). As published:
    the strided convolution and the pooling are unpadded, so inputs need at least 15 pixels a side."""

    def __init__(self, nf: int, f: int, full: bool) -> None:
        super().__init__()
        self.full = full
        self.conv1 = nn.Conv2d(nf, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv2 = nn.Conv2d(f, f, 3, 2, 0)
        self.conv3 = nn.Conv2d(f, f, 3, 1, 1)
        if full:
            self.conv_max = nn.Conv2d(f, f, 3, 1, 1)
            self.conv3_ = nn.Conv2d(f, f, 3, 1, 1)
        self.conv4 = nn.Conv2d(f, nf, 1)

    def forward(self, x: Tensor) -> Tensor:
        c1 = self.conv1(x)
        v = F.max_pool2d(self.conv2(c1), kernel_size=7, stride=3)
        c3 = self.conv3_(F.relu(self.conv3(F.relu(self.conv_max(v))))) if self.full else self.conv3(v)
        c3 = F.interpolate(c3, size=x.shape[-2:], mode="bilinear", align_corners=False)
        gate = self.conv4(_plus(c3, self.conv_f(c1)))
        if torch.is_grad_enabled():
            return x * torch.sigmoid(gate)
        return gate.sigmoid_().mul_(x)


# ----------------------------------------------------------------------------- RFDN


class ShuffleUpsampled(nn.Module):
    """A network whose x4 image is `upsampler` (a 3x3 convolution, the `head`, then a pixel shuffle) of its LR
    `trunk` features, plus `base(x)` where it has one: the shape `PretrainedEncoder.image` folds."""

    upsampler: nn.Sequential
    published_blocks: int  # the blocks of the published network; `keep` prunes it to its first few
    width_arg: str | None = None  # the constructor argument of the inner width a member may be narrowed to
    published_width: int = 0  # that width as published

    def trunk(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def keep(self, blocks: int) -> ShuffleUpsampled:
        """Prune to the first `blocks` blocks, in place (returns self); a layer that read every block's output
        loses the dropped blocks' inputs."""
        raise NotImplementedError

    @property
    def head(self) -> nn.Conv2d:
        return self.upsampler[0]

    def base(self, x: Tensor) -> Tensor | None:
        return None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        trunk = self.trunk(x)
        image = self.upsampler(trunk)
        base = self.base(x)
        return (image if base is None else image + base), trunk


class RFDB(nn.Module):
    """Residual feature distillation block: three distil-and-refine steps, a fourth distillation, 1x1 fusion, ESA."""

    def __init__(self, nf: int = 50) -> None:
        super().__init__()
        dc = nf // 2
        for i in (1, 2, 3):
            self.add_module(f"c{i}_d", nn.Conv2d(nf, dc, 1))
            self.add_module(f"c{i}_r", nn.Conv2d(nf, nf, 3, 1, 1))
        self.c4 = nn.Conv2d(nf, dc, 3, 1, 1)
        self.c5 = nn.Conv2d(4 * dc, nf, 1)
        self.esa = ESA(nf, 12, full=True)

    def forward(self, x: Tensor) -> Tensor:
        parts, h = [], x
        for i in (1, 2, 3):
            parts.append(_lrelu(getattr(self, f"c{i}_d")(h)))
            h = _lrelu(_plus(getattr(self, f"c{i}_r")(h), h))
        parts.append(_lrelu(self.c4(h)))
        return self.esa(self.c5(torch.cat(parts, 1)))


class RFDN(ShuffleUpsampled):
    """RFDN (50 channels, 4 blocks). Input RGB in [0, 255]; returns (x4 image in [0, 255], LR trunk features)."""

    channels = 50
    input_range = 255.0
    published_blocks = 4

    def __init__(self, nf: int = 50, blocks: int = 4, scale: int = 4) -> None:
        super().__init__()
        self.fea_conv = nn.Conv2d(3, nf, 3, 1, 1)
        for i in range(1, blocks + 1):
            self.add_module(f"B{i}", RFDB(nf))
        self.blocks = blocks
        self.c = nn.Sequential(nn.Conv2d(nf * blocks, nf, 1))
        self.LR_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upsampler = nn.Sequential(nn.Conv2d(nf, 3 * scale * scale, 3, 1, 1), nn.PixelShuffle(scale))

    def trunk(self, x: Tensor) -> Tensor:
        fea = self.fea_conv(x)
        outs, h = [], fea
        for i in range(1, self.blocks + 1):
            h = getattr(self, f"B{i}")(h)
            outs.append(h)
        return _plus(self.LR_conv(_lrelu(self.c(torch.cat(outs, 1)))), fea)

    def keep(self, blocks: int) -> RFDN:
        """The first `blocks` blocks; the 1x1 fusion of all blocks' outputs keeps its weights for theirs."""
        for i in range(blocks + 1, self.blocks + 1):
            delattr(self, f"B{i}")
        old = self.c[0]
        width = old.in_channels // self.blocks
        fusion = nn.Conv2d(width * blocks, old.out_channels, 1).to(old.weight)
        with torch.no_grad():
            fusion.weight.copy_(old.weight[:, : width * blocks])
            fusion.bias.copy_(old.bias)
        self.c[0], self.blocks = fusion, blocks
        return self


# ----------------------------------------------------------------------------- RLFN


class RLFB(nn.Module):
    """Residual local feature block: three 3x3 convolutions with a residual, a 1x1, the light ESA."""

    def __init__(self, nf: int = 46, mid: int = 48) -> None:
        super().__init__()
        self.c1_r = nn.Conv2d(nf, mid, 3, 1, 1)
        self.c2_r = nn.Conv2d(mid, mid, 3, 1, 1)
        self.c3_r = nn.Conv2d(mid, nf, 3, 1, 1)
        self.c5 = nn.Conv2d(nf, nf, 1)
        self.esa = ESA(nf, 16, full=False)

    def forward(self, x: Tensor) -> Tensor:
        h = _lrelu(self.c3_r(_lrelu(self.c2_r(_lrelu(self.c1_r(x))))))
        return self.esa(self.c5(_plus(h, x)))


class RLFN(ShuffleUpsampled):
    """RLFN, the pruned model (46 channels, 4 blocks). Input RGB in [0, 255]; returns (x4 image, trunk features)."""

    channels = 46
    input_range = 255.0
    published_blocks = 4
    width_arg, published_width = "mid", 48  # the 3x3 convolutions' inner width in every block (`rlfn/32`)

    def __init__(self, nf: int = 46, mid: int = 48, blocks: int = 4, scale: int = 4) -> None:
        super().__init__()
        self.conv_1 = nn.Conv2d(3, nf, 3, 1, 1)
        for i in range(1, blocks + 1):
            self.add_module(f"block_{i}", RLFB(nf, mid))
        self.blocks = blocks
        self.conv_2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upsampler = nn.Sequential(nn.Conv2d(nf, 3 * scale * scale, 3, 1, 1), nn.PixelShuffle(scale))

    def trunk(self, x: Tensor) -> Tensor:
        fea = h = self.conv_1(x)
        for i in range(1, self.blocks + 1):
            h = getattr(self, f"block_{i}")(h)
        return _plus(self.conv_2(h), fea)

    def keep(self, blocks: int) -> RLFN:
        for i in range(blocks + 1, self.blocks + 1):
            delattr(self, f"block_{i}")
        self.blocks = blocks
        return self


# ----------------------------------------------------------------------------- SAFMN


class GlobalResponseNorm(nn.Module):
    """Per channel: its L2 norm over the whole input, divided by the channels' mean norm, scales the features.
    The statistics span the whole input: a tile is normalised by its own, not the image's."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.norm(x, p=2, dim=(2, 3), keepdim=True)
        n = g / (g.mean(dim=1, keepdim=True) + 1e-6)
        return self.gamma * (x * n) + self.beta + x


class SAFM(nn.Module):
    """Spatially-adaptive feature modulation: four channel groups at four scales, fused into a multiplicative gate."""

    def __init__(self, dim: int, levels: int = 4) -> None:
        super().__init__()
        self.levels = levels
        c = dim // levels
        self.mfr = nn.ModuleList(nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False) for _ in range(levels))
        self.aggr = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        out = []
        for i, (part, conv) in enumerate(zip(x.chunk(self.levels, dim=1), self.mfr, strict=True)):
            if i == 0:
                out.append(conv(part))
                continue
            pooled = F.adaptive_max_pool2d(part, (h // 2 ** (i + 1), w // 2 ** (i + 1)))
            out.append(F.interpolate(conv(pooled), size=(h, w), mode="nearest"))
        return F.gelu(self.aggr(torch.cat(out, 1))) * x


class CCM(nn.Module):
    """Convolutional channel mixer: 3x3 expand by 2, GELU, 1x1 back."""

    def __init__(self, dim: int, growth: float = 2.0) -> None:
        super().__init__()
        hidden = int(dim * growth)
        self.ccm = nn.Sequential(nn.Conv2d(dim, hidden, 3, 1, 1, bias=False), nn.GELU(),
                                 nn.Conv2d(hidden, dim, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.ccm(x)


class AttBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.safm = SAFM(dim)
        self.ccm = CCM(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = _plus(self.safm(x), x)
        return _plus(self.ccm(x), x)


class SAFMN(ShuffleUpsampled):
    """SAFMN (dim 36, 8 blocks). Input RGB in [0, 1]; returns (x4 image in [0, 1], trunk features)."""

    channels = 36
    input_range = 1.0
    published_blocks = 8

    def __init__(self, dim: int = 36, blocks: int = 8, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale
        self.to_feat = nn.Conv2d(3, dim, 3, 1, 1)
        self.norm = GlobalResponseNorm(dim)
        self.feats = nn.Sequential(*[AttBlock(dim) for _ in range(blocks)])
        self.to_img = nn.Sequential(nn.Conv2d(dim, 3 * scale * scale, 3, 1, 1), nn.PixelShuffle(scale))

    def trunk(self, x: Tensor) -> Tensor:
        return self.feats(self.norm(self.to_feat(x)))  # no long skip: the normalisation's own residual is one

    @property
    def blocks(self) -> int:
        return len(self.feats)

    def keep(self, blocks: int) -> SAFMN:
        self.feats = self.feats[:blocks]
        return self

    @property
    def upsampler(self) -> nn.Sequential:  # the published name is `to_img`
        return self.to_img

    def base(self, x: Tensor) -> Tensor:
        """The bilinear x4 input, which the head's shuffled output is added to."""
        return F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- the published weights


@dataclass(frozen=True)
class Published:
    """One network's published weights: where they come from and under which licence."""

    network: type[nn.Module]
    title: str
    paper: str
    file: str
    sha256: str
    parameters: int
    source: str
    licence: str
    licence_files: tuple[str, ...]


PUBLISHED: dict[str, Published] = {
    "rfdn": Published(
        RFDN, "RFDN, residual feature distillation network",
        "Liu, Tang, Wu: Residual Feature Distillation Network for Lightweight Image Super-Resolution, "
        "ECCV Workshops 2020", "rfdn_baseline.pth",
        "11af8ec8ebd68689e90ef1e29044f9804c72d3bd9f7573820b7b26035782760c", 433_448,
        "https://github.com/ofsoundof/NTIRE2022_ESR @ e95ba4a4916bb13d6348f7ee172827e2452e8a31: "
        "model_zoo/rfdn_baseline.pth", "MIT", ("LICENSE",)),
    "rlfn": Published(
        RLFN, "RLFN, residual local feature network (pruned, 46 channels)",
        "Kong et al.: Residual Local Feature Network for Efficient Super-Resolution, CVPR Workshops 2022",
        "team00_rlfn.pth", "3c9be7b9d7a4bece9b68c83a56a1ffb38010f76413d5f215be6b4be842e18fb2", 317_218,
        "https://github.com/Amazingren/NTIRE2024_ESR @ 6404fa48dde4a4adbf241a51debdc661aef20449: "
        "model_zoo/team00_rlfn.pth", "MIT", ("LICENSE",)),
    "safmn": Published(
        SAFMN, "SAFMN, spatially-adaptive feature modulation network (dim 36, 8 blocks)",
        "Sun, Pan, Tang: Spatially-Adaptive Feature Modulation for Efficient Image Super-Resolution, ICCV 2023",
        "team15_SAFMN.pth", "93fe3d7175ef1446cfcb3a884ddf8bbb4391f31190e9d1bf6c6c1cb768f8b565", 237_000,
        "https://github.com/sunny2109/SAFMN @ 68c2182e4f8829a979886b0a1cab8f269f91b321: "
        "NTIRE2023_ESR/model_zoo/team15_SAFMN.pth", "MIT (the repository as a whole: Apache-2.0)",
        ("LICENSE", "LICENSE-repo-Apache-2.0")),
}
NETWORKS: tuple[str, ...] = tuple(PUBLISHED)


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def published_state(path: str | Path) -> dict[str, Tensor]:
    """A published state dict, without unpickling anything but tensors (BasicSR's `{"params": ...}` unwrapped)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and set(state) <= {"params", "params_ema"} and state:
        state = state.get("params_ema", state.get("params"))
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def load_strict(net: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load `state` into `net`: every key and shape must match, nothing left over; the error names the first
    keys that do not."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing keys", missing), ("unexpected keys", extra), ("wrong shapes", shapes))
                if items]
    if problems:
        raise ValueError(f"{what} does not match the architecture: " + "; ".join(problems))
    net.load_state_dict(state, strict=True)


def load_published(name: str, path: str | Path, check_sha256: bool = True) -> nn.Module:
    """The network `name` with its published weights from `path` (a file, or a folder holding the published
    file name), checked against the published checksum and loaded strictly."""
    pub = PUBLISHED[name]
    p = Path(path)
    if p.is_dir():
        p = p / pub.file
    if check_sha256 and (digest := sha256_of(p)) != pub.sha256:
        raise ValueError(f"{p}: sha256 {digest} is not the published {name} weights' ({pub.sha256})")
    net = pub.network()
    load_strict(net, published_state(p), str(p))
    return net.eval()
