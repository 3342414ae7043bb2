"""Mask generation (SAM on a tiny random SAM, the classical stand-in), RLE files, SPE embedding, show."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS
from PIL import Image

from samdiffsr.cli import main
from training import sam_compat
from training.masks import (
    ClassicalBackend,
    ClassicalConfig,
    MaskFileError,
    SamBackend,
    SamConfig,
    SamUnavailableError,
    decode_rle,
    embed_masks,
    encode_rle,
    generate_masks,
    read_annotations,
    read_masks,
)
from training.spe import VARIANTS, encode_masks, sincos_position_map

# pycocotools' Cython decoder and numpy 2's __array__(copy=...) protocol
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

KEYS = {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small real images (crops of corpus photos), one of them non-square and odd-sized."""
    folder = tmp_path_factory.mktemp("images")
    Image.open(CORPUS / "val" / "skimage-coffee.png").convert("RGB").crop((200, 100, 296, 171)).save(
        folder / "coffee.png")
    Image.open(CORPUS / "val" / "skimage-chelsea.png").convert("RGB").crop((100, 50, 164, 114)).save(
        folder / "chelsea.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def tiny_sam():
    """A randomly initialised SAM assembled from segment_anything's own modules (64 px input)."""
    sam_compat.import_segment_anything()
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(0)
    size, patch, dim = 64, 8, 16
    return Sam(
        image_encoder=ImageEncoderViT(img_size=size, patch_size=patch, embed_dim=32, depth=1, num_heads=2,
                                      out_chans=dim, mlp_ratio=2.0),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                     input_image_size=(size, size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=1,
                                 iou_head_hidden_dim=16,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32,
                                                               num_heads=2)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def check_rle_file(path: Path, shape: tuple[int, int]) -> list[dict]:
    """The file is SAM's amg.py RLE format and pycocotools decodes every mask at the image's size."""
    from pycocotools import mask as mask_utils

    anns = json.loads(path.read_text())
    assert isinstance(anns, list)
    for ann in anns:
        assert set(ann) == KEYS
        seg = ann["segmentation"]
        assert seg["size"] == list(shape) and isinstance(seg["counts"], str)
        m = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        assert m.shape == shape and int(m.sum()) == ann["area"] == int(mask_utils.area(
            {"size": seg["size"], "counts": seg["counts"].encode()}))
        assert len(ann["bbox"]) == 4 and len(ann["crop_box"]) == 4 and len(ann["point_coords"][0]) == 2
    return anns


def test_sam_path_on_tiny_random_sam(images: Path, tmp_path: Path) -> None:
    sam = tiny_sam()
    # a random model scores badly: accept every mask so the pipeline really writes some
    config = SamConfig(points_per_side=4, pred_iou_thresh=-1e9, stability_score_thresh=0.0)
    backend = SamBackend(sam, config)
    assert sam_compat.torchvision_source is not None
    if sam_compat.torchvision_source == "stand-in":
        assert "torchvision" not in sys.modules  # the stand-in is gone after the import
    out = tmp_path / "masks"
    seen: list[int] = []
    report = generate_masks(images, out, backend, progress=False, on_image=lambda p, n: seen.append(n))
    assert sorted(p.name for p in report.done) == ["chelsea.png", "coffee.png"]
    assert sorted(f.name for f in out.iterdir()) == ["chelsea.json", "coffee.json"]
    coffee = check_rle_file(out / "coffee.json", (71, 96))
    check_rle_file(out / "chelsea.json", (64, 64))
    assert sum(seen) > 0 and any(a["area"] > 0 for a in coffee)
    # resumable: a second run skips both, a deleted file is redone
    (out / "chelsea.json").unlink()
    before = (out / "coffee.json").stat().st_mtime_ns
    report = generate_masks(images, out, backend, progress=False)
    assert [p.name for p in report.skipped] == ["coffee.png"] and [p.name for p in report.done] == ["chelsea.png"]
    assert (out / "coffee.json").stat().st_mtime_ns == before
    # the SPE of SAM's output
    spe = tmp_path / "spe"
    assert not embed_masks(images, out, spe, progress=False).failed
    assert np.load(spe / "coffee.npy").shape == (71, 96)


def test_stand_in_nms_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(60, 2, generator=g) * 30], dim=1)
    scores = torch.rand(60, generator=g)
    scores[7] = scores[3]  # a tie: lower index first
    idxs = (torch.rand(60, generator=g) * 3).floor()
    keep = sam_compat.batched_nms(boxes, scores, idxs, 0.3)
    expected = []
    for i in sorted(range(60), key=lambda i: (-scores[i].item(), i)):
        b = boxes[i].tolist()
        ok = True
        for j in expected:
            if idxs[j] != idxs[i]:
                continue
            c = boxes[j].tolist()
            iw = max(0.0, min(b[2], c[2]) - max(b[0], c[0]))
            ih = max(0.0, min(b[3], c[3]) - max(b[1], c[1]))
            inter = iw * ih
            union = (b[2] - b[0]) * (b[3] - b[1]) + (c[2] - c[0]) * (c[3] - c[1]) - inter
            ok &= inter / union <= 0.3
        if ok:
            expected.append(i)
    assert keep.tolist() == expected
    assert sam_compat.nms(boxes[:0], scores[:0], 0.5).shape == (0,)


def test_sam_checkpoint_errors_are_clear(images: Path, tmp_path: Path) -> None:
    with pytest.raises(SamUnavailableError, match="checkpoint not found"):
        SamBackend.from_checkpoint(SamConfig(model_type="vit_b", checkpoint=tmp_path / "missing.pth"))
    with pytest.raises(SamUnavailableError, match="unknown SAM model type"):
        SamBackend.from_checkpoint(SamConfig(model_type="vit_x", checkpoint=tmp_path / "missing.pth"))
    rc = main(["masks", "generate", str(images), str(tmp_path / "m"), "--checkpoint", str(tmp_path / "no.pth")])
    assert rc == 2 and not (tmp_path / "m").exists()


def test_classical_backend_cli_writes_same_format(images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "masks"
    assert main(["masks", "generate", str(images), str(out), "--backend", "felzenszwalb", "--scale", "100",
                 "--min-size", "20", "--no-progress"]) == 0
    assert "stand-in" in capsys.readouterr().err
    anns = check_rle_file(out / "coffee.json", (71, 96))
    assert len(anns) >= 2
    areas = [a["area"] for a in anns]
    assert areas == sorted(areas, reverse=True)
    masks = read_masks(out / "coffee.json")
    assert not np.any(np.sum(masks, axis=0) > 1)  # an over-segmentation: segments do not overlap
    for ann, m in zip(anns, masks, strict=True):
        x, y = ann["point_coords"][0]
        assert m[int(y), int(x)]
    # SLIC through the API
    slic = ClassicalBackend(ClassicalConfig(method="slic", n_segments=12, min_area_frac=0.0))
    labels_masks = [decode_rle(a["segmentation"]) for a in slic(np.zeros((20, 30, 3), np.uint8) + 90)]
    assert np.all(np.sum(labels_masks, axis=0) == 1)
    # resumable through the CLI as well
    assert main(["masks", "generate", str(images), str(out), "--backend", "slic", "--no-progress"]) == 0
    assert "0 mask files written" in capsys.readouterr().out


def test_classical_backend_downscales_large_images() -> None:
    rng = np.random.default_rng(0)
    rgb = np.zeros((300, 200, 3), np.uint8)
    rgb[:, 100:] = 200
    rgb = (rgb + rng.integers(0, 10, rgb.shape)).astype(np.uint8)
    backend = ClassicalBackend(ClassicalConfig(max_side=64, scale=100, min_size=10))
    anns = backend(rgb)
    assert anns and all(a["segmentation"]["size"] == [300, 200] for a in anns)
    assert sum(a["area"] for a in anns) == 300 * 200


def test_embed_matches_encode_masks_and_empty_gives_zeros(images: Path, tmp_path: Path) -> None:
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    m1 = np.zeros((71, 96), bool)
    m1[10:40, 5:60] = True
    m2 = np.zeros((71, 96), bool)
    m2[30:70, 50:90] = True
    anns = [{"segmentation": encode_rle(m), "area": int(m.sum())} for m in (m1, m2)]
    (masks_dir / "coffee.json").write_text(json.dumps(anns))
    (masks_dir / "chelsea.json").write_text("[]")
    for variant in VARIANTS:
        out = tmp_path / variant
        assert main(["masks", "embed", str(images), str(masks_dir), str(out), "--variant", variant,
                     "--no-progress"]) == 0
        spe = np.load(out / "coffee.npy")
        assert spe.dtype == np.float32 and spe.shape == (71, 96)
        np.testing.assert_array_equal(spe, encode_masks([m1, m2], variant))
        empty = np.load(out / "chelsea.npy")
        assert empty.dtype == np.float32 and empty.shape == (64, 64) and not empty.any()
    # a missing or broken mask file is reported, the rest goes on
    (masks_dir / "chelsea.json").write_text('{"not": "a list"}')
    report = embed_masks(images, masks_dir, tmp_path / "broken", progress=False)
    assert [p.name for p in report.done] == ["coffee.png"] and report.failed[0][0].name == "chelsea.png"
    (masks_dir / "chelsea.json").unlink()
    assert main(["masks", "embed", str(images), str(masks_dir), str(tmp_path / "x"), "--no-progress"]) == 1
    with pytest.raises(MaskFileError, match="image is 10x10"):
        read_masks(masks_dir / "coffee.json", (10, 10))
    (masks_dir / "bad.json").write_text("[{")
    with pytest.raises(MaskFileError, match="not valid JSON"):
        read_annotations(masks_dir / "bad.json")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(24, 32), (32, 24), (17, 9), (1, 5)])
def test_spe_variants_on_non_square_shapes(variant: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    masks = [rng.random(shape) > 0.6, rng.random(shape) > 0.7]
    spe = encode_masks(masks, variant)  # type: ignore[arg-type]
    assert spe.shape == shape and spe.dtype == np.float32 and np.isfinite(spe).all()
    covered = masks[0] | masks[1]
    assert not spe[~covered].any()
    # every region holds one value, later masks win
    assert np.unique(spe[masks[1]]).size == 1
    assert np.unique(spe[masks[0] & ~masks[1]]).size <= 1
    assert not encode_masks([], variant, shape=shape).any()  # type: ignore[arg-type]


def test_sincos_generalises_the_square_original() -> None:
    n = 12  # the original's construction, square only
    v = np.array([[1 / np.power(0.001, 2 * i / n) for i in range(n)]])
    original = np.sin(v) * np.cos(np.sin(v).T)
    np.testing.assert_allclose(sincos_position_map(n, n), original, rtol=0, atol=1e-12)
    wide = sincos_position_map(8, 12)
    assert wide.shape == (8, 12)  # rows use their own frequencies, columns theirs
    np.testing.assert_allclose(wide[0], np.cos(np.sin(1.0)) * np.sin(v[0]), rtol=0, atol=1e-12)


def test_show_writes_png(images: Path, tmp_path: Path) -> None:
    masks_dir = tmp_path / "masks"
    assert main(["masks", "generate", str(images), str(masks_dir), "--backend", "slic", "--n-segments", "8",
                 "--no-progress"]) == 0
    out = tmp_path / "show" / "coffee.png"
    assert main(["masks", "show", str(images / "coffee.png"), str(masks_dir), str(out)]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 3 * 96 and img.height > 71
    assert main(["masks", "show", str(images / "coffee.png"), str(masks_dir / "chelsea.json"),
                 str(tmp_path / "bad.png")]) == 2
