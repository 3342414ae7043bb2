"""Training end to end on a tiny config and tiny images: both stages, exact resume, SIGTERM, DDP (gloo)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model.loading import load_any
from model.runtime import TorchRuntime
from model.upscale import Upscaler, default_steps
from training.config import ConfigError, load_config
from training.objectives import draw_timesteps
from training.optim import lr_at
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 small training images with SPE maps, and 2 validation images."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        (root / split).mkdir()
        for i in range(n):
            small = rng.uniform(0, 255, (9, 9, 3)).astype(np.uint8)
            img = Image.fromarray(small).resize((64, 64), Image.BICUBIC)
            img.save(root / split / f"{split}{i}.png")
    (root / "spe").mkdir()
    for i in range(4):
        spe = np.zeros((64, 64), np.float32)
        spe[: 16 * (i + 1)] = 0.1 * (i + 1)
        np.save(root / "spe" / f"train{i}.npy", spe)
    return root


def _config(dataset: Path, tmp: Path, steps: int, **extra: str) -> list[str]:
    sets = {
        "name": "tiny-test", "model.preset": "tiny",
        "data.train_dir": str(dataset / "train"), "data.val_dir": str(dataset / "val"),
        "data.spe_dir": str(dataset / "spe"), "data.cache_dir": str(tmp / "cache"),
        "data.hr_patch": "32", "data.batch_size": "2", "data.repeat": "1", "data.workers": "0",
        "val.every": "2", "val.crop": "32", "val.steps": "2",
        "run.steps": str(steps), "run.checkpoint_every": "100", "run.log_every": "1", "run.threads": "1",
        **extra,
    }
    return [f"{k}={v}" for k, v in sets.items()]


def _losses(run: Path) -> list[tuple[int, str]]:
    with (run / "metrics.csv").open() as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def _run(dataset: Path, tmp: Path, stage: str, out: Path, steps: int, **extra: str) -> Path:
    cfg = load_config(None, _config(dataset, tmp, steps, **extra))
    return train(cfg, stage, out, progress=False)


def _assert_same_state(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a / "state" / "state.safetensors")), load_file(str(b / "state" / "state.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def rrdb_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("rrdb")
    _run(dataset, tmp, "rrdb", tmp / "full", 5)
    return tmp / "full"


def test_rrdb_stage_outputs_and_exact_resume(rrdb_run: Path, dataset: Path, tmp_path: Path) -> None:
    # 4 images, batch 2: two batches per epoch, so resuming at step 3 resumes mid-epoch.
    _run(dataset, tmp_path, "rrdb", tmp_path / "split", 3)
    ckpt = _run(dataset, tmp_path, "rrdb", tmp_path / "split", 5)
    assert _losses(tmp_path / "split") == _losses(rrdb_run)
    assert len(_losses(rrdb_run)) == 5
    _assert_same_state(tmp_path / "split", rrdb_run)

    net, info = load_any(ckpt)
    assert info.name == "tiny-test" and info.training["stage"] == "rrdb" and info.training["steps"] == 5
    ref, _ = load_any(rrdb_run / "checkpoint")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values(),
                                                 strict=True))
    # The logs: CSV with validation PSNR, TensorBoard events, the PNG plot.
    with (rrdb_run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["val_psnr_y"] != "" for r in rows] == [False, True, False, True, True]
    assert 5 < float(rows[1]["val_psnr_y"]) < 60
    assert list((rrdb_run / "tb").glob("events.out.tfevents.*"))
    png = rrdb_run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 300


def test_diffusion_stage_with_structure_ema_and_exact_resume(rrdb_run: Path, dataset: Path,
                                                             tmp_path: Path) -> None:
    extra = {"diffusion.rrdb_checkpoint": str(rrdb_run / "checkpoint"), "optim.ema": "0.9"}
    _run(dataset, tmp_path, "diffusion", tmp_path / "full", 4, **extra)
    _run(dataset, tmp_path, "diffusion", tmp_path / "split", 3, **extra)
    ckpt = _run(dataset, tmp_path, "diffusion", tmp_path / "split", 4, **extra)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")
    _assert_same_state(tmp_path / "split", tmp_path / "full")

    net, info = load_any(ckpt)
    assert info.training["stage"] == "diffusion" and info.training["structure"] is True
    rrdb, _ = load_any(rrdb_run / "checkpoint")
    # The RRDB is frozen: identical to stage 1's. The denoiser carries the EMA weights.
    assert all(torch.equal(a, b) for a, b in zip(net.rrdb.state_dict().values(),
                                                 rrdb.rrdb.state_dict().values(), strict=True))
    state = load_file(str(tmp_path / "full" / "state" / "state.safetensors"))
    for k, v in net.denoise_fn.named_parameters():
        assert torch.equal(v, state[f"ema.{k}"])
    assert any(not torch.equal(v, state[f"model.{k}"]) for k, v in net.denoise_fn.named_parameters())

    # Plain SRDiff (ablation) draws the same noise but trains on it unmodulated: other losses.
    _run(dataset, tmp_path, "diffusion", tmp_path / "plain", 4, **extra, **{"diffusion.structure": "false"})
    assert _losses(tmp_path / "plain") != _losses(tmp_path / "full")
    assert load_any(tmp_path / "plain" / "checkpoint")[1].training["structure"] is False


def test_diffusion_stage_with_real_degradations_resumes_exactly(rrdb_run: Path, dataset: Path,
                                                                tmp_path: Path) -> None:
    """LR patches drawn afresh by the `real` pipeline in a loader worker: a split run is the uninterrupted one."""
    extra = {"diffusion.rrdb_checkpoint": str(rrdb_run / "checkpoint"), "data.degradation.kind": "real",
             "data.workers": "1", "val.degradation": "jpeg75"}
    _run(dataset, tmp_path, "diffusion", tmp_path / "full", 4, **extra)
    _run(dataset, tmp_path, "diffusion", tmp_path / "split", 3, **extra)
    ckpt = _run(dataset, tmp_path, "diffusion", tmp_path / "split", 4, **extra)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")
    _assert_same_state(tmp_path / "split", tmp_path / "full")
    info = load_any(ckpt)[1].training
    assert info["degradation"] == "real" and info["val_degradation"] == "jpeg75"
    _run(dataset, tmp_path, "diffusion", tmp_path / "clean", 4, **{**extra, "data.degradation.kind": "bicubic"})
    assert _losses(tmp_path / "clean") != _losses(tmp_path / "full")


@pytest.mark.parametrize("prediction, base", [("sample", "bicubic"), ("v", "rrdb")])
def test_diffusion_stage_with_other_targets_and_bases(rrdb_run: Path, dataset: Path, tmp_path: Path,
                                                      prediction: str, base: str) -> None:
    """The target and the residual base are model config: trained on, saved, and served as trained."""
    extra = {"diffusion.rrdb_checkpoint": str(rrdb_run / "checkpoint"),
             "model.overrides.prediction": prediction, "model.overrides.residual_base": base}
    ckpt = _run(dataset, tmp_path, "diffusion", tmp_path / "run", 3, **extra)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 3 and all(float(v) > 0 for _, v in losses)
    net, info = load_any(ckpt)
    assert (info.config.prediction, info.config.residual_base) == (prediction, base)
    runtime = TorchRuntime(net, info, torch.device("cpu"))
    lr01 = np.random.default_rng(0).uniform(0, 1, (12, 12, 3)).astype(np.float32)
    for steps in (0, 2):
        out = Upscaler(runtime, tile=0).upscale_rgb(lr01, steps)
        assert out.shape == (48, 48, 3) and np.isfinite(out).all()
    # The fidelity mode is the encoder's own output, whatever the diffusion learned.
    with torch.no_grad():
        sr, _ = net.rrdb(torch.from_numpy(lr01).permute(2, 0, 1)[None] * 2 - 1)
    np.testing.assert_allclose(Upscaler(runtime, tile=0).upscale_rgb(lr01, 0),
                               ((sr[0] + 1) / 2).permute(1, 2, 0).numpy(), atol=1e-5)


def test_diffusion_stage_can_tune_the_encoder(rrdb_run: Path, dataset: Path, tmp_path: Path) -> None:
    """diffusion.encoder_lr > 0: the encoder trains with the denoiser (EMA and exact resume cover both),
    and a run cannot switch between a frozen and a tuned encoder on resume."""
    extra = {"diffusion.rrdb_checkpoint": str(rrdb_run / "checkpoint"), "diffusion.encoder_lr": "0.5",
             "optim.ema": "0.9", "model.overrides.prediction": "sample", "model.overrides.residual_base": "rrdb"}
    _run(dataset, tmp_path, "diffusion", tmp_path / "full", 4, **extra)
    _run(dataset, tmp_path, "diffusion", tmp_path / "split", 3, **extra)
    ckpt = _run(dataset, tmp_path, "diffusion", tmp_path / "split", 4, **extra)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")
    _assert_same_state(tmp_path / "split", tmp_path / "full")
    state = json.loads((tmp_path / "full" / "state" / "state.json").read_text())
    assert [g["lr_scale"] for g in state["param_groups"]] == [1.0, 0.5]
    lr = lr_at(3, load_config(None, _config(dataset, tmp_path, 4, **extra)))
    assert [g["lr"] for g in state["param_groups"]] == pytest.approx([lr, 0.5 * lr])

    net, info = load_any(ckpt)
    assert info.training["encoder_lr"] == 0.5
    rrdb, _ = load_any(rrdb_run / "checkpoint")
    tensors = load_file(str(tmp_path / "full" / "state" / "state.safetensors"))
    moved = [not torch.equal(a, b) for a, b in zip(net.rrdb.state_dict().values(), rrdb.rrdb.state_dict().values(),
                                                   strict=True)]
    assert any(moved)
    for k, v in net.rrdb.named_parameters():  # the served encoder carries the EMA weights too
        assert torch.equal(v, tensors[f"ema.rrdb.{k}"])

    # Stage 1's L1 on the encoder's own output can be added: the same draws, a larger loss.
    _run(dataset, tmp_path, "diffusion", tmp_path / "l1", 2, **extra, **{"diffusion.encoder_l1": "1"})
    assert all(float(a) > float(b) for (_, a), (_, b) in zip(_losses(tmp_path / "l1"), _losses(tmp_path / "full")[:2],
                                                             strict=True))
    assert load_any(tmp_path / "l1" / "checkpoint")[1].training["encoder_l1"] == 1.0
    # A resumed run takes the encoder's lr fraction from the config, not from the saved optimiser groups.
    _run(dataset, tmp_path, "diffusion", tmp_path / "l1", 3,
         **{**extra, "diffusion.encoder_l1": "1", "diffusion.encoder_lr": "0.25"})
    state = json.loads((tmp_path / "l1" / "state" / "state.json").read_text())
    assert [g["lr_scale"] for g in state["param_groups"]] == [1.0, 0.25]

    with pytest.raises(ValueError, match="encoder tuned"):
        _run(dataset, tmp_path, "diffusion", tmp_path / "full", 6, **{**extra, "diffusion.encoder_lr": "0"})
    frozen = {**extra, "diffusion.encoder_lr": "0"}
    with pytest.raises(ValueError, match="encoder_l1 trains the encoder"):  # a frozen encoder: it would do nothing
        _run(dataset, tmp_path, "diffusion", tmp_path / "l1-frozen", 2, **{**frozen, "diffusion.encoder_l1": "1"})
    _run(dataset, tmp_path, "diffusion", tmp_path / "frozen", 2, **frozen)
    with pytest.raises(ValueError, match="encoder frozen"):
        _run(dataset, tmp_path, "diffusion", tmp_path / "frozen", 3, **extra)


@pytest.mark.parametrize("encoder, space", [("rlfb", "lr"), ("rrdb", "lr")])
def test_joint_training_from_scratch_with_the_efficient_shapes(dataset: Path, tmp_path: Path, encoder: str,
                                                                space: str) -> None:
    """No stage-1 checkpoint and a tuned encoder: both parts train together from scratch, and resume exactly."""
    extra = {"diffusion.encoder_lr": "1", "diffusion.encoder_l1": "0.5", "optim.ema": "0.9",
             "model.overrides.prediction": "sample", "model.overrides.residual_base": "rrdb",
             "model.overrides.encoder": encoder, "model.overrides.denoiser_space": space,
             "model.overrides.dim_mults": "[1, 2]"}
    _run(dataset, tmp_path, "diffusion", tmp_path / "full", 4, **extra)
    _run(dataset, tmp_path, "diffusion", tmp_path / "split", 3, **extra)
    ckpt = _run(dataset, tmp_path, "diffusion", tmp_path / "split", 4, **extra)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")
    _assert_same_state(tmp_path / "split", tmp_path / "full")
    net, info = load_any(ckpt)
    assert (info.config.encoder, info.config.denoiser_space) == (encoder, space)
    torch.manual_seed(0)  # run.seed: the weights the run started from
    start = type(net)(info.config)
    assert all(not torch.equal(a, b) for a, b in zip(net.rrdb.parameters(), start.rrdb.parameters(), strict=True))
    with pytest.raises(ValueError, match="multiple of 8"):  # the LR-space U-Net's size rule reaches the patches
        _run(dataset, tmp_path, "diffusion", tmp_path / "bad", 2, **extra, **{"data.hr_patch": "20"})


def test_bad_setups_are_clear_errors(rrdb_run: Path, dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rrdb_checkpoint"):
        _run(dataset, tmp_path, "diffusion", tmp_path / "a", 2)
    with pytest.raises(ValueError, match="holds a 'rrdb' run"):
        # Resuming a stage-1 run directory as stage 2.
        _run(dataset, tmp_path, "diffusion", rrdb_run, 2,
             **{"diffusion.rrdb_checkpoint": str(rrdb_run / "checkpoint")})
    with pytest.raises(ValueError, match="prediction must be one of"):
        _run(dataset, tmp_path, "rrdb", tmp_path / "b", 2, **{"model.overrides.prediction": "noise"})
    # Stage 1 trains only the encoder: the diffusion's target may be chosen after it started.
    _run(dataset, tmp_path, "rrdb", tmp_path / "c", 2)
    _run(dataset, tmp_path, "rrdb", tmp_path / "c", 3, **{"model.overrides.prediction": "sample"})
    assert len(_losses(tmp_path / "c")) == 3
    with pytest.raises(ValueError, match="another model config"):
        _run(dataset, tmp_path, "rrdb", rrdb_run, 6, **{"model.overrides.rrdb_num_feat": "12"})


def test_timesteps_drawn_from_the_served_plan() -> None:
    """plan_prob 0 draws exactly what the uniform draw did (old runs resume bit for bit); above 0 that share of
    the timesteps is the served sampler's (t = 99 for a one-step model), the rest stays uniform."""
    g = torch.Generator().manual_seed(3)
    t = draw_timesteps(64, 100, g, "cpu")
    assert torch.equal(t, torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(3)))
    t = draw_timesteps(4000, 100, torch.Generator().manual_seed(3), "cpu", plan=[99], plan_prob=0.5)
    assert 0.47 < float((t == 99).float().mean()) < 0.53 and int(t.min()) == 0
    t = draw_timesteps(4000, 100, torch.Generator().manual_seed(3), "cpu", plan=[99, 0], plan_prob=1.0)
    assert set(t.tolist()) == {0, 99}
    assert load_config(None, ["diffusion.plan_prob=0.5"]).diffusion.plan_prob == 0.5
    with pytest.raises(ConfigError, match="plan_prob"):
        load_config(None, ["diffusion.plan_prob=1.5"])


def test_plan_steps_sets_the_trained_plan_apart_from_the_served_steps(rrdb_run: Path, dataset: Path,
                                                                       tmp_path: Path) -> None:
    """Unset, diffusion.plan_steps is the model's default steps; set to them it trains the same run; set to other
    steps it draws other timesteps. The checkpoint records the plan it was trained for."""
    extra = {"diffusion.rrdb_checkpoint": str(rrdb_run / "checkpoint"), "diffusion.plan_prob": "1.0"}
    served = default_steps(load_any(_run(dataset, tmp_path, "diffusion", tmp_path / "a", 2, **extra))[1].config)
    same = _run(dataset, tmp_path, "diffusion", tmp_path / "b", 2, **extra, **{"diffusion.plan_steps": str(served)})
    other = _run(dataset, tmp_path, "diffusion", tmp_path / "c", 2, **extra,
                 **{"diffusion.plan_steps": str(served + 1)})
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a") != _losses(tmp_path / "c")
    assert [load_any(c)[1].training["plan_steps"] for c in (same, other)] == [served, served + 1]
    with pytest.raises(ValueError, match=r"set diffusion\.plan_steps"):  # a plan of 0 steps has no timestep
        _run(dataset, tmp_path, "diffusion", tmp_path / "d", 2, **extra,
             **{"model.overrides.extras": '{"default_steps": 0}'})


def test_lr_steps_down_from_decay_start() -> None:
    cfg = load_config(None, ["optim.lr=0.4", "optim.gamma=0.5", "optim.decay_every=10"])
    assert [lr_at(s, cfg) for s in (0, 9, 10, 25)] == [0.4, 0.4, 0.2, 0.1]  # the original's schedule
    cfg = load_config(None, ["optim.lr=0.4", "optim.gamma=0.5", "optim.decay_every=10", "optim.decay_start=100"])
    assert [lr_at(s, cfg) for s in (0, 99, 109, 110, 125)] == [0.4, 0.4, 0.4, 0.2, 0.1]
    cfg = load_config(None, ["optim.lr=0.4", "optim.gamma=0.5", "optim.decay_every=10", "optim.min_lr=0.15"])
    assert [lr_at(s, cfg) for s in (0, 10, 20, 1000)] == [0.4, 0.2, 0.15, 0.15]


def test_resume_with_a_larger_batch_goes_on_where_the_epoch_was(dataset: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    # 4 images, batch 2: step 3 stops one batch (2 samples) into epoch 1. With batch 4 an epoch is one batch, so
    # those 2 samples round up to a whole epoch: it goes on with epoch 2 (it once looped on empty epochs forever).
    out = tmp_path / "run"
    _run(dataset, tmp_path, "rrdb", out, 3)
    with caplog.at_level(logging.INFO, logger="training.train"):
        _run(dataset, tmp_path, "rrdb", out, 5, **{"data.batch_size": "4"})
    assert "going on at batch 0 of epoch 2" in caplog.text
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4, 5]
    assert json.loads((out / "state" / "state.json").read_text())["batch_size"] == 4


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "samdiffsr", "train", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_sigterm_writes_a_checkpoint_and_resumes(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # With a loader worker, and the signal sent to the whole process group as Ctrl-C and `timeout` do: the
    # worker must leave the stop to the trainer, not die and take the run down without a checkpoint.
    sets = _config(dataset, tmp_path, 100000, **{"val.every": "0", "data.repeat": "50", "data.workers": "1"})
    args = _cli("rrdb", "--out", str(out), "--no-progress", *[x for s in sets for x in ("--set", s)])
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / "metrics.csv").exists() and len((out / "metrics.csv").read_text().splitlines()) > 3:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "stopped at step" in output
    step = json.loads((out / "state" / "state.json").read_text())["step"]
    assert 3 <= step < 100000
    net, info = load_any(out / "checkpoint")
    assert info.training["steps"] == step
    # The same command resumes from there (here with a smaller step target: it just finishes).
    sets2 = [s if not s.startswith("run.steps=") else f"run.steps={step + 1}" for s in sets]
    res = subprocess.run(_cli("rrdb", "--out", str(out), "--no-progress",
                              *[x for s in sets2 for x in ("--set", s)]),
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"resumed {out / 'state'} at step {step}" in res.stderr
    assert load_any(out / "checkpoint")[1].training["steps"] == step + 1


def test_ddp_two_cpu_processes_with_torchrun(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    sets = _config(dataset, tmp_path, 3, **{"val.every": "3"})
    args = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "samdiffsr",
            "train", "rrdb", "--out", str(out), "--no-progress", *[x for s in sets for x in ("--set", s)]]
    res = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 process(es)" in res.stderr
    net, info = load_any(out / "checkpoint")
    assert info.training["steps"] == 3 and info.training["batch_size"] == 4
    assert [s for s, _ in _losses(out)] == [1, 2, 3]
    assert (out / "curves.png").exists()


def test_cli_rejects_a_bad_config(tmp_path: Path) -> None:
    res = subprocess.run(_cli("rrdb", "--out", str(tmp_path / "x"), "--set", "optim.lr=-1"), cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "optim.lr" in res.stderr and "Traceback" not in res.stderr


def test_a_fresh_run_starts_from_init_weights(dataset: Path, tmp_path: Path) -> None:
    """run.init: a new stage-2 run starts from a trained network's denoiser, with the encoder of
    diffusion.rrdb_checkpoint; a network of another shape is refused."""
    from training.build import build_model

    rrdb = _run(dataset, tmp_path, "rrdb", tmp_path / "rrdb", 2)
    other_rrdb = _run(dataset, tmp_path, "rrdb", tmp_path / "rrdb2", 3)
    first = _run(dataset, tmp_path, "diffusion", tmp_path / "d1", 2, **{"diffusion.rrdb_checkpoint": str(rrdb)})
    cfg = load_config(None, _config(dataset, tmp_path, 2, **{"diffusion.rrdb_checkpoint": str(other_rrdb),
                                                             "run.init": str(first)}))
    net = build_model(cfg, "diffusion", 0)
    trained, _ = load_any(first)
    encoder, _ = load_any(other_rrdb)
    for name, ref in (("denoise_fn", trained.denoise_fn), ("rrdb", encoder.rrdb)):
        for k, v in ref.state_dict().items():
            assert torch.equal(getattr(net, name).state_dict()[k], v), (name, k)
    # The checkpoint says where its weights started.
    assert load_any(first)[1].training["init"] is None
    init_run = _run(dataset, tmp_path, "diffusion", tmp_path / "d2", 1, **{"diffusion.rrdb_checkpoint": str(other_rrdb),
                                                                          "run.init": str(first)})
    assert load_any(init_run)[1].training["init"] == str(first)
    wider = {"diffusion.rrdb_checkpoint": str(other_rrdb), "run.init": str(first), "model.overrides.hidden_size": "16"}
    cfg = load_config(None, _config(dataset, tmp_path, 2, **wider))
    with pytest.raises(ValueError, match="does not match"):
        build_model(cfg, "diffusion", 0)


def test_a_pruned_encoder_starts_from_the_whole_ones_first_blocks(dataset: Path, tmp_path: Path) -> None:
    """run.init of a network whose pretrained encoder keeps fewer blocks (`rfdn:3+rlfn`) than the init's
    (`rfdn+rlfn`): the kept blocks, the fusion's weights for them, RLFN and the denoiser come from the init."""
    from model.checkpoint import save_random_checkpoint
    from model.config import PRESETS
    from training.build import build_model

    shape = {"encoder": "rfdn+rlfn", "denoiser_space": "lr", "prediction": "sample", "residual_base": "rrdb"}
    whole = save_random_checkpoint(tmp_path / "whole", dataclasses.replace(PRESETS["tiny"], **shape), "whole")
    sets = {f"model.overrides.{k}": v for k, v in shape.items()} | {"model.overrides.encoder": "rfdn:3+rlfn",
                                                                     "run.init": str(whole)}
    net = build_model(load_config(None, _config(dataset, tmp_path, 1, **sets)), "rrdb", 0)
    init, _ = load_any(whole)
    mine, theirs = net.state_dict(), init.state_dict()
    assert not any(".B4." in k for k in mine) and any(".B4." in k for k in theirs)
    fusion = "rrdb.nets.rfdn.c.0.weight"
    assert torch.equal(mine[fusion], theirs[fusion][:, : 3 * 50])
    assert all(torch.equal(v, theirs[k]) for k, v in mine.items() if k != fusion)


def test_windows_resume_exactly_from_an_exported_folder_with_a_sharded_state(dataset: Path, tmp_path: Path) -> None:
    """Two windows, each on a fresh run directory (a fresh machine) that starts from the last window's exported
    folder, end where one uninterrupted run ends; the exported state is sharded into small files, and a second
    import into a run directory that is as far already changes nothing."""
    from training.state import read_state_tensors
    from training.window import check_transfer

    _run(dataset, tmp_path, "rrdb", tmp_path / "full", 5)
    sets = [f"--set={kv}" for kv in _config(dataset, tmp_path, 3, **{"run.state_shard_mb": "0.05",
                                                                    "run.checkpoint_dtype": "fp16"})]
    first = [sys.executable, "-m", "samdiffsr", "train", "rrdb", *sets, "--no-progress"]
    subprocess.run([*first, "--out", str(tmp_path / "w1"), "--export", str(tmp_path / "out1")], check=True,
                   env=_env(), cwd=ROOT, capture_output=True)
    exported = tmp_path / "out1"
    assert sorted(p.name for p in exported.iterdir()) == ["checkpoint", "metrics.csv", "state", "window.json"]
    shards = sorted(p.name for p in (exported / "state").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"state-00001-of-{len(shards):05d}.safetensors"
    figures = json.loads((exported / "window.json").read_text())
    assert figures["start_step"] == 0 and figures["step"] == 3 and figures["device"] == "cpu"
    assert figures["steps_per_s"] > 0 and 0 <= figures["data_wait_share"] < 1 and figures["gpu_busy_percent"] is None
    assert check_transfer(exported, max_files=16, max_file_mib=16) == []
    weights = load_file(str(exported / "checkpoint" / "model.safetensors"))  # served weights stored in fp16
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    assert check_transfer(exported, max_files=2, max_file_mib=0.01)  # too many files, too large

    second = [*first[:-1], "--set=run.steps=5", "--no-progress"]
    for _ in range(2):  # the second time, w2 is as far as out1 already: it goes on from its own state
        subprocess.run([*second, "--out", str(tmp_path / "w2"), "--resume-from", str(exported),
                        "--export", str(tmp_path / "out2")], check=True, env=_env(), cwd=ROOT, capture_output=True)
        assert json.loads((tmp_path / "out2" / "window.json").read_text())["step"] == 5
    full = load_file(str(tmp_path / "full" / "state" / "state.safetensors"))
    windowed = read_state_tensors(tmp_path / "out2" / "state")
    assert full.keys() == windowed.keys() and all(torch.equal(full[k], windowed[k]) for k in full)
    assert _losses(tmp_path / "out2") == _losses(tmp_path / "full")


def test_checkpoints_also_come_by_the_clock(dataset: Path, tmp_path: Path) -> None:
    saved: list[int] = []
    cfg = load_config(None, _config(dataset, tmp_path, 3, **{"run.checkpoint_minutes": "1e-5"}))
    train(cfg, "rrdb", tmp_path / "run", progress=False, on_save=lambda t: saved.append(t.step))
    assert saved == [1, 2, 3]  # every step takes longer than 0.6 ms; checkpoint_every (100) alone would save once
    saved.clear()
    train(load_config(None, _config(dataset, tmp_path, 5)), "rrdb", tmp_path / "run", progress=False,
          on_save=lambda t: saved.append(t.step))
    assert saved == [5]


def test_the_gpu_window_script_packs_a_shard_and_trains_two_windows_in_a_row(dataset: Path, tmp_path: Path) -> None:
    """`bench/gpu_window.sh` as the device tool runs it, here on the CPU with a tiny config: window 1 on photos
    0 and 2, window 2 on photos 1 and 3 going on exactly from window 1's exported state."""
    from training.masks import encode_rle

    masks = tmp_path / "masks"
    masks.mkdir()
    for photo in (dataset / "train").glob("*.png"):
        m = np.zeros((64, 64), bool)
        m[8:40, 4:50] = True
        (masks / f"{photo.stem}.json").write_text(json.dumps([{"segmentation": encode_rle(m), "area": int(m.sum())}]))
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({
        "name": "tiny-window", "model": {"preset": "tiny", "overrides": {"prediction": "sample",
                                                                          "residual_base": "rrdb"}},
        "data": {"hr_patch": 32, "batch_size": 2, "repeat": 2, "workers": 0},
        "val": {"every": 1000, "crop": 32, "max_images": 1, "steps": 1},
        "diffusion": {"encoder_lr": 1.0, "encoder_l1": 0.5},
        "run": {"steps": 1000, "checkpoint_every": 1000, "checkpoint_minutes": 0.01, "state_shard_mb": 0.02,
                "checkpoint_dtype": "fp16", "threads": 1}}))
    env = {**_env(), "CORPUS": str(dataset), "MASKS": str(masks), "WINDOW": str(tmp_path / ".window"),
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    script = [str(ROOT / "bench" / "gpu_window.sh")]
    steps = []
    for window in (1, 2):
        out = tmp_path / f"out{window}"
        out.mkdir()
        prev = [str(tmp_path / "out1")] if window == 2 else []
        packed = subprocess.run(["bash", *script, "pack", str(window - 1), "2", *prev], env=env, capture_output=True,
                                text=True, check=True)
        assert packed.stdout.startswith("2 photos;"), packed.stdout
        ran = subprocess.run(["bash", *script, "run", "0.04", str(config)], env={**env, "OUT": str(out)},
                             capture_output=True, text=True, check=True, timeout=300)
        assert ran.stdout.rstrip().endswith("files > 8"), ran.stdout[-500:]  # tiny shards: too many to come back
        figures = json.loads((out / "window.json").read_text())
        assert figures["state_exported"] and (out / "train.log").exists()
        steps.append((figures["start_step"], figures["step"]))
    assert steps[0][0] == 0 and steps[1][0] == steps[0][1] > 0 and steps[1][1] > steps[1][0], steps


def test_distillation_targets_are_the_teachers_upscale_cached_and_blended(rrdb_run: Path, dataset: Path,
                                                                          tmp_path: Path) -> None:
    """data.teacher: the teacher's image of each training LR is computed once (as served: tiles, flips averaged),
    cached under a key of its weights and settings, and a patch's target is the blend of its crop and the HR's."""
    from training.data import PatchDataset, prepare_images
    from training.teacher import teacher_targets

    images = prepare_images(dataset / "train", tmp_path / "cache", 4)
    paths = teacher_targets(images, rrdb_run / "checkpoint", steps=0, ensemble=2, tile=0, precision="fp32",
                            device="cpu")
    net, info = load_any(rrdb_run / "checkpoint")
    upscaler = Upscaler(TorchRuntime(net, info, torch.device("cpu")), tile=0)
    for item, path in zip(images, paths, strict=True):
        hr, lr = item.load()
        expect = upscaler.upscale_rgb(np.asarray(lr, np.float32) / 255, steps=0, ensemble=2)
        got = np.load(path)
        assert got.dtype == np.uint8 and got.shape == hr.shape
        assert np.abs(got.astype(np.float32) - expect * 255).max() <= 0.5 + 1e-3
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert teacher_targets(images, rrdb_run / "checkpoint", 0, 2, 0, "fp32", "cpu") == paths  # cached
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    others = teacher_targets(images, rrdb_run / "checkpoint", 0, 1, 0, "fp32", "cpu")  # other settings, other key
    assert not set(others) & set(paths)

    plain, teacher, blend = (PatchDataset(images, 32, 4, seed=3, teachers=t, teacher_weight=w)
                             for t, w in ((None, 0.0), (paths, 1.0), (paths, 0.25)))
    for i in range(len(images)):
        p, t, b = plain[i], teacher[i], blend[i]
        assert torch.equal(p["lr"], b["lr"]) and torch.equal(p["lr"], t["lr"])
        assert not torch.equal(p["hr"], t["hr"])
        torch.testing.assert_close(b["hr"], torch.lerp(p["hr"], t["hr"], 0.25))
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        teacher_targets(images, dataset / "train", 0, 1, 0, "fp32", "cpu")
    with pytest.raises(ValueError, match="teacher images"):
        PatchDataset(images, 32, 4, teachers=paths[:1], teacher_weight=0.5)


def test_a_student_distilled_from_a_teacher_moves_towards_it(rrdb_run: Path, dataset: Path, tmp_path: Path) -> None:
    """Stage 1 with data.teacher (weight 1) trains a fresh encoder towards the teacher's images: it ends nearer to
    them than it starts and than the same run towards the HR photos, and its checkpoint names the teacher."""
    from training.data import prepare_images
    from training.teacher import teacher_targets

    teacher = {"data.teacher.checkpoint": str(rrdb_run / "checkpoint"), "data.teacher.weight": "1.0",
               "data.teacher.steps": "0",
               "data.teacher.ensemble": "1", "data.teacher.tile": "0", "data.teacher.precision": "fp32"}
    common = {"optim.lr": "2e-3", "run.seed": "7", "val.every": "0"}
    start = _run(dataset, tmp_path, "rrdb", tmp_path / "start", 1, **{**common, "optim.lr": "1e-12"})
    student = _run(dataset, tmp_path, "rrdb", tmp_path / "student", 40, **common, **teacher)
    on_hr = _run(dataset, tmp_path, "rrdb", tmp_path / "on-hr", 40, **common)
    images = prepare_images(dataset / "train", tmp_path / "cache", 4)
    targets = teacher_targets(images, rrdb_run / "checkpoint", 0, 1, 0, "fp32", "cpu")

    def distance(ckpt: Path) -> float:
        net, info = load_any(ckpt)
        up = Upscaler(TorchRuntime(net, info, torch.device("cpu")), tile=0)
        return float(np.mean([np.abs(up.upscale_rgb(np.asarray(item.load()[1], np.float32) / 255, steps=0)
                                     - np.load(t) / 255).mean() for item, t in zip(images, targets, strict=True)]))

    d_start, d_student, d_hr = distance(start), distance(student), distance(on_hr)
    assert d_student < 0.8 * d_start and d_student < d_hr, (d_start, d_student, d_hr)
    assert load_any(student)[1].training["teacher"]["checkpoint"] == str(rrdb_run / "checkpoint")
    assert load_any(on_hr)[1].training["teacher"] is None


def test_stage_one_can_train_on_the_squared_error(rrdb_run: Path, dataset: Path, tmp_path: Path) -> None:
    """optim.pixel_loss=l2: stage 1's loss is the mean squared error of the encoder's image, recorded in the
    checkpoint (the L1 is the default)."""
    from training.objectives import RRDBObjective

    net, _ = load_any(rrdb_run / "checkpoint")
    lr, hr = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    out, _ = net.rrdb(lr)
    torch.testing.assert_close(RRDBObjective(net, "l2")(lr, hr), torch.nn.functional.mse_loss(out, hr))
    torch.testing.assert_close(RRDBObjective(net)(lr, hr), torch.nn.functional.l1_loss(out, hr))
    ckpt = _run(dataset, tmp_path, "rrdb", tmp_path / "l2", 2, **{"optim.pixel_loss": "l2", "val.every": "0"})
    assert load_any(ckpt)[1].training["pixel_loss"] == "l2"
    assert load_any(rrdb_run / "checkpoint")[1].training["pixel_loss"] == "l1"


def test_frozen_parameters_stay_as_the_init_had_them(dataset: Path, tmp_path: Path) -> None:
    """optim.frozen holds the named module's parameters fixed while the rest trains (a pruned member of a pair
    learning beside its partner kept as it is); a name that matches nothing is refused."""
    from model.checkpoint import save_random_checkpoint
    from model.config import PRESETS

    shape = {"encoder": "rfdn+rlfn", "denoiser_space": "lr", "prediction": "sample", "residual_base": "rrdb"}
    init = save_random_checkpoint(tmp_path / "init", dataclasses.replace(PRESETS["tiny"], **shape), "init")
    sets = {f"model.overrides.{k}": v for k, v in shape.items()} | {"run.init": str(init), "optim.lr": "1e-3",
                                                                     "optim.frozen": "[rrdb.nets.rfdn]"}
    ckpt = _run(dataset, tmp_path, "rrdb", tmp_path / "run", 2, **sets)
    before, after = load_any(init)[0].state_dict(), load_any(ckpt)[0].state_dict()
    rfdn = [k for k in after if k.startswith("rrdb.nets.rfdn.")]
    rest = [k for k in after if k.startswith(("rrdb.nets.rlfn.", "rrdb.mix"))]
    assert rfdn and all(torch.equal(after[k], before[k]) for k in rfdn)
    assert any(not torch.equal(after[k], before[k]) for k in rest)
    with pytest.raises(ValueError, match=r"no parameter or module 'rrdb\.nets\.safmn'"):
        _run(dataset, tmp_path, "rrdb", tmp_path / "bad", 1, **(sets | {"optim.frozen": "[rrdb.nets.safmn]"}))
