"""Narrowing a pretrained member (`samdiffsr narrow`): the least-squares fit, the narrowed network, its checkpoint."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import SHARED
from PIL import Image

from model.attribution import NOTICE
from model.checkpoint import load_checkpoint_dir
from model.config import PRESETS
from model.pretrained import load_published
from model.published import import_pretrained
from samdiffsr.cli import main
from training.narrowing import fit_conv, lr_batches, narrow_rlfn

PRETRAINED = SHARED / "pretrained"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256-px crops of four training photos (a 48-px LR patch needs 192 HR pixels a side)."""
    root = tmp_path_factory.mktemp("narrow-photos")
    for i, src in enumerate(sorted((SHARED / "data" / "corpus-hr" / "train").glob("*.png"))[:4]):
        img = Image.open(src).convert("RGB")
        w, h = img.size
        img.crop((w // 2 - 128, h // 2 - 128, w // 2 + 128, h // 2 + 128)).save(root / f"p{i}.png")
    return root


def test_the_least_squares_fit_recovers_a_convolution_from_its_outputs() -> None:
    torch.manual_seed(0)
    known, fitted = torch.nn.Conv2d(5, 3, 3, 1, 1), torch.nn.Conv2d(5, 3, 3, 1, 1)
    inputs = [torch.randn(2, 5, 12, 12) for _ in range(3)]
    with torch.no_grad():
        fit_conv(fitted, inputs, [known(x) for x in inputs], ridge=0.0)
    assert torch.allclose(fitted.weight, known.weight, atol=1e-4)
    assert torch.allclose(fitted.bias, known.bias, atol=1e-4)


def test_a_narrowed_rlfn_stays_near_the_whole_one(photos: Path, tmp_path: Path) -> None:
    """Refitted, the narrowed network's image is far nearer the whole one's than the same channels cut alone."""
    whole = load_published("rlfn", PRETRAINED / "rlfn")
    batches = lr_batches(photos, tmp_path / "cache", 4, batch=4)
    narrow = narrow_rlfn(whole, 32, batches)
    assert narrow.block_1.c1_r.out_channels == 32 and narrow.block_4.c3_r.in_channels == 32
    cut = copy.deepcopy(narrow)  # the first 32 channels everywhere, nothing refitted
    with torch.no_grad():
        for i in range(1, 5):
            w, c = getattr(whole, f"block_{i}"), getattr(cut, f"block_{i}")
            c.c1_r.weight.copy_(w.c1_r.weight[:32])
            c.c1_r.bias.copy_(w.c1_r.bias[:32])
            c.c2_r.weight.copy_(w.c2_r.weight[:32, :32])
            c.c2_r.bias.copy_(w.c2_r.bias[:32])
            c.c3_r.weight.copy_(w.c3_r.weight[:, :32])
            c.c3_r.bias.copy_(w.c3_r.bias)
        test = lr_batches(photos, tmp_path / "cache", 1, batch=4, seed=1)[0]
        target = whole(test)[0]
        err_narrow = torch.mean((narrow(test)[0] - target) ** 2).item()
        err_cut = torch.mean((cut(test)[0] - target) ** 2).item()
    assert err_narrow < 0.25 * err_cut
    with pytest.raises(ValueError, match="width 48"):
        narrow_rlfn(whole, 48, batches)


def test_narrow_writes_a_checkpoint_that_loads_and_names_what_was_kept(photos: Path, tmp_path: Path,
                                                                       capsys) -> None:
    cfg = dataclasses.replace(PRESETS["tiny"], encoder="rfdn+rlfn", denoiser_space="lr", prediction="sample",
                              residual_base="rrdb")
    pair = import_pretrained(tmp_path / "pair", cfg, {n: PRETRAINED / n for n in cfg.pretrained}, "pair")
    common = ["--train-dir", str(photos), "--cache-dir", str(tmp_path / "cache"), "--patches", "32"]
    assert main(["narrow", str(pair), str(tmp_path / "narrow"), "--width", "32", *common]) == 0
    assert "(rfdn+rlfn/32); mix (member x RGB)" in capsys.readouterr().out
    net, info = load_checkpoint_dir(tmp_path / "narrow")
    assert info.config.encoder == "rfdn+rlfn/32" and info.config.pretrained_widths == {"rlfn": 32}
    assert net.rrdb.nets["rlfn"].block_2.c2_r.weight.shape == (32, 32, 3, 3)
    assert not torch.allclose(net.rrdb.mix, torch.full((2, 3), 0.5))  # refitted
    assert "its blocks narrowed from 48 to 32 channels" in (tmp_path / "narrow" / NOTICE).read_text()
    assert "narrowed" in info.provenance
    for args, message in ((["--member", "safmn"], "'safmn' is not a member"),
                          (["--member", "rfdn"], "only rlfn's blocks can be narrowed")):
        assert main(["narrow", str(pair), str(tmp_path / "x"), "--width", "32", *args, *common]) == 2
        assert message in capsys.readouterr().err
    assert main(["narrow", str(tmp_path / "narrow"), str(tmp_path / "x"), "--width", "16", *common]) == 2
    assert "narrowed already" in capsys.readouterr().err
    # A narrowed network has no published weights to start from.
    narrowed = dataclasses.replace(cfg, encoder="rfdn+rlfn/32")
    with pytest.raises(ValueError, match="no published weights"):
        import_pretrained(tmp_path / "y", narrowed, {n: PRETRAINED / n for n in cfg.pretrained}, "y")
