"""Samplers: DDIM determinism and step counts, per-sample timesteps, batch-composition invariance."""

from __future__ import annotations

import pytest
import torch

from model.config import PRESETS
from model.diffusion import ddim_step, ddpm_step, make_schedule, timestep_plan
from model.network import SRDiffNet
from model.sampler import new_track, sample, step_tracks


@pytest.fixture(scope="module")
def net() -> SRDiffNet:
    torch.manual_seed(0)
    return SRDiffNet(PRESETS["tiny"]).eval()


@pytest.fixture(scope="module")
def cond(net: SRDiffNet) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return net.encode(torch.rand(3, 3, 8, 8) * 2 - 1)


@pytest.mark.parametrize("steps", [1, 2, 7, 50, 100])
def test_plan_is_descending_and_complete(steps: int) -> None:
    plan = timestep_plan(100, steps)
    assert len(plan) == steps and plan[0] == 99 and plan == sorted(set(plan), reverse=True)
    assert steps == 1 or plan[-1] == 0


@pytest.mark.parametrize("steps", [0, 101])
def test_plan_rejects_bad_step_counts(steps: int) -> None:
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.100"):
        timestep_plan(100, steps)


def run(net: SRDiffNet, cond: torch.Tensor, **kw) -> torch.Tensor:
    sched = make_schedule(100)
    with torch.no_grad():
        tracks = [new_track(c, 100, index=i, **kw) for i, c in enumerate(cond)]
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
        alone = [sample(net.denoise, sched, [new_track(cond[i], 100, **s)])[0] for i, s in enumerate(specs)]
        tracks = [new_track(cond[i], 100, **s) for i, s in enumerate(specs)]
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
