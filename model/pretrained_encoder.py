"""One or several pretrained networks of the field (`model.pretrained`) as our LR encoder.

The encoder contract: LR in [-1, 1] -> (x4 image in [-1, 1], the features that condition the denoiser). Several
networks are fused by a learned per-member, per-colour weighting of their x4 images (initially their plain mean).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.pretrained import PUBLISHED, ShuffleUpsampled, load_published

MIN_SIDE = 16  # the smallest input side the ESA blocks take (15), rounded up


def _parts(encoder: str) -> dict[str, tuple[int, int | None]]:
    """Each member of an encoder name with (blocks kept, inner width where narrowed); {} if the name is none."""
    out: dict[str, tuple[int, int | None]] = {}
    for part in encoder.split("+"):
        head, slash, width_text = part.partition("/")
        name, colon, count = head.partition(":")
        if name not in PUBLISHED or name in out:
            return {}
        network = PUBLISHED[name].network
        whole = network.published_blocks
        blocks = int(count) if count.isdigit() else (0 if colon else whole)
        if not 1 <= blocks <= whole:
            return {}
        width = int(width_text) if width_text.isdigit() else 0
        if slash and (network.width_arg is None or not 1 <= width < network.published_width):
            return {}
        out[name] = (blocks, width or None)
    return out


def member_blocks(encoder: str) -> dict[str, int]:
    """The pretrained networks an encoder name stands for, with the blocks each keeps: 'rfdn+rlfn' -> both whole
    ({'rfdn': 4, 'rlfn': 4}); 'rfdn:3+rlfn' keeps RFDN's first three blocks (pruned). {} if the name is none."""
    return {name: blocks for name, (blocks, _) in _parts(encoder).items()}


def member_widths(encoder: str) -> dict[str, int]:
    """The members narrowed to an inner width ('rfdn+rlfn/32' -> {'rlfn': 32}: RLFN's blocks convolve 32
    channels where the published network has 48; made by `training.narrowing`)."""
    return {name: width for name, (_, width) in _parts(encoder).items() if width}


def encoder_name(blocks: dict[str, int], widths: dict[str, int]) -> str:
    """The encoder name of these members (the inverse of `member_blocks` and `member_widths`): a member keeping
    fewer blocks than published gets ':N', a narrowed one '/W' ({'rfdn': 4, 'rlfn': 4}, {'rlfn': 32} ->
    'rfdn+rlfn/32')."""
    return "+".join(name + (f":{n}" if n < PUBLISHED[name].network.published_blocks else "")
                    + (f"/{widths[name]}" if name in widths else "") for name, n in blocks.items())


def members(encoder: str) -> tuple[str, ...]:
    """The pretrained networks an encoder name stands for ('rfdn' -> ('rfdn',), 'rfdn:3+rlfn' -> both); () if
    none."""
    return tuple(member_blocks(encoder))


class PretrainedEncoder(nn.Module):
    """One or several pretrained networks as the LR encoder: LR in [-1, 1] -> (x4 image in [-1, 1], features).

    The features that condition the denoiser (`condition`) are each member's LR trunk features and each member's
    x4 image, pixel-unshuffled to LR size (so the denoiser sees where the members disagree). The x4 image is
    the members' images weighted per colour channel (`mix`, one row per member, initially 1/n each)."""

    def __init__(self, names: tuple[str, ...], scale: int = 4, blocks: dict[str, int] | None = None,
                 widths: dict[str, int] | None = None) -> None:
        """`blocks`: how many of its blocks a member keeps where it is pruned (default: all it was published with);
        `widths`: the inner width of a narrowed member (`member_widths`)."""
        super().__init__()
        if scale != 4:
            raise ValueError("the pretrained networks are x4 networks")
        self.names, self.scale = names, scale
        self.widths = dict(widths or {})
        kept = {n: PUBLISHED[n].network.published_blocks for n in names} | (blocks or {})
        self.nets = nn.ModuleDict({n: PUBLISHED[n].network(blocks=kept[n], **self._width_arg(n)) for n in names})
        if len(names) > 1:
            self.mix = nn.Parameter(torch.full((len(names), 3), 1.0 / len(names)))

    def _width_arg(self, name: str) -> dict[str, int]:
        return {PUBLISHED[name].network.width_arg: self.widths[name]} if name in self.widths else {}

    @staticmethod
    def cond_channels(names: tuple[str, ...], scale: int = 4) -> int:
        return sum(PUBLISHED[n].network.channels + 3 * scale * scale for n in names)

    def _input01(self, x: Tensor) -> Tensor:
        """x in [0, 1]. ESA's unpadded strided convolution and pooling need 15 pixels a side: smaller inputs (a
        thin image's tiles) are padded by repeating their edges; the outputs are cropped back."""
        h, w = x.shape[-2:]
        pad_h, pad_w = max(0, MIN_SIDE - h), max(0, MIN_SIDE - w)
        return F.pad((x + 1) / 2, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else (x + 1) / 2

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        h, w = x.shape[-2:]
        x01 = self._input01(x)
        s = self.scale
        outs, feats = [], []
        for net in self.nets.values():
            r = net.input_range
            out, trunk = net(x01 * r)
            outs.append(out[..., : h * s, : w * s] / r)
            feats.append(trunk[..., :h, :w])
        if len(outs) == 1:
            sr = outs[0]
        else:
            mix = self.mix.to(outs[0].dtype)
            sr = sum(o * weight[None, :, None, None] for o, weight in zip(outs, mix, strict=True))
        # The members' images ride along for `condition`, after the trunks.
        return sr.clamp(0, 1) * 2 - 1, [*feats, *outs]

    def image(self, x: Tensor) -> Tensor:
        """`forward(x)[0]` alone (all that `steps=0` needs), with less work at the output size: the mix weights,
        each member's input range and the mapping to [-1, 1] are folded into each member's last convolution
        (`ShuffleUpsampled.head`), whose outputs are summed at LR size and pixel-shuffled once. The heads run in
        fp32 whatever the network's precision: the image rounded to bf16 cost RFDN alone 0.02 dB."""
        h, w = x.shape[-2:]
        x01 = self._input01(x)
        s = self.scale
        nets: list[ShuffleUpsampled] = list(self.nets.values())  # type: ignore[arg-type]
        inputs = [x01 * net.input_range for net in nets]
        trunks = [net.trunk(x_in) for net, x_in in zip(nets, inputs, strict=True)]
        mix = self.mix.float() if len(nets) > 1 else torch.ones(1, 3, device=x.device)
        summed = bases = None
        with torch.autocast(x.device.type, enabled=False):
            for net, m, x_in, trunk in zip(nets, mix, inputs, trunks, strict=True):
                head = net.head
                gain = m * (2 / net.input_range)  # per colour: its mix weight, the input range, the x2 of [-1, 1]
                gain_ch = gain.repeat_interleave(s * s)  # pixel_shuffle makes channels c*s*s .. c*s*s+s*s-1 colour c
                shift = 1.0 if summed is None else 0.0  # the -1 of [-1, 1], once
                y = F.conv2d(trunk.float(), head.weight.float() * gain_ch[:, None, None, None],
                             head.bias.float() * gain_ch - shift, padding=head.padding)
                summed = y if summed is None else summed + y
                if (base := net.base(x_in)) is not None:
                    base = base.float() * gain[None, :, None, None]
                    bases = base if bases is None else bases + base
        sr = F.pixel_shuffle(summed, s)
        if bases is not None:
            sr = sr + bases
        return sr[..., : h * s, : w * s].clamp(-1, 1)

    def member_images(self, feats: list[Tensor]) -> list[Tensor]:
        """Each member's own x4 image in [0, 1], from `forward`'s features."""
        return feats[len(self.names):]

    def condition(self, sr: Tensor, feats: list[Tensor]) -> Tensor:
        images = [F.pixel_unshuffle(o * 2 - 1, self.scale) for o in self.member_images(feats)]
        return torch.cat([*feats[:len(self.names)], *images], 1)

    def load_published(self, folders: dict[str, str | Path], check_sha256: bool = True) -> None:
        """Each member's published weights, from `folders[name]` (a file or the folder holding it); a pruned member
        keeps those of its first blocks. A narrowed member has no published weights (`training.narrowing` makes
        it from a whole one)."""
        if self.widths:
            raise ValueError(f"{', '.join(self.widths)}: a narrowed network has no published weights; narrow a "
                             "checkpoint of the whole one (samdiffsr narrow)")
        kept = {n: net.blocks for n, net in self.nets.items()}
        for n in self.names:
            self.nets[n] = load_published(n, folders[n], check_sha256)
        self.keep(kept)

    def keep(self, blocks: dict[str, int]) -> None:
        """Prune the members named in `blocks` to their first `blocks[name]` blocks (in place)."""
        for n, kept in blocks.items():
            if kept < self.nets[n].blocks:
                self.nets[n].keep(kept)
