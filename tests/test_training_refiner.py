"""The refiner: a diffusion denoiser trained over a frozen encoder (our own, or pretrained networks of the field)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED
from PIL import Image

from model.attribution import NOTICE
from model.loading import load_any
from model.pretrained import load_published
from model.runtime import TorchRuntime
from model.upscale import Upscaler
from training.config import load_config
from training.train import train

PRETRAINED = SHARED / "pretrained"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Crops of real photos: 4 to train on, 2 to validate on, and SPE maps for the training ones."""
    root = tmp_path_factory.mktemp("photos")
    sources = sorted((SHARED / "data" / "corpus-hr" / "train").glob("*.png"))[:6]
    for i, src in enumerate(sources):
        split = "train" if i < 4 else "val"
        (root / split).mkdir(exist_ok=True)
        img = Image.open(src).convert("RGB")
        w, h = img.size
        img.crop((w // 2 - 48, h // 2 - 48, w // 2 + 48, h // 2 + 48)).save(root / split / f"p{i}.png")
    (root / "spe").mkdir()
    for i in range(4):
        np.save(root / "spe" / f"p{i}.npy", np.full((96, 96), 0.05 * i, np.float32))
    return root


def _train(photos: Path, tmp: Path, out: Path, steps: int, **extra: str) -> Path:
    sets = {
        "name": "refiner-test", "model.preset": "tiny", "model.overrides.denoiser_space": "lr",
        "model.overrides.prediction": "sample", "model.overrides.residual_base": "rrdb",
        "model.overrides.dim_mults": "[1, 2]",
        "data.train_dir": str(photos / "train"), "data.val_dir": str(photos / "val"),
        "data.spe_dir": str(photos / "spe"), "data.cache_dir": str(tmp / "cache"),
        "data.hr_patch": "64", "data.batch_size": "4", "data.repeat": "4", "data.workers": "0",
        "val.every": "0", "run.steps": str(steps), "run.checkpoint_every": "1000", "run.log_every": "10",
        "run.threads": "1", "diffusion.plan_prob": "1.0", "diffusion.plan_steps": "1", **extra,
    }
    return train(load_config(None, [f"{k}={v}" for k, v in sets.items()]), "diffusion", out, progress=False)


def _psnr_at(ckpt: Path, photos: Path, steps: int) -> float:
    net, info = load_any(ckpt)
    up = Upscaler(TorchRuntime(net, info, torch.device("cpu")), tile=0)
    errors = []
    for path in sorted((photos / "val").glob("*.png")):
        hr = np.asarray(Image.open(path), dtype=np.float32) / 255
        lr = np.asarray(Image.open(path).resize((24, 24), Image.BICUBIC), dtype=np.float32) / 255
        errors.append(np.mean((np.clip(up.upscale_rgb(lr, steps=steps), 0, 1) - hr) ** 2))
    return float(-10 * np.log10(np.mean(errors)))


def test_a_refiner_over_frozen_published_weights_keeps_them_and_their_notice(photos: Path, tmp_path: Path) -> None:
    ckpt = _train(photos, tmp_path, tmp_path / "run", 3, **{
        "model.overrides.encoder": "rlfn", "diffusion.pretrained_dir": str(PRETRAINED)})
    net, info = load_any(ckpt)
    published = load_published("rlfn", PRETRAINED / "rlfn")
    assert all(torch.equal(a, b) for a, b in zip(net.rrdb.nets["rlfn"].state_dict().values(),
                                                 published.state_dict().values(), strict=True))
    assert "RLFN" in (ckpt / NOTICE).read_text()
    assert info.config.encoder == "rlfn"
    # Its last layer started at zero and has moved: a trained refiner, not the identity.
    assert net.denoise_fn.final_conv[-1].weight.abs().sum() > 0


def test_a_refiner_trained_on_a_tiny_model_improves_on_its_frozen_encoder(photos: Path, tmp_path: Path) -> None:
    """Over our tiny encoder, trained briefly and frozen, the refiner's one step beats the encoder's own image."""
    sets = {"model.overrides.encoder": "rlfb"}
    encoder = _train(photos, tmp_path, tmp_path / "encoder", 40, **sets, **{
        "diffusion.encoder_lr": "1", "diffusion.encoder_l1": "1", "optim.lr": "2e-3"})
    refined = _train(photos, tmp_path, tmp_path / "refiner", 60, **sets, **{
        "diffusion.rrdb_checkpoint": str(encoder), "optim.lr": "1e-3"})
    base, one = _psnr_at(refined, photos, 0), _psnr_at(refined, photos, 1)
    assert base == pytest.approx(_psnr_at(encoder, photos, 0))  # the same frozen encoder
    assert one > base + 0.2, (base, one)
