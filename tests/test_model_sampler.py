"""Samplers: DDIM determinism and step counts, per-sample timesteps, batch-composition invariance,
prediction targets (epsilon, v, sample) and the steps=0 fidelity mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import PRESETS
from model.diffusion import (
    ddim_step,
    ddpm_step,
    make_schedule,
    predict_x0,
    q_sample,
    timestep_plan,
    training_target,
)
from model.inputs import uses_up
from model.network import SRDiffNet
from model.sampler import new_track, sample, start_tracks, step_tracks, track_images


@pytest.fixture(scope="module")
def net() -> SRDiffNet:
    torch.manual_seed(0)
    return SRDiffNet(PRESETS["tiny"]).eval()


@pytest.fixture(scope="module")
def cond(net: SRDiffNet) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return net.encode(torch.rand(3, 3, 8, 8) * 2 - 1)[0]


def base_like(c: torch.Tensor) -> torch.Tensor:
    return torch.zeros(3, *c.shape[-2:])


@pytest.mark.parametrize("steps", [1, 2, 7, 50, 100])
def test_plan_is_descending_and_complete(steps: int) -> None:
    plan = timestep_plan(100, steps)
    assert len(plan) == steps and plan[0] == 99 and plan == sorted(set(plan), reverse=True)
    assert steps == 1 or plan[-1] == 0


@pytest.mark.parametrize("steps", [-1, 101])
def test_plan_rejects_bad_step_counts(steps: int) -> None:
    with pytest.raises(ValueError, match=r"steps must be in 0\.\.100"):
        timestep_plan(100, steps)


def test_zero_steps_is_the_encoder_output() -> None:
    """steps=0: an empty plan, no denoiser call, and the track's image is the encoder's x4 output."""
    assert timestep_plan(100, 0) == []
    cfg = PRESETS["tiny"]
    cond, sr, up = torch.randn(2, 8, 16, 16), torch.rand(2, 3, 16, 16) * 2 - 1, torch.zeros(2, 3, 16, 16)
    tracks = start_tracks(cfg, cond, sr, up, [0, 1], steps=0)
    assert all(tr.done for tr in tracks)
    calls = []
    sample(lambda *a: calls.append(a), make_schedule(100), tracks)
    assert not calls
    for tr, ref in zip(tracks, sr, strict=True):
        assert torch.equal(track_images([tr], cfg)[0], ref)
    # With steps >= 1 a bicubic-base model adds its residual to up(LR); an rrdb-base model to sr.
    assert torch.equal(start_tracks(cfg, cond, sr, up, [0, 1], steps=2)[1].base, up[1])
    rrdb_cfg = dataclasses.replace(cfg, residual_base="rrdb")
    assert torch.equal(start_tracks(rrdb_cfg, cond, sr, up, [0, 1], steps=2)[1].base, sr[1])
    # Callers skip up(LR) where it is not used (`uses_up`); a model that needs it says so.
    assert not uses_up(rrdb_cfg) and uses_up(cfg)
    assert torch.equal(start_tracks(rrdb_cfg, cond, sr, None, [0, 1], steps=2)[1].base, sr[1])
    assert torch.equal(start_tracks(cfg, cond, sr, None, [0, 1], steps=0)[1].base, sr[1])
    with pytest.raises(ValueError, match="residual base is bicubic"):
        start_tracks(cfg, cond, sr, None, [0, 1], steps=2)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_prediction_targets_invert(prediction: str) -> None:
    """A perfect denoiser for each target gives back x0 exactly, at every timestep."""
    sched = make_schedule(100)
    torch.manual_seed(0)
    x0, noise = torch.rand(2, 4, 3, 8, 8) * 2 - 1
    t = torch.tensor([99, 60, 10, 0])
    x_t = q_sample(sched, x0, t, noise)
    out = training_target(sched, prediction, x0, noise, t)
    assert torch.allclose(predict_x0(sched, x_t, t, out, prediction, clip=False), x0, atol=2e-3)


@pytest.mark.parametrize("prediction", ["v", "sample"])
def test_one_step_with_a_perfect_denoiser_lands_on_x0(prediction: str) -> None:
    """DDIM-1 from pure noise: with an x0 or v target the answer is the predicted x0 (no 1/sqrt(a) blow-up)."""
    sched = make_schedule(100)
    torch.manual_seed(0)
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    track = new_track(torch.zeros(4, 8, 8), torch.zeros(3, 8, 8), 100, steps=1)
    x_t = track.x[None].clone()

    def oracle(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        noise = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return training_target(sched, prediction, x0, noise, t)

    (out,) = sample(oracle, sched, [track], prediction=prediction)
    assert torch.allclose(out, x0[0], atol=1e-3)
    assert not torch.equal(x_t[0], out)


def run(net: SRDiffNet, cond: torch.Tensor, **kw) -> torch.Tensor:
    sched = make_schedule(100)
    with torch.no_grad():
        tracks = [new_track(c, base_like(c), 100, index=i, **kw) for i, c in enumerate(cond)]
        return torch.stack(sample(net.denoise, sched, tracks))


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_ddim_eta0_is_deterministic_and_seeded(net: SRDiffNet, cond: torch.Tensor, steps: int) -> None:
    a = run(net, cond, steps=steps, sampler="ddim", seed=5)
    b = run(net, cond, steps=steps, sampler="ddim", seed=5)
    c = run(net, cond, steps=steps, sampler="ddim", seed=6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == (3, 3, 32, 32) and torch.isfinite(a).all()


def test_ddpm_respaced_and_full(net: SRDiffNet, cond: torch.Tensor) -> None:
    a = run(net, cond, steps=10, sampler="ddpm", seed=1)
    b = run(net, cond, steps=10, sampler="ddpm", seed=1)
    assert torch.equal(a, b)
    full = run(net, cond[:1], steps=100, sampler="ddpm", seed=1)
    assert torch.isfinite(full).all()


def test_ddim_eta1_full_schedule_equals_ddpm_step() -> None:
    """Generalised DDIM with eta=1 over consecutive steps is the DDPM posterior (up to rounding)."""
    sched = make_schedule(100)
    torch.manual_seed(0)
    x, eps, noise = torch.randn(3, 4, 3, 8, 8)
    t = torch.tensor([99, 50, 10, 1])
    a = ddpm_step(sched, eps, t, x, noise)
    b = ddim_step(sched, eps, t, t - 1, x, 1.0, noise)
    assert torch.allclose(a, b, atol=1e-4)


def test_mixed_batch_equals_separate_runs(net: SRDiffNet, cond: torch.Tensor) -> None:
    """Tracks at different timesteps, step counts and samplers share one denoiser call per step,
    and each gets exactly what it would get alone."""
    sched = make_schedule(100)
    specs = [dict(steps=4, sampler="ddim", seed=1), dict(steps=9, sampler="ddpm", seed=2),
             dict(steps=6, sampler="ddim", eta=0.5, seed=3)]
    with torch.no_grad():
        alone = [sample(net.denoise, sched, [new_track(cond[i], base_like(cond[i]), 100, **s)])[0]
                 for i, s in enumerate(specs)]
        tracks = [new_track(cond[i], base_like(cond[i]), 100, **s) for i, s in enumerate(specs)]
        calls = []

        def denoise(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            calls.append(t.tolist())
            return net.denoise(x, t, c)

        # Start the second track late, so the batch really holds different timesteps.
        step_tracks(denoise, sched, tracks[:1])
        active = list(tracks)
        while active:
            step_tracks(denoise, sched, active)
            active = [tr for tr in active if not tr.done]
    assert any(len(set(t)) > 1 for t in calls), calls
    assert len(calls) == 1 + 9  # the early step, then one call per step of the longest plan
    for tr, ref in zip(tracks, alone, strict=True):
        assert torch.allclose(tr.x, ref, atol=1e-5)
