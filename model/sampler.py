"""Batched reverse diffusion over independent tracks.

A `Track` is one image (or tile) being sampled: its own state, step plan, sampler and noise
source, and the base image its residual is added to. `step_tracks` advances any set of tracks by
one step with ONE denoiser call, whatever step each track is at, which is what lets the service
batch requests at the step level. `track_images` turns finished tracks into their SR images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from model.config import ModelConfig
from model.diffusion import Schedule, ddim_step, ddpm_step, res2img, timestep_plan

SamplerName = Literal["ddpm", "ddim"]
DenoiseFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def track_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of track `index` of a request with `seed`, independent of batching, on `device`: the noise
    of a track is drawn where the model runs (on a GPU, drawing a 256-px tile's noise on the CPU took longer than
    the tile's denoiser step), so a seed gives another sample on a GPU than on a CPU."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class Track:
    x: Tensor  # (3, H, W) current sample x_t, on the model's device
    cond: Tensor  # (C, H, W) projected LR condition
    base: Tensor  # (3, H, W) the image the final residual is added to, in [-1, 1] (see `residual_base`)
    plan: list[int]  # descending timesteps, one per denoiser call; empty: the base is the answer
    sampler: SamplerName = "ddim"
    eta: float = 0.0
    generator: torch.Generator | None = None
    pos: int = 0
    # Explicit noises (for bit-exact reproduction of a recorded run): noise_fn(pos) -> (3, H, W).
    noise_fn: Callable[[int], Tensor] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.pos >= len(self.plan)

    @property
    def t(self) -> int:
        return self.plan[self.pos]

    @property
    def t_prev(self) -> int:
        return self.plan[self.pos + 1] if self.pos + 1 < len(self.plan) else -1

    @property
    def exact_ddpm(self) -> bool:
        """DDPM over every timestep: computed exactly as the original code does."""
        return self.sampler == "ddpm" and self.t_prev == self.t - 1

    @property
    def stochastic(self) -> bool:
        return self.sampler == "ddpm" or self.eta > 0

    def noise(self) -> Tensor:
        if self.noise_fn is not None:
            return self.noise_fn(self.pos).to(self.x.device, self.x.dtype)
        device = self.generator.device if self.generator is not None else self.x.device
        return torch.randn(self.x.shape, generator=self.generator, device=device).to(self.x.device, self.x.dtype)


def residual_base(cfg: ModelConfig, steps: int, up: Tensor | None, sr: Tensor) -> Tensor:
    """The base of a track: the encoder's x4 output `sr` for `steps=0` (the fidelity mode) and for models
    trained on it (`residual_base="rrdb"`), else bicubic `up` (None is allowed where it is not used)."""
    if steps == 0 or cfg.residual_base == "rrdb":
        return sr
    if up is None:
        raise ValueError("this model's residual base is bicubic up(LR), and none was given")
    return up


def new_track(
    cond: Tensor, base: Tensor, num_timesteps: int, steps: int, sampler: SamplerName = "ddim", eta: float = 0.0,
    seed: int = 0, index: int = 0,
) -> Track:
    """Start a track from x_T ~ N(0, I), drawn from the (seed, index) generator."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r} (ddpm or ddim)")
    gen = track_generator(seed, index, base.device)
    if steps == 0:  # the encoder's output alone: x_T is never read, so none is drawn
        x = torch.zeros_like(base)
    else:
        x = torch.randn(base.shape, generator=gen, device=base.device).to(base.dtype)
    return Track(x=x, cond=cond, base=base, plan=timestep_plan(num_timesteps, steps), sampler=sampler,
                 eta=eta, generator=gen)


def start_tracks(
    cfg: ModelConfig, cond: Tensor, sr: Tensor, up: Tensor | None, indices: Sequence[int], steps: int,
    sampler: SamplerName = "ddim", eta: float = 0.0, seed: int = 0,
) -> list[Track]:
    """One track per encoded tile: `cond`, `sr` from `Runtime.encode`, `up` its bicubic up(LR) tiles (None
    where `model.inputs.uses_up` is false); tile `indices[j]` of the request draws its noise from (seed, indices[j])."""
    base = residual_base(cfg, steps, None if up is None else up.to(sr.device, sr.dtype), sr)
    return [new_track(cond[j], base[j], cfg.timesteps, steps, sampler, eta, seed, i) for j, i in enumerate(indices)]


def track_images(tracks: Sequence[Track], cfg: ModelConfig, cpu: bool = True) -> Tensor:
    """Finished tracks' SR images (N, 3, H, W) in float32, nominally in [-1, 1] (not clamped): made where the
    tracks are, and with `cpu` copied to the CPU in one transfer (one per tile cost a GPU sync each)."""
    planned = {bool(tr.plan) for tr in tracks}
    if len(planned) > 1:  # some sampled, some not (steps=0): each on its own
        return torch.cat([track_images([tr], cfg, cpu) for tr in tracks])
    out = torch.stack([tr.base.detach() for tr in tracks]).float()
    if planned == {True}:
        out = res2img(torch.stack([tr.x.detach() for tr in tracks]).float(), out, cfg.res_rescale, cfg.clip_input)
    return out.cpu() if cpu else out



def step_tracks(denoise: DenoiseFn, sched: Schedule, tracks: Sequence[Track], prediction: str = "epsilon") -> None:
    """Advance every (unfinished) track by one step with a single denoiser call.

    `prediction` is what the denoiser outputs (`ModelConfig.prediction`)."""
    if not tracks:
        return
    device = tracks[0].x.device
    x = torch.stack([tr.x for tr in tracks])
    cond = torch.stack([tr.cond for tr in tracks])
    t = torch.tensor([tr.t for tr in tracks], device=device, dtype=torch.long)
    out_net = denoise(x, t, cond).to(x.dtype)

    exact = [i for i, tr in enumerate(tracks) if tr.exact_ddpm]
    other = [i for i, tr in enumerate(tracks) if not tr.exact_ddpm]
    out = torch.empty_like(x)
    if exact:
        idx = torch.tensor(exact, device=device)
        noise = torch.stack([tracks[i].noise() for i in exact])
        out[idx] = ddpm_step(sched, out_net[idx], t[idx], x[idx], noise, prediction)
    if other:
        idx = torch.tensor(other, device=device)
        t_prev = torch.tensor([tracks[i].t_prev for i in other], device=device, dtype=torch.long)
        eta = torch.tensor([1.0 if tracks[i].sampler == "ddpm" else tracks[i].eta for i in other],
                           device=device)
        noise = None
        if any(tracks[i].stochastic for i in other):
            noise = torch.stack([tracks[i].noise() if tracks[i].stochastic else torch.zeros_like(x[0])
                                 for i in other])
        out[idx] = ddim_step(sched, out_net[idx], t[idx], t_prev, x[idx], eta, noise, prediction)
    for i, tr in enumerate(tracks):
        tr.x = out[i]
        tr.pos += 1


def sample(
    denoise: DenoiseFn, sched: Schedule, tracks: Sequence[Track],
    on_step: Callable[[int], None] | None = None, prediction: str = "epsilon",
) -> list[Tensor]:
    """Run tracks to completion (all in one batch); returns each track's final residual x0."""
    active = [tr for tr in tracks if not tr.done]
    while active:
        step_tracks(denoise, sched, active, prediction)
        if on_step is not None:
            on_step(len(active))
        active = [tr for tr in active if not tr.done]
    return [tr.x for tr in tracks]
