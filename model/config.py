"""Model configuration: the sizes of the network, the diffusion schedule and the input conventions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Prediction = Literal["epsilon", "v", "sample"]
ResidualBase = Literal["bicubic", "rrdb"]
PREDICTIONS: tuple[str, ...] = ("epsilon", "v", "sample")
RESIDUAL_BASES: tuple[str, ...] = ("bicubic", "rrdb")


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
        object.__setattr__(self, "dim_mults", tuple(int(m) for m in self.dim_mults))

    @property
    def levels(self) -> int:
        return len(self.dim_mults)

    @property
    def hr_multiple(self) -> int:
        """HR sizes must be a multiple of this (the U-Net halves the size levels-1 times)."""
        return 2 ** (self.levels - 1)

    @property
    def lr_multiple(self) -> int:
        """LR sizes must be a multiple of this so that the HR size is a multiple of `hr_multiple`."""
        return max(1, self.hr_multiple // self.scale)

    @property
    def cond_channels(self) -> int:
        """Channels of the concatenated RRDB features 2, 5, 8, ... that condition the U-Net."""
        return self.rrdb_num_feat * len(range(2, self.rrdb_num_block + 1, 3))

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
