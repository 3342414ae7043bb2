"""Model configuration: the sizes of the network, the diffusion schedule and the input conventions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from model.pretrained import NETWORKS
from model.pretrained_encoder import PretrainedEncoder, member_blocks, member_widths, members

Prediction = Literal["epsilon", "v", "sample"]
ResidualBase = Literal["bicubic", "rrdb"]
# Our own encoders (`rrdb`, `rlfb`), or pretrained networks of the field by name (`model.pretrained`): one
# (`rfdn`) or several fused (`rfdn+rlfn+safmn`); `name:N` keeps a member's first N blocks (`rfdn:3+rlfn`).
EncoderKind = str
DenoiserSpace = Literal["hr", "lr"]
PREDICTIONS: tuple[str, ...] = ("epsilon", "v", "sample")
RESIDUAL_BASES: tuple[str, ...] = ("bicubic", "rrdb")
ENCODERS: tuple[str, ...] = ("rrdb", "rlfb", *NETWORKS)
DENOISER_SPACES: tuple[str, ...] = ("hr", "lr")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the network and run it on an image.

    Names follow the original SRDiff / SAM-DiffSR hyper-parameters where one exists.
    """

    scale: int = 4
    rrdb_num_block: int = 17
    rrdb_num_feat: int = 64
    rrdb_growth: int = 32
    hidden_size: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 3, 4)
    timesteps: int = 100
    beta_schedule: str = "cosine"
    beta_s: float = 0.008
    res_rescale: float = 2.0
    clip_input: bool = True
    # The original code computes up(LR) by bicubic on LR/256 (not /255) before mapping to [-1, 1].
    lr_up_divisor: float = 256.0
    # What the denoiser predicts (diffusers' names): the noise (the original code), v = sqrt(a) e - sqrt(1-a) x0,
    # or the clean residual x0 itself.
    prediction: Prediction = "epsilon"
    # The image the diffusion residual is added to: bicubic up(LR) (the original code) or the RRDB encoder's
    # own x4 output (as ResDiff does), so that an undertrained denoiser falls back to a regression answer.
    residual_base: ResidualBase = "bicubic"
    # The encoder's blocks: the original's residual-in-residual dense blocks (`rrdb`, upsampled by nearest + conv
    # at 2x and 4x), or residual local feature blocks (`rlfb`, RLFN's design: three 3x3 convolutions, a 1x1 and
    # spatial attention per block, a pixel-shuffle upsampler), about a quarter of the cost per block. Either
    # way `rrdb_num_block` blocks of width `rrdb_num_feat` (`rrdb_growth` is RRDB's only). Or a pretrained
    # network of the field (`rfdn`, `rlfn`, `safmn`; several joined by `+` are fused), whose published
    # architecture fixes its sizes: `rrdb_num_*` do not apply to them.
    encoder: EncoderKind = "rrdb"
    # Where the denoiser works: at the output resolution (`hr`, the original), or at the LR resolution (`lr`): the
    # residual is pixel-unshuffled by `scale` (3 * scale**2 channels, scale**2 fewer positions) on the way in and
    # shuffled back on the way out, and the condition is projected at LR size. The diffusion, the structure
    # modulation and the samplers still act on the HR residual, so both spaces share every interface.
    denoiser_space: DenoiserSpace = "hr"
    extras: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.scale < 2 or self.scale & (self.scale - 1):
            raise ValueError(f"scale must be a power of two >= 2, got {self.scale}")
        if self.rrdb_num_block < 2:
            raise ValueError("rrdb_num_block must be at least 2 (features 2, 5, 8, ... condition the U-Net)")
        if min(self.rrdb_num_feat, self.rrdb_growth, self.hidden_size) < 1:
            raise ValueError("widths must be positive")
        if not self.dim_mults or min(self.dim_mults) < 1:
            raise ValueError("dim_mults must be a non-empty list of positive integers")
        if self.hidden_size % 2:
            raise ValueError("hidden_size must be even (sinusoidal timestep embedding)")
        if self.timesteps < 1:
            raise ValueError("timesteps must be positive")
        if self.beta_schedule != "cosine":
            raise ValueError(f"only the cosine schedule is supported, got {self.beta_schedule!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.residual_base not in RESIDUAL_BASES:
            raise ValueError(f"residual_base must be one of {', '.join(RESIDUAL_BASES)}, got {self.residual_base!r}")
        if self.encoder not in ("rrdb", "rlfb") and not self.pretrained:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)} (pretrained ones may be joined by '+', and "
                             "'name:N' keeps the first N of a pretrained network's blocks, 'rlfn/W' narrows "
                             "RLFN's blocks to W channels), "
                             f"got {self.encoder!r}")
        if self.pretrained and self.scale != 4:
            raise ValueError(f"the pretrained encoders are x4 networks; scale is {self.scale}")
        if self.denoiser_space not in DENOISER_SPACES:
            raise ValueError(f"denoiser_space must be one of {', '.join(DENOISER_SPACES)}, got {self.denoiser_space!r}")
        object.__setattr__(self, "dim_mults", tuple(int(m) for m in self.dim_mults))

    @property
    def pretrained(self) -> tuple[str, ...]:
        """The pretrained networks the encoder is made of (`model.pretrained`); () for our own encoders."""
        return members(self.encoder)

    @property
    def pretrained_blocks(self) -> dict[str, int]:
        """The blocks each pretrained member keeps (`rfdn:3+rlfn`: RFDN's first three, RLFN's four)."""
        return member_blocks(self.encoder)

    @property
    def pretrained_widths(self) -> dict[str, int]:
        """The inner width of each narrowed member (`rfdn+rlfn/32`: RLFN's blocks at 32 channels)."""
        return member_widths(self.encoder)

    @property
    def levels(self) -> int:
        return len(self.dim_mults)

    @property
    def unshuffle(self) -> int:
        """The denoiser's space-to-depth factor: `scale` for an LR-space denoiser, else 1."""
        return self.scale if self.denoiser_space == "lr" else 1

    @property
    def hr_multiple(self) -> int:
        """HR sizes must be a multiple of this (the U-Net halves its input's size levels-1 times)."""
        return 2 ** (self.levels - 1) * self.unshuffle

    @property
    def lr_multiple(self) -> int:
        """LR sizes must be a multiple of this so that the HR size is a multiple of `hr_multiple`."""
        return max(1, self.hr_multiple // self.scale)

    @property
    def cond_channels(self) -> int:
        """Channels of the encoder features that condition the U-Net: RRDB's (or RLFB's) features 2, 5, 8, ...
        concatenated, or the pretrained networks' trunks and their x4 images at LR size."""
        if self.pretrained:
            return PretrainedEncoder.cond_channels(self.pretrained, self.scale)
        return self.rrdb_num_feat * len(range(2, self.rrdb_num_block + 1, 3))

    def cond_shape(self, lr_height: int, lr_width: int) -> tuple[int, int, int]:
        """The shape of the projected condition `encode` returns for one LR image (the U-Net's first level)."""
        up = self.scale // self.unshuffle
        return self.hidden_size, lr_height * up, lr_width * up

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dim_mults"] = list(self.dim_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # The paper's model: 25.3 M parameters.
    "paper": ModelConfig(),
    # A model small enough to train on a CPU in an hour and to serve from a CPU.
    "small": ModelConfig(rrdb_num_block=5, rrdb_num_feat=32, rrdb_growth=16, hidden_size=32, lr_up_divisor=255.0),
    # For tests: builds and runs in milliseconds.
    "tiny": ModelConfig(rrdb_num_block=2, rrdb_num_feat=8, rrdb_growth=4, hidden_size=8, lr_up_divisor=255.0),
}
