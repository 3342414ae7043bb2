"""Export to TorchScript and ONNX, and parity of the three runtime backends with eager torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REFERENCE
from PIL import Image

from model.imaging import decode_image
from model.runtime import BACKENDS, OnnxRuntime, load_runtime
from model.upscale import Upscaler
from samdiffsr.cli import main


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original authors' (tiny) checkpoint, imported into our format."""
    out = tmp_path_factory.mktemp("imported") / "tiny-upstream"
    assert main(["import-upstream", str(REFERENCE / "upstream_checkpoint.ckpt"), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def runtimes(imported: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    exports = tmp_path_factory.mktemp("exports")
    return {b: load_runtime(imported, b, "cpu", export_dir=exports) for b in BACKENDS}


def test_export_command_writes_both_formats(imported: Path, tmp_path: Path) -> None:
    assert main(["export", str(imported), str(tmp_path / "exp")]) == 0
    meta = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert meta["formats"] == ["onnx", "torchscript"]
    for f in ("encoder.onnx", "denoiser.onnx", "encoder.ts.pt", "denoiser.ts.pt"):
        assert (tmp_path / "exp" / f).stat().st_size > 0


def test_torchscript_export_fixes_no_device(imported: Path, tmp_path: Path) -> None:
    """A trace records the device of tensors made inside forward; the export must run where it is loaded
    (traced here on the CPU, served on a GPU). No GPU here, so the graphs are read."""
    assert main(["export", str(imported), str(tmp_path / "exp")]) == 0
    for f in ("encoder.ts.pt", "denoiser.ts.pt"):
        graph = str(torch.jit.load(str(tmp_path / "exp" / f)).inlined_graph)
        assert 'Device = prim::Constant[value="cpu"]' not in graph, f


@pytest.mark.parametrize("batch, lr", [(1, 8), (3, 12), (5, 20)])
def test_backends_match_eager_torch(runtimes: dict, batch: int, lr: int) -> None:
    torch.manual_seed(batch)
    img_lr = torch.rand(batch, 3, lr, lr) * 2 - 1
    ref_cond, ref_sr = runtimes["torch"].encode(img_lr)
    assert ref_sr.shape == (batch, 3, lr * 4, lr * 4)
    x = torch.randn(batch, 3, lr * 4, lr * 4)
    t = torch.randint(0, 100, (batch,))
    ref_eps = runtimes["torch"].denoise(x, t, ref_cond)
    for name in ("torchscript", "onnx"):
        cond, sr = runtimes[name].encode(img_lr)
        eps = runtimes[name].denoise(x, t, ref_cond)
        assert cond.shape == ref_cond.shape and sr.shape == ref_sr.shape and eps.shape == ref_eps.shape
        assert torch.allclose(cond, ref_cond, atol=1e-4), name
        assert torch.allclose(sr, ref_sr, atol=1e-4), name
        assert torch.allclose(eps, ref_eps, atol=1e-4), name


def test_encode_image_is_the_encoders_image_without_the_condition(runtimes: dict) -> None:
    """`encode_image` (what steps=0 needs) gives `encode`'s image on every backend; eager torch does not make the
    U-Net's condition for it (its projection is never called)."""
    img_lr = torch.rand(2, 3, 12, 12) * 2 - 1
    for name, rt in runtimes.items():
        assert torch.equal(rt.encode_image(img_lr), rt.encode(img_lr)[1]), name
    calls = []
    hook = runtimes["torch"].net.denoise_fn.cond_proj.register_forward_hook(lambda *_: calls.append(1))
    try:
        runtimes["torch"].encode_image(img_lr)
        assert not calls
        runtimes["torch"].encode(img_lr)
        assert calls
    finally:
        hook.remove()


def test_onnx_runs_on_cpu_provider_here(runtimes: dict) -> None:
    rt = runtimes["onnx"]
    assert isinstance(rt, OnnxRuntime)
    assert rt.providers[-1] == "CPUExecutionProvider"


def test_imported_checkpoint_upscales_a_photo_through_all_backends(runtimes: dict, photo: Path) -> None:
    img = decode_image(photo)
    img.rgb = img.rgb[100:140, 150:200]  # a 50x40 crop of a real photo
    for steps in (4, 0):
        outs = {name: Upscaler(rt, tile=24, overlap=4).upscale(img, steps=steps, seed=11).rgb
                for name, rt in runtimes.items()}
        assert outs["torch"].shape == (160, 200, 3)
        for name in ("torchscript", "onnx"):
            assert np.abs(outs[name] - outs["torch"]).max() < 1e-3, (name, steps)


def test_export_is_reused_and_refreshed(imported: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    exp = tmp_path / "cache"
    load_runtime(imported, "onnx", "cpu", export_dir=exp)
    stamp = (exp / "denoiser.onnx").stat().st_mtime_ns
    rt = load_runtime(imported, "onnx", "cpu", export_dir=exp, threads=1)
    assert (exp / "denoiser.onnx").stat().st_mtime_ns == stamp
    assert rt.denoiser.get_session_options().intra_op_num_threads == 1
    # Other weights in the same export directory: re-exported, not silently reused.
    rt = load_runtime(tiny_checkpoint, "onnx", "cpu", export_dir=exp)
    assert (exp / "denoiser.onnx").stat().st_mtime_ns != stamp
    assert rt.config.rrdb_num_block == 2


def test_unknown_backend_and_missing_cuda(imported: Path) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        load_runtime(imported, "tensorflow")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            load_runtime(imported, "torch", "cuda")


def test_photo_fixture_is_real(photo: Path) -> None:
    assert Image.open(photo).size == (451, 300)
