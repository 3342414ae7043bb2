"""Diffusion math as small pure functions of (model output, timestep, sample).

Every function takes per-sample timesteps (a 1-D tensor, one entry per batch item), so items at
different steps of different plans share one denoiser call. Nothing here touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def cosine_betas(timesteps: int, s: float = 0.008) -> np.ndarray:
    """The cosine schedule exactly as the original code computes it (float64, clipped to 0.999)."""
    steps = timesteps + 1
    x = np.linspace(0, steps, steps)
    alphas_cumprod = np.cos(((x / steps) + s) / (1 + s) * np.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return np.clip(betas, a_min=0, a_max=0.999)


@dataclass(frozen=True)
class Schedule:
    """The schedule's buffers, float32, named as in the original code."""

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    mask_coefficient: Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(**{k: v.to(device) for k, v in vars(self).items()})

    def buffers(self) -> dict[str, Tensor]:
        return dict(vars(self))


def make_schedule(timesteps: int = 100, s: float = 0.008) -> Schedule:
    betas = cosine_betas(timesteps, s)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)

    def f32(a: np.ndarray) -> Tensor:
        return torch.tensor(a, dtype=torch.float32)

    return Schedule(
        betas=f32(betas),
        alphas_cumprod=f32(ac),
        alphas_cumprod_prev=f32(ac_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(ac)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ac)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ac - 1)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(np.log(np.maximum(post_var, 1e-20))),
        posterior_mean_coef1=f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
        posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
        mask_coefficient=f32(np.sqrt(1.0 - ac) * betas),
    )


def extract(a: Tensor, t: Tensor, ndim: int) -> Tensor:
    """a[t] shaped to broadcast against a batch of `ndim`-dimensional samples."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (ndim - 1)))


# ----------------------------------------------------------------------------- residual <-> image


def img2res(img_hr: Tensor, base: Tensor, res_rescale: float = 2.0) -> Tensor:
    """The diffusion target: the rescaled, clipped residual between HR and its base (up(LR) or the RRDB's x4)."""
    return ((img_hr - base) * res_rescale).clamp(-1, 1)


def res2img(x0: Tensor, base: Tensor, res_rescale: float = 2.0, clip: bool = True) -> Tensor:
    """The inverse of `img2res`: a (clamped) residual back to an image."""
    if clip:
        x0 = x0.clamp(-1, 1)
    return x0 / res_rescale + base


# ----------------------------------------------------------------------------- forward process / training


def q_sample(sched: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    return (extract(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def modulate_noise(sched: Schedule, noise: Tensor, t: Tensor, spe: Tensor) -> Tensor:
    """SAM-DiffSR's structure modulation: e' = e + c_t * E (E resized bilinearly to the noise)."""
    if spe.shape[-2:] != noise.shape[-2:]:
        spe = torch.nn.functional.interpolate(spe, noise.shape[-2:], mode="bilinear")
    return noise + extract(sched.mask_coefficient, t, noise.ndim) * spe


def training_target(sched: Schedule, prediction: str, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the denoiser learns to output for x_t = q_sample(x0, t, noise), by prediction type."""
    if prediction == "epsilon":
        return noise
    if prediction == "sample":
        return x0
    if prediction == "v":
        return (extract(sched.sqrt_alphas_cumprod, t, x0.ndim) * noise
                - extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)
    raise ValueError(f"unknown prediction type {prediction!r}")


# ----------------------------------------------------------------------------- reverse process


def predict_x0(sched: Schedule, x_t: Tensor, t: Tensor, model_output: Tensor, prediction: str = "epsilon",
               clip: bool = True) -> Tensor:
    """The clean sample implied by the denoiser's output (clamped to [-1, 1] unless `clip` is False)."""
    nd = x_t.ndim
    if prediction == "epsilon":
        x0 = (extract(sched.sqrt_recip_alphas_cumprod, t, nd) * x_t
              - extract(sched.sqrt_recipm1_alphas_cumprod, t, nd) * model_output)
    elif prediction == "sample":
        x0 = model_output
    elif prediction == "v":
        x0 = (extract(sched.sqrt_alphas_cumprod, t, nd) * x_t
              - extract(sched.sqrt_one_minus_alphas_cumprod, t, nd) * model_output)
    else:
        raise ValueError(f"unknown prediction type {prediction!r}")
    return x0.clamp(-1.0, 1.0) if clip else x0


def ddpm_step(sched: Schedule, model_output: Tensor, t: Tensor, x_t: Tensor, noise: Tensor,
              prediction: str = "epsilon") -> Tensor:
    """One ancestral step t -> t-1 of the full schedule, as the original code computes it."""
    x0 = predict_x0(sched, x_t, t, model_output, prediction)
    mean = (extract(sched.posterior_mean_coef1, t, x_t.ndim) * x0
            + extract(sched.posterior_mean_coef2, t, x_t.ndim) * x_t)
    log_var = extract(sched.posterior_log_variance_clipped, t, x_t.ndim)
    nonzero = (1 - (t == 0).float()).reshape(t.shape[0], *((1,) * (x_t.ndim - 1)))
    return mean + nonzero * (0.5 * log_var).exp() * noise


def ddim_step(
    sched: Schedule, model_output: Tensor, t: Tensor, t_prev: Tensor, x_t: Tensor, eta: Tensor | float,
    noise: Tensor | None, prediction: str = "epsilon",
) -> Tensor:
    """One generalised DDIM step t -> t_prev (t_prev = -1 ends at x0). eta=0 is deterministic;
    eta=1 is ancestral sampling on the strided schedule. The noise direction is re-derived from the
    clamped x0, whatever the prediction type."""
    nd = x_t.ndim
    x0 = predict_x0(sched, x_t, t, model_output, prediction)
    eps = (extract(sched.sqrt_recip_alphas_cumprod, t, nd) * x_t - x0) / extract(
        sched.sqrt_recipm1_alphas_cumprod, t, nd)
    a_t = extract(sched.alphas_cumprod, t, nd)
    one = torch.ones_like(sched.alphas_cumprod[:1])
    a_prev = extract(torch.cat([one, sched.alphas_cumprod]), t_prev + 1, nd)
    eta = torch.as_tensor(eta, dtype=x_t.dtype, device=x_t.device).reshape(-1, *((1,) * (nd - 1)))
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def check_steps(steps: int, num_timesteps: int) -> int:
    """`steps` if a sampler can take that many denoiser calls (0 to `num_timesteps`), else ValueError."""
    if not 0 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 0..{num_timesteps}, got {steps}")
    return steps


def timestep_plan(num_timesteps: int, steps: int) -> list[int]:
    """Descending timesteps for a sampler with `steps` denoiser calls (evenly spaced, ending at 0).

    `steps=0` is the empty plan: no denoiser call, the encoder's own x4 output (the fidelity mode)."""
    if check_steps(steps, num_timesteps) == 0:
        return []
    plan = np.linspace(num_timesteps - 1, 0, steps).round().astype(int)
    return [int(t) for t in plan]
