"""Conformance with the original code: recompute every tensor of a reference directory.

A reference directory holds `upstream_checkpoint.ckpt` (original format), `config.json` and
`vectors.safetensors` (inputs and the original code's outputs); see shared/reference/README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from model.diffusion import img2res, make_schedule, modulate_noise, q_sample
from model.sampler import Track, sample, track_images
from model.upstream import import_upstream_checkpoint

TOL = 1e-5
TOL_SAMPLE = 1e-4

# Extra checks that live outside `model` (e.g. the SPE, in `training`): vectors -> {name: tensor}.
ExtraCheck = Callable[[dict[str, Tensor]], dict[str, Tensor]]


@dataclass(frozen=True)
class Row:
    name: str
    max_abs_err: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= self.tol


def compute(ref_dir: str | Path, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our outputs for every model tensor that `vectors` records, keyed by the vector's name."""
    net, info = import_upstream_checkpoint(Path(ref_dir) / "upstream_checkpoint.ckpt")
    cfg = info.config
    sched = make_schedule(cfg.timesteps, cfg.beta_s)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        img_lr = vectors["img_lr"]
        rrdb_out, feats = net.rrdb(img_lr)
        out["rrdb_out"] = rrdb_out
        for i, f in enumerate(feats):
            out[f"rrdb_feature_{i}"] = f
        cond = net.denoise_fn.project_cond(net.rrdb.condition(rrdb_out, feats))
        if "denoise_x" in vectors:
            out["denoise_out"] = net.denoise(vectors["denoise_x"], vectors["denoise_t"], cond)
        for name, buf in sched.buffers().items():
            out[f"schedule_{name}"] = buf

        if "train_t" in vectors:
            x0 = img2res(vectors["img_hr"], vectors["img_lr_up"], cfg.res_rescale)
            out["train_x_start_residual"] = x0
            t = vectors["train_t"]
            noise = modulate_noise(sched, vectors["train_noise"], t, vectors["train_sam_mask"])
            x_t = q_sample(sched, x0, t, noise)
            pred = net.denoise(x_t, t, cond)
            out["train_x_t"] = x_t
            out["train_noise_pred"] = pred
            out["train_loss"] = (noise - pred).abs().mean().reshape(1)

        if "sample_noises" in vectors:
            noises = vectors["sample_noises"]
            T = sched.num_timesteps
            tracks = [
                Track(x=noises[0, b], cond=cond[b], base=vectors["img_lr_up"][b], plan=list(range(T - 1, -1, -1)),
                      sampler="ddpm", noise_fn=lambda pos, b=b: noises[pos + 1, b])
                for b in range(noises.shape[1])
            ]
            sample(net.denoise, sched, tracks, prediction=cfg.prediction)
            out["sample_out"] = track_images(tracks, cfg)
    return out


def verify_reference(ref_dir: str | Path, extra: list[ExtraCheck] | None = None) -> list[Row]:
    """Compare our outputs with every expected tensor; one row per tensor checked."""
    ref_dir = Path(ref_dir)
    for f in ("upstream_checkpoint.ckpt", "vectors.safetensors"):
        if not (ref_dir / f).is_file():
            raise FileNotFoundError(f"{ref_dir}: missing {f}")
    vectors = load_file(str(ref_dir / "vectors.safetensors"))
    ours = compute(ref_dir, vectors)
    for check in extra or []:
        ours.update(check(vectors))
    rows = []
    for name, got in ours.items():
        if name not in vectors:
            continue
        want = vectors[name]
        if tuple(got.shape) != tuple(want.shape):
            rows.append(Row(name, float("inf"), TOL))
            continue
        err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
        rows.append(Row(name, err, TOL_SAMPLE if name == "sample_out" else TOL))
    return rows


def format_rows(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'tensor':<{width}}  {'max abs err':>12}  {'tol':>8}  result"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.max_abs_err:>12.3e}  {r.tol:>8.0e}  {'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)
