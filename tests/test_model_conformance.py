"""Conformance with the original code's tensors, and the verify-reference command on other layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.conformance import compute, verify_reference
from model.diffusion import make_schedule
from model.network import SRDiffNet
from samdiffsr.cli import main
from training.spe import conformance_check


def test_shared_reference_matches_every_tensor() -> None:
    rows = verify_reference(REFERENCE, extra=[conformance_check])
    names = {r.name for r in rows}
    vectors = load_file(str(REFERENCE / "vectors.safetensors"))
    expected_outputs = {"rrdb_out", "denoise_out", "train_x_t", "train_noise_pred", "train_loss", "sample_out",
                        "spe_out", "schedule_mask_coefficient", "train_x_start_residual"}
    expected_outputs |= {k for k in vectors if k.startswith(("rrdb_feature_", "schedule_"))}
    assert expected_outputs <= names
    bad = [(r.name, r.max_abs_err) for r in rows if not r.ok]
    assert not bad
    assert next(r for r in rows if r.name == "sample_out").tol == 1e-4


def test_cli_verify_reference_passes_on_shared_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-reference", str(REFERENCE)]) == 0
    out = capsys.readouterr().out
    assert "20/20 tensors match" in out
    assert "spe_out" in out and "FAIL" not in out


def _write_reference(dst: Path, cfg: ModelConfig, seed: int = 0) -> None:
    """A reference directory of the shared layout for another configuration (original checkpoint format)."""
    torch.manual_seed(seed)
    net = SRDiffNet(cfg)
    state = {**net.state_dict(), **{k: v for k, v in make_schedule(cfg.timesteps).buffers().items()
                                    if k != "mask_coefficient"}}
    dst.mkdir(parents=True)
    torch.save({"state_dict": {"model": {f"module.{k}": v for k, v in state.items()}}, "global_step": 7},
               dst / "upstream_checkpoint.ckpt")
    lr = torch.rand(2, 3, 8, 8) * 2 - 1
    hr_size = 8 * cfg.scale
    up = torch.nn.functional.interpolate(lr, scale_factor=cfg.scale, mode="bicubic")
    vectors = {
        "img_lr": lr, "img_lr_up": up, "img_hr": torch.rand(2, 3, hr_size, hr_size) * 2 - 1,
        "denoise_x": torch.randn(2, 3, hr_size, hr_size), "denoise_t": torch.tensor([3, cfg.timesteps - 1]),
        "train_t": torch.tensor([cfg.timesteps // 2, cfg.timesteps - 1]),
        "train_noise": torch.randn(2, 3, hr_size, hr_size),
        "train_sam_mask": torch.randn(2, 1, hr_size, hr_size),
        "sample_noises": torch.randn(cfg.timesteps + 1, 2, 3, hr_size, hr_size),
    }
    vectors.update(compute(dst, vectors))
    save_file({k: v.contiguous() for k, v in vectors.items()}, str(dst / "vectors.safetensors"))
    (dst / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))


def test_verify_reference_on_another_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ModelConfig(rrdb_num_block=5, rrdb_num_feat=12, rrdb_growth=6, hidden_size=6, dim_mults=(1, 2, 4),
                      timesteps=20)
    ref = tmp_path / "other"
    _write_reference(ref, cfg)
    assert main(["verify-reference", str(ref)]) == 0
    assert "FAIL" not in capsys.readouterr().out

    # A directory whose expected values are off must fail, naming the tensor.
    broken = tmp_path / "broken"
    shutil.copytree(ref, broken)
    vectors = load_file(str(broken / "vectors.safetensors"))
    vectors["denoise_out"] = vectors["denoise_out"] + 1e-3
    save_file(vectors, str(broken / "vectors.safetensors"))
    assert main(["verify-reference", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: denoise_out" in out


def test_verify_reference_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-reference", str(tmp_path)]) == 2
    assert "missing upstream_checkpoint.ckpt" in capsys.readouterr().err
