"""Batch sizing (model/sizing.py), the denoiser's reduced precision and where the denoiser's work goes."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch

from model.runtime import load_runtime, resolve_precision
from model.sizing import CPU_LR_PIXELS_PER_CALL, calibrate_batch, choose_batch, denoiser_work
from model.tiling import plan_tiles
from model.upscale import Upscaler
from samdiffsr.cli import main


@pytest.fixture(scope="module")
def runtime(tiny_checkpoint: Path):
    return load_runtime(tiny_checkpoint, "torch", "cpu")


def test_cpu_rule_takes_a_pixel_budget_per_call_and_a_setting_wins(runtime) -> None:
    assert choose_batch(runtime, (64, 64)).batch == CPU_LR_PIXELS_PER_CALL // 4096
    assert choose_batch(runtime, (32, 32)).batch == CPU_LR_PIXELS_PER_CALL // 1024
    assert choose_batch(runtime, (512, 512)).batch == 1
    assert choose_batch(runtime, (0, 0)).batch == 1  # untiled: each image is one tile
    assert choose_batch(runtime, (64, 64), 16).batch == 16 and choose_batch(runtime, (64, 64), 16).source == "setting"
    with pytest.raises(ValueError):
        choose_batch(runtime, (64, 64), 0)


def test_calibration_picks_one_of_the_candidates(runtime) -> None:
    sizing, per_tile = calibrate_batch(runtime, (8, 8), candidates=(1, 2))
    assert sizing.batch in (1, 2) and set(per_tile) == {1, 2} and all(s > 0 for s in per_tile.values())


def test_work_shares_add_up() -> None:
    grid = plan_tiles(256, 256, 64, 8)  # 5 x 5 tiles: the last ones shifted back over their neighbours
    work = denoiser_work(grid, batch=16, pad_calls=True)
    assert work.useful == 256 * 256 and work.beyond == 0
    assert work.overlap == 25 * 64 * 64 - 256 * 256 and work.batch_pad == 7 * 64 * 64
    assert denoiser_work(grid, batch=1, pad_calls=True).batch_pad == 0
    small = denoiser_work(plan_tiles(10, 30, 64, 8), batch=1, pad_calls=False)
    assert small.useful == 300 and small.overlap == 0 and small.beyond == 64 * 64 - 300
    assert sum(work.share(p) for p in ("useful", "overlap", "beyond", "batch_pad")) == pytest.approx(1)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_outputs_float32_close_to_fp32(tiny_checkpoint: Path, runtime, precision: str) -> None:
    low = load_runtime(tiny_checkpoint, "torch", "cpu", precision=precision)
    assert low.precision == precision
    # bf16 holds the weights in bf16 (no per-call casts); fp16 keeps fp32 weights under autocast.
    assert {p.dtype for p in low.net.parameters()} == {torch.bfloat16 if precision == "bf16" else torch.float32}
    x, t, c = torch.randn(2, 3, 32, 32), torch.tensor([10, 60]), torch.randn(2, runtime.config.hidden_size, 32, 32)
    ref, out = runtime.denoise(x, t, c), low.denoise(x, t, c)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3
    rgb = torch.rand(20, 24, 3).numpy()
    sr = Upscaler(low, tile=16, overlap=4, max_batch=2).upscale_rgb(rgb, steps=2, seed=1)
    assert sr.dtype == "float32" and sr.shape == (80, 96, 3)


def test_precision_needs_the_torch_backend() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, "onnx") == "fp32"
    assert resolve_precision("auto", cpu, "torch") in ("fp32", "bf16", "fp16")
    with pytest.raises(ValueError, match="torch backend"):
        resolve_precision("bf16", cpu, "onnx")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", cpu)


def test_upscale_command_sizes_the_batch_and_takes_a_precision(tiny_checkpoint: Path, photo: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "o.png"
    args = ["upscale", str(photo), str(out), "--checkpoint", str(tiny_checkpoint), "--steps", "1", "--tile", "64"]
    assert main([*args, "--precision", "bf16"]) == 0 and out.stat().st_size > 0
    assert main([*args, "--backend", "onnx", "--precision", "bf16"]) == 2


@pytest.mark.parametrize("size", [70, 128, 256, 300])
def test_snug_tiles_cover_the_image_with_fewer_tiles_and_stitch_exactly(size: int) -> None:
    from model.tiling import stitch

    snug, plain = plan_tiles(size, size, 64, 8, grow=1.25), plan_tiles(size, size, 64, 8)
    assert len(snug) < len(plain) and 64 <= snug.tile <= 80 and snug.tile % 2 == 0
    assert snug.ys[-1] + snug.tile == size and all(b - a <= snug.tile - 8 for a, b in pairwise(snug.ys))
    hr = torch.rand(3, 4 * size, 4 * size)
    tiles = torch.stack([hr[:, 4 * y:4 * (y + snug.tile), 4 * x:4 * (x + snug.tile)] for y, x in snug.origins])
    assert torch.allclose(stitch(tiles, snug), hr, atol=1e-6)
