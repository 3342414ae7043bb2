"""The architecture options (`ModelConfig.encoder`, `ModelConfig.denoiser_space`): shapes, cost, export, the three
runtimes, tiled upscaling and a stored checkpoint, for every combination."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.checkpoint import load_checkpoint_dir, save_random_checkpoint
from model.config import PRESETS, ModelConfig
from model.imaging import decode_image
from model.network import SRDiffNet
from model.runtime import BACKENDS, load_runtime
from model.upscale import Upscaler

TINY = PRESETS["tiny"]
OPTIONS = [("rrdb", "lr"), ("rlfb", "hr"), ("rlfb", "lr")]


def _cfg(encoder: str, space: str, base: ModelConfig = TINY) -> ModelConfig:
    return dataclasses.replace(base, encoder=encoder, denoiser_space=space)


def _flops(fn, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("encoder, space", [("rrdb", "hr"), *OPTIONS])
def test_shapes_follow_the_config(encoder: str, space: str) -> None:
    cfg = _cfg(encoder, space)
    net = SRDiffNet(cfg).eval()
    img_lr = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        cond, sr = net.encode(img_lr)
        out = net.denoise(torch.randn_like(sr), torch.tensor([3, 90]), cond)
    assert sr.shape == out.shape == (2, 3, 64, 96)
    assert cond.shape == (2, *cfg.cond_shape(16, 24))
    assert cfg.hr_multiple == 2 ** (cfg.levels - 1) * (4 if space == "lr" else 1)
    assert float(sr.min()) >= -1 and float(sr.max()) <= 1


def test_lr_space_denoiser_and_rlfb_encoder_cost_a_fraction() -> None:
    """At the shipped widths, the LR-space U-Net costs about 1/4 of the HR one per step even at twice the width,
    and the RLFB encoder (48 x 6) half of the RRDB (32 x 4)."""
    shipped = dataclasses.replace(PRESETS["small"], rrdb_num_block=4, hidden_size=16, dim_mults=(1, 2, 4))
    img_lr = torch.rand(1, 3, 32, 32) * 2 - 1

    def cost(cfg: ModelConfig) -> tuple[int, int]:
        net = SRDiffNet(cfg).eval()
        with torch.no_grad():
            cond, sr = net.encode(img_lr)
        return _flops(net.encode, img_lr), _flops(net.denoise, sr, torch.tensor([50]), cond)

    enc_hr, den_hr = cost(shipped)
    _, den_lr = cost(dataclasses.replace(shipped, denoiser_space="lr", hidden_size=32))
    enc_rlfb, _ = cost(dataclasses.replace(shipped, encoder="rlfb", rrdb_num_feat=48, rrdb_num_block=6))
    assert den_lr < den_hr / 3
    assert enc_rlfb < enc_hr * 0.55


def test_structure_modulation_is_rearranged_with_the_noise() -> None:
    """The LR-space U-Net sees the HR residual pixel-unshuffled: a change in one HR pixel of x_t reaches the
    prediction through the 16 channels of its LR position, so modulating the HR noise stays exact."""
    cfg = _cfg("rrdb", "lr")
    net = SRDiffNet(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    cond, _ = net.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    x.requires_grad_(True)
    net.denoise(x, torch.tensor([10]), cond)[0, :, 13, 6].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    first = net.denoise_fn.downs[0][0].block1.block[1]
    assert first.in_channels == 3 * cfg.scale**2  # the unshuffled residual


@pytest.mark.parametrize("encoder, space", OPTIONS)
def test_checkpoint_export_and_runtimes_agree(encoder: str, space: str, tmp_path: Path, photo: Path) -> None:
    cfg = _cfg(encoder, space)
    ckpt = save_random_checkpoint(tmp_path / "ckpt", cfg, f"tiny-{encoder}-{space}", seed=3)
    net, info = load_checkpoint_dir(ckpt)
    assert info.config == cfg and isinstance(net.rrdb, type(SRDiffNet(cfg).rrdb))
    runtimes = {b: load_runtime(ckpt, b, "cpu", export_dir=tmp_path / "export") for b in BACKENDS}

    torch.manual_seed(0)
    img_lr = torch.rand(3, 3, 16, 24) * 2 - 1
    ref_cond, ref_sr = runtimes["torch"].encode(img_lr)
    x, t = torch.randn_like(ref_sr), torch.tensor([0, 40, 99])
    ref_out = runtimes["torch"].denoise(x, t, ref_cond)
    for name in ("torchscript", "onnx"):
        cond, sr = runtimes[name].encode(img_lr)
        out = runtimes[name].denoise(x, t, ref_cond)
        assert cond.shape == ref_cond.shape and out.shape == ref_out.shape, name
        for a, b in ((cond, ref_cond), (sr, ref_sr), (out, ref_out)):
            assert torch.allclose(a, b, atol=1e-4), name

    img = decode_image(photo)
    img.rgb = img.rgb[90:146, 140:212]  # 72 x 56, tiled with overlaps
    outs = {name: Upscaler(rt, tile=32, overlap=4).upscale(img, steps=2, seed=5).rgb for name, rt in runtimes.items()}
    assert outs["torch"].shape == (224, 288, 3)
    for name in ("torchscript", "onnx"):
        assert np.abs(outs[name] - outs["torch"]).max() < 1e-3, name


def test_unknown_options_are_refused() -> None:
    with pytest.raises(ValueError, match="encoder must be one of"):
        ModelConfig(encoder="swin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="denoiser_space must be one of"):
        ModelConfig(denoiser_space="latent")  # type: ignore[arg-type]
    old = {k: v for k, v in TINY.to_dict().items() if k not in ("encoder", "denoiser_space")}
    assert ModelConfig.from_dict(old) == TINY  # checkpoints written before the options load as the original shapes


def test_admission_counts_each_models_own_condition() -> None:
    """The memory set aside for a tile in flight counts the condition the encoder really returns: at the output
    size for the original U-Net, 16 times smaller for the LR-space one (whose deep RRDB features are never kept)."""
    from service.admission import active_tile_bytes

    hr = dataclasses.replace(PRESETS["small"], rrdb_num_block=6, rrdb_num_feat=48, hidden_size=48)
    lr = dataclasses.replace(hr, denoiser_space="lr")
    images = 4 * 4 * 3 * 64 * 64 * 16  # x, base, up(LR), result: float32 RGB at 256x256
    assert active_tile_bytes(hr, 64, 64) == images + 4 * 48 * 256 * 256
    assert active_tile_bytes(lr, 64, 64) == images + 4 * 48 * 64 * 64
