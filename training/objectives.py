"""Training objectives: stage 1 (the RRDB encoder, L1 to HR) and stage 2 (the structure-modulated denoiser)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.diffusion import Schedule, img2res, modulate_noise, q_sample, training_target
from model.network import SRDiffNet

Stage = Literal["rrdb", "diffusion"]


PixelLoss = Literal["l1", "l2"]


class RRDBObjective(nn.Module):
    """Stage 1: L1 (or, with `loss="l2"`, the mean squared error, which PSNR measures) between the RRDB's x4 image
    and HR."""

    def __init__(self, net: SRDiffNet, loss: PixelLoss = "l1") -> None:
        super().__init__()
        self.rrdb = net.rrdb
        self.loss = F.l1_loss if loss == "l1" else F.mse_loss

    def forward(self, img_lr: Tensor, img_hr: Tensor) -> Tensor:
        out, _ = self.rrdb(img_lr)
        return self.loss(out.float(), img_hr)


class DiffusionObjective(nn.Module):
    """Stage 2: L1(target, denoiser(x_t, t, cond)), x_t noised with e' (the structure-modulated noise).

    The target follows `ModelConfig.prediction`: e' itself (the paper's), v, or the clean residual x0;
    the residual is taken over `ModelConfig.residual_base` (bicubic up(LR) or the RRDB's x4 output).
    The RRDB is frozen unless `tune_encoder`; then the loss reaches it through the condition and the base,
    plus `encoder_l1` times stage 1's L1 of its own x4 output.
    """

    def __init__(self, net: SRDiffNet, sched: Schedule, structure: bool, tune_encoder: bool = False,
                 encoder_l1: float = 0.0) -> None:
        super().__init__()
        self.net, self.sched, self.structure, self.tune_encoder = net, sched, structure, tune_encoder
        self.encoder_l1 = encoder_l1 if tune_encoder else 0.0

    def forward(self, img_lr: Tensor, img_lr_up: Tensor | None, img_hr: Tensor, spe: Tensor, t: Tensor,
                noise: Tensor) -> Tensor:
        cfg = self.net.cfg
        # The encoder runs under the caller's autocast: its bf16 x4 output is within 58 dB PSNR of the
        # float32 one (measured on corpus-hr/val), far below the residual's scale.
        with torch.set_grad_enabled(self.tune_encoder):
            sr, feats = self.net.rrdb(img_lr)
        cond = self.net.denoise_fn.project_cond(self.net.rrdb.condition(sr, feats))
        base = sr.float() if cfg.residual_base == "rrdb" else img_lr_up
        if base is None:
            raise ValueError("residual_base 'bicubic' needs img_lr_up")
        x0 = img2res(img_hr, base, cfg.res_rescale)
        if self.structure:
            noise = modulate_noise(self.sched, noise, t, spe)
        x_t = q_sample(self.sched, x0, t, noise)
        target = training_target(self.sched, cfg.prediction, x0, noise, t)
        loss = F.l1_loss(self.net.denoise(x_t, t, cond).float(), target)
        if self.encoder_l1:
            loss = loss + self.encoder_l1 * F.l1_loss(sr.float(), img_hr)
        return loss


def draw_timesteps(n: int, num_timesteps: int, generator: torch.Generator, device: torch.device | str,
                   plan: Sequence[int] | Tensor = (), plan_prob: float = 0.0) -> Tensor:
    """`n` training timesteps, uniform over the schedule; with `plan_prob` > 0 each is, with that probability,
    one of `plan` instead (the timesteps the served sampler visits: t = T-1 alone for one step), so that the
    denoiser's answers from almost pure noise, the ones a one-step model serves, are trained most. With
    `plan_prob` 0 the draws are the same as ever."""
    t = torch.randint(0, num_timesteps, (n,), device=device, generator=generator)
    if plan_prob > 0 and len(plan):
        pick = torch.rand(n, device=device, generator=generator) < plan_prob
        which = torch.randint(0, len(plan), (n,), device=device, generator=generator)
        t = torch.where(pick, torch.as_tensor(plan, device=device)[which], t)
    return t


def trained_module(net: SRDiffNet, stage: Stage, tune_encoder: bool = False) -> nn.Module:
    """What the optimiser and the EMA own: the encoder (stage 1), the denoiser (stage 2), or both."""
    if stage == "rrdb":
        return net.rrdb
    return net if tune_encoder else net.denoise_fn


def param_groups(module: nn.Module, net: SRDiffNet, encoder_lr: float) -> list[dict]:
    """The optimiser's groups: the encoder's (when `module` holds it beside the denoiser) runs at
    `encoder_lr` times the schedule's lr (the group's `lr_scale`), everything else at 1x; parameters held fixed
    (`freeze`) are in neither."""
    def free(m: nn.Module) -> list[nn.Parameter]:
        return [p for p in m.parameters() if p.requires_grad]

    if module is not net:
        return [{"params": free(module), "lr_scale": 1.0}]
    return [{"params": free(net.denoise_fn), "lr_scale": 1.0}, {"params": free(net.rrdb), "lr_scale": encoder_lr}]


def freeze(module: nn.Module, names: tuple[str, ...]) -> None:
    """Hold fixed the parameters of `module` named in `names` (`optim.frozen`), or all those of a module named so;
    a name that matches none is refused."""
    for name in names:
        hit = [p for n, p in module.named_parameters() if n == name or n.startswith(name + ".")]
        if not hit:
            raise ValueError(f"optim.frozen: the network has no parameter or module {name!r}")
        for p in hit:
            p.requires_grad_(False)
