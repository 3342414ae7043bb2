"""Our checkpoint format and the import of original SAM-DiffSR/SRDiff checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE, SHARED
from safetensors.torch import load_file

from model.checkpoint import CheckpointError
from model.config import PRESETS
from model.diffusion import make_schedule
from model.loading import load_any
from model.upstream import import_upstream_checkpoint
from samdiffsr.cli import main

UPSTREAM = REFERENCE / "upstream_checkpoint.ckpt"


def test_import_tiny_infers_config_and_roundtrips(tmp_path: Path) -> None:
    out = tmp_path / "imported"
    assert main(["import-upstream", str(UPSTREAM), str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "samdiffsr-checkpoint"
    m = meta["model"]
    assert (m["rrdb_num_block"], m["rrdb_num_feat"], m["hidden_size"], m["dim_mults"]) == (3, 8, 8, [1, 2, 3, 4])
    assert m["lr_up_divisor"] == 256.0 and m["scale"] == 4 and m["timesteps"] == 100
    assert meta["provenance"]["source"] == "upstream"

    net, info = load_any(out)
    original = torch.load(UPSTREAM, weights_only=True)["state_dict"]["model"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, original[k]), k
    # Loading the original file directly imports it on the fly, with the same weights.
    net2, _ = load_any(UPSTREAM)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values(), strict=True))


def test_import_accepts_module_prefix_and_ignores_optimizer_state(tmp_path: Path) -> None:
    state = torch.load(UPSTREAM, weights_only=True)["state_dict"]["model"]
    ckpt = {
        "state_dict": {"model": {f"module.{k}": v for k, v in state.items()}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 2e-4}]}],
        "global_step": torch.tensor(1234),
    }
    path = tmp_path / "dp.ckpt"
    torch.save(ckpt, path)
    net, info = import_upstream_checkpoint(path)
    assert info.config.rrdb_num_block == 3
    assert info.provenance["global_step"] == 1234


def test_import_accepts_full_size_layout(tmp_path: Path) -> None:
    manifest = json.loads((SHARED / "reference" / "full_config_manifest.json").read_text())
    buffers = make_schedule(100).buffers()
    state = {k: buffers[k] if k in buffers else torch.zeros(shape) for k, shape in manifest["state_dict_keys"].items()}
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"model": state}, "global_step": 400000}, path)
    out = tmp_path / "full"
    assert main(["import-upstream", str(path), str(out)]) == 0
    net, info = load_any(out)
    assert info.config == PRESETS["paper"]
    assert sum(p.numel() for p in net.parameters()) == manifest["parameters"]
    assert set(load_file(str(out / "model.safetensors"))) == {k for k in manifest["state_dict_keys"]
                                                             if k.startswith(("rrdb.", "denoise_fn."))}


@pytest.mark.parametrize("content, message", [
    (b"this is not a checkpoint", "not a loadable PyTorch checkpoint"),
    (None, "no 'rrdb.*' / 'denoise_fn.*' weights"),
])
def test_import_rejects_non_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None,
                                        message: str) -> None:
    path = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"state_dict": {"model": {"foo.weight": torch.zeros(2)}}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a"):
        import_upstream_checkpoint(path)
    assert main(["import-upstream", str(path), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_import_rejects_inconsistent_shapes(tmp_path: Path) -> None:
    state = torch.load(UPSTREAM, weights_only=True)["state_dict"]["model"]
    state["denoise_fn.downs.1.0.block1.block.1.weight"] = torch.zeros(16, 9, 3, 3)
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {"model": state}}, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        import_upstream_checkpoint(path)


def test_import_refuses_pickled_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model": {"x": Evil()}}}, path, _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match="not a loadable PyTorch checkpoint"):
        import_upstream_checkpoint(path)


def test_our_format_errors(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_any(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a samdiffsr-checkpoint"):
        load_any(bad)
    (bad / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_any(bad)


def test_repack_stores_the_weights_in_half_precision(tmp_path: Path, tiny_checkpoint: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """fp16 storage: half the bytes, the same config, and weights that load (as fp32) equal to the originals
    rounded to fp16; the upscaled image stays within fp16 rounding of the original's."""
    import numpy as np

    from model.runtime import load_runtime
    from model.upscale import Upscaler

    out = tmp_path / "half"
    assert main(["repack", str(tiny_checkpoint), str(out), "--dtype", "fp16"]) == 0
    assert "weights stored as fp16" in capsys.readouterr().out
    stored = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    size = (out / "model.safetensors").stat().st_size
    assert size < 0.6 * (tiny_checkpoint / "model.safetensors").stat().st_size
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_checkpoint / "config.json").read_text())
    net, _ = load_any(out)
    ref, _ = load_any(tiny_checkpoint)
    for (k, v), w in zip(net.state_dict().items(), ref.state_dict().values(), strict=True):
        assert v.dtype == w.dtype and torch.equal(v, w.half().to(w.dtype) if w.is_floating_point() else w), k
    rgb = np.random.default_rng(0).random((24, 20, 3), dtype=np.float32)
    a, b = (Upscaler(load_runtime(p, "torch", "cpu"), tile=16, overlap=4, max_batch=4).upscale_rgb(rgb)
            for p in (tiny_checkpoint, out))
    assert 0 < abs(a - b).mean() < 2e-3 and abs(a - b).max() < 0.1
    assert main(["repack", str(out), str(out)]) == 2


def test_repack_sets_serving_defaults_card_and_name(tmp_path: Path, tiny_checkpoint: Path) -> None:
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"summary": "a tiny model", "validation": {"bicubic": {"steps=0": 1.0}}}))
    out = tmp_path / "shipped"
    assert main(["repack", str(tiny_checkpoint), str(out), "--extra", "default_steps=0", "--extra",
                 "default_tile=256", "--card", str(card), "--name", "tiny-shipped"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["extras"] == {"default_steps": 0, "default_tile": 256}
    assert saved["card"]["summary"] == "a tiny model" and saved["name"] == "tiny-shipped"
    assert main(["repack", str(tiny_checkpoint), str(tmp_path / "bad"), "--extra", "default_steps"]) == 2
