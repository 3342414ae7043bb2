"""Training data pipeline: aligned HR/LR/SPE patches, augmentation, the cache, bad data, config files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import data as tdata
from training.config import ConfigError, load_config
from training.data import PatchDataset, prepare_images

SCALE = 4


def _photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour image with some edges (uint8 HxWx3)."""
    small = rng.uniform(0, 255, (h // 8 + 1, w // 8 + 1, 3))
    img = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float64)
    img[h // 3:, : w // 2] *= 0.5
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "hr"
    d.mkdir()
    for i, (h, w) in enumerate([(64, 80), (72, 64), (66, 70)]):  # the last one is cropped to 64x68
        Image.fromarray(_photo_like(rng, h, w)).save(d / f"img{i}.png")
    return d


def _position_spe(spe_dir: Path, image_dir: Path) -> None:
    """SPE maps whose value encodes the pixel position (y * 1000 + x), for alignment checks."""
    spe_dir.mkdir(exist_ok=True)
    for p in image_dir.glob("*.png"):
        w, h = Image.open(p).size
        yy, xx = np.mgrid[0:h, 0:w]
        np.save(spe_dir / f"{p.stem}.npy", (yy * 1000 + xx).astype(np.float32))


def _positions(spe_patch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    v = spe_patch[0].numpy().astype(np.int64)
    return v // 1000, v % 1000


@pytest.mark.parametrize("do_augment", [False, True])
def test_patches_are_aligned_and_augmented_consistently(image_dir: Path, tmp_path: Path,
                                                        do_augment: bool) -> None:
    _position_spe(tmp_path / "spe", image_dir)
    items = prepare_images(image_dir, tmp_path / "cache", SCALE, tmp_path / "spe")
    assert [it.stem for it in items] == ["img0", "img1", "img2"]
    ds = PatchDataset(items, hr_patch=32, scale=SCALE, repeat=8, augment=do_augment, seed=3)
    assert len(ds) == 24
    seen_transforms = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s["hr"].shape == (3, 32, 32) and s["lr"].shape == (3, 8, 8) and s["spe"].shape == (1, 32, 32)
        assert s["hr"].dtype == torch.float32 and s["hr"].min() >= 0 and s["hr"].max() <= 1
        hr_full, lr_full = items[i % 3].load()
        ys, xs = _positions(s["spe"])
        # Every HR pixel of the patch is the HR pixel its SPE value points at.
        np.testing.assert_array_equal((s["hr"] * 255).round().byte().permute(1, 2, 0).numpy(), hr_full[ys, xs])
        # Every LR pixel is the LR pixel of the HR block it covers (top-left of the block, /scale).
        blk_y = ys.reshape(8, 4, 8, 4).min(axis=(1, 3))
        blk_x = xs.reshape(8, 4, 8, 4).min(axis=(1, 3))
        assert (blk_y % SCALE == 0).all() and (blk_x % SCALE == 0).all()
        np.testing.assert_array_equal((s["lr"] * 255).round().byte().permute(1, 2, 0).numpy(),
                                      lr_full[blk_y // SCALE, blk_x // SCALE])
        # Which of the 8 flips/rotations was applied: the direction of the row/column gradients.
        seen_transforms.add((int(np.sign(ys[1, 0] - ys[0, 0])), int(np.sign(xs[0, 1] - xs[0, 0]))))
    if do_augment:
        assert len(seen_transforms) > 2
    else:
        assert seen_transforms == {(1, 1)}


def test_lr_is_the_degraded_hr(image_dir: Path, tmp_path: Path) -> None:
    from training.degrade import make_lr

    (item,) = prepare_images(image_dir, tmp_path / "cache", SCALE)[:1]
    hr, lr = item.load()
    assert hr.dtype == np.uint8 and lr.shape == (hr.shape[0] // 4, hr.shape[1] // 4, 3)
    expect = make_lr(torch.from_numpy(np.array(hr)).permute(2, 0, 1).float() / 255, SCALE)
    np.testing.assert_array_equal(lr, (expect * 255).round().byte().permute(1, 2, 0).numpy())


def test_patches_are_deterministic_per_epoch(image_dir: Path, tmp_path: Path) -> None:
    items = prepare_images(image_dir, tmp_path / "cache", SCALE)
    ds = PatchDataset(items, hr_patch=32, scale=SCALE, repeat=2, seed=1)
    a = ds[4]["hr"]
    assert torch.equal(a, PatchDataset(items, 32, SCALE, 2, seed=1)[4]["hr"])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[4]["hr"])


def test_cache_is_reused_and_invalidated_by_changes(image_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = prepare_images(image_dir, cache, SCALE)
    n_files = len(list(cache.iterdir()))
    assert n_files == 6

    def no_decode(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tdata, "decode_image", no_decode)
    again = prepare_images(image_dir, cache, SCALE)
    assert [i.hr_path for i in again] == [i.hr_path for i in first]
    monkeypatch.undo()
    # A changed file gets a new cache entry.
    p = image_dir / "img1.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(p)
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    changed = prepare_images(image_dir, cache, SCALE)
    assert changed[1].hr_path != first[1].hr_path
    assert changed[0].hr_path == first[0].hr_path
    assert not np.asarray(changed[1].load()[0]).any()


def test_bad_images_are_reported_and_skipped(image_dir: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = (image_dir / "img0.png").read_bytes()
    (image_dir / "truncated.png").write_bytes(good[: len(good) // 3])
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image_dir / "small.png")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        items = prepare_images(image_dir, tmp_path / "cache", SCALE, min_hr=32)
    assert [i.stem for i in items] == ["img0", "img1", "img2"]
    text = caplog.text
    assert "broken.png" in text and "truncated.png" in text and "small.png" in text


def test_missing_or_wrong_spe_maps(image_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spe = tmp_path / "spe"
    _position_spe(spe, image_dir)
    (spe / "img1.npy").unlink()
    np.save(spe / "img2.npy", np.zeros((10, 10), np.float32))  # wrong size
    with caplog.at_level(logging.WARNING, logger="training.data"):
        skipped = prepare_images(image_dir, tmp_path / "cache", SCALE, spe, missing_spe="skip")
    assert [i.stem for i in skipped] == ["img0"]
    assert "img1" in caplog.text and "img2" in caplog.text
    zeros = prepare_images(image_dir, tmp_path / "cache", SCALE, spe, missing_spe="zeros")
    assert [(i.stem, i.spe_path is None) for i in zeros] == [("img0", False), ("img1", True), ("img2", True)]
    ds = PatchDataset(zeros, 32, SCALE, augment=False)
    assert ds[1]["spe"].abs().sum() == 0 and ds[0]["spe"].abs().sum() > 0


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        prepare_images(tmp_path / "nope", tmp_path / "cache", SCALE)
    with pytest.raises(ValueError, match="no usable training images"):
        PatchDataset([], 32, SCALE)


def test_model_inputs_use_the_inference_convention(image_dir: Path, tmp_path: Path) -> None:
    from model.config import PRESETS
    from model.upscale import lr_inputs
    from training.data import model_inputs

    items = prepare_images(image_dir, tmp_path / "cache", SCALE)
    batch = torch.utils.data.default_collate([PatchDataset(items, 32, SCALE)[i] for i in range(2)])
    cfg = PRESETS["tiny"]
    img_lr, img_lr_up, img_hr = model_inputs(batch, cfg, "cpu")
    ref_lr, ref_up = lr_inputs(batch["lr"], cfg)
    assert torch.equal(img_lr, ref_lr) and torch.equal(img_lr_up, ref_up)
    assert torch.equal(img_hr, batch["hr"] * 2 - 1)
    assert img_lr_up.shape == img_hr.shape


def test_config_files_and_overrides(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("model: {preset: tiny}\noptim: {lr: 0.001}\ndata: {hr_patch: 32}\n")
    cfg = load_config(y, ["optim.lr=1e-4", "run.steps=7", "model.overrides.hidden_size=16"])
    assert cfg.optim.lr == 1e-4 and cfg.run.steps == 7 and cfg.model.build().hidden_size == 16
    t = tmp_path / "c.toml"
    t.write_text('[model]\npreset = "tiny"\n[data]\nhr_patch = 32\n[optim]\nema = 0.99\n')
    assert load_config(t).optim.ema == 0.99
    shipped = Path(__file__).resolve().parents[1] / "configs" / "cpu-small.yaml"
    assert load_config(shipped).model.build().rrdb_num_block >= 2
    for bad in (["optim.lr=-1"], ["optim.nope=1"], ["data.hr_patch=30"], ["model.preset=huge"],
                ["model.overrides.hidden_size=7"], ["novalue"]):
        with pytest.raises(ConfigError):
            load_config(y, bad)
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.yaml")


def test_a_config_states_what_it_changes_over_its_base(tmp_path: Path) -> None:
    """`base:` (relative to the file): sections merge key by key, lists and scalars replace, overrides come last."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "one.yaml").write_text("model: {preset: tiny, overrides: {hidden_size: 16, dim_mults: [1, 2]}}\n"
                                       "data: {hr_patch: 32, batch_size: 4}\noptim: {lr: 0.001}\n")
    two = tmp_path / "stages" / "two.yaml"
    two.write_text("base: ../one.yaml\nmodel: {overrides: {dim_mults: [1]}}\ndata: {batch_size: 2}\n")
    cfg = load_config(two, ["optim.lr=1e-4"])
    assert cfg.model.overrides == {"hidden_size": 16, "dim_mults": [1]}
    assert (cfg.data.hr_patch, cfg.data.batch_size, cfg.optim.lr) == (32, 2, 1e-4)
    loop = tmp_path / "loop.yaml"
    for text, message in (("base: loop.yaml\n", "comes back to itself"), ("base: missing.yaml\n", "cannot read"),
                          ("base: [1]\n", "must be the path")):
        loop.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(loop)
