"""Images of any shape through the Upscaler: exact 4x output, modes, EXIF, alpha, tiling and blending."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from model.imaging import (
    DecodedImage,
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    encode_image,
)
from model.runtime import load_runtime
from model.sizing import SNUG_GROW
from model.tiling import extract_tiles, plan_tiles, stitch
from model.upscale import Upscaler, ensemble_flips, flip
from samdiffsr.cli import main


@pytest.fixture(scope="module")
def upscaler(tiny_checkpoint: Path) -> Upscaler:
    return Upscaler(load_runtime(tiny_checkpoint, "torch", "cpu"), tile=16, overlap=4, max_batch=8)


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def crop_of(photo: Path, w: int, h: int) -> Image.Image:
    return Image.open(photo).convert("RGB").crop((40, 30, 40 + w, 30 + h))


@pytest.mark.parametrize("w, h", [(1, 1), (5, 3), (17, 9), (16, 16), (37, 23)])
def test_any_size_gives_exactly_4x(upscaler: Upscaler, photo: Path, w: int, h: int) -> None:
    img = decode_image(png_bytes(crop_of(photo, w, h)))
    out = upscaler.upscale(img, steps=2, seed=0)
    assert out.rgb.shape == (4 * h, 4 * w, 3)
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1


def test_modes_roundtrip(upscaler: Upscaler, photo: Path) -> None:
    base = crop_of(photo, 13, 11)
    gray = decode_image(png_bytes(base.convert("L")))
    assert gray.grayscale and gray.alpha is None
    out = upscaler.upscale(gray, steps=1)
    assert Image.open(io.BytesIO(encode_image(out, "png"))).mode == "L"

    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    dec = decode_image(png_bytes(rgba))
    assert dec.alpha is not None
    out = upscaler.upscale(dec, steps=1)
    res = Image.open(io.BytesIO(encode_image(out, "png")))
    assert res.mode == "RGBA" and res.size == (52, 44)
    # Alpha is upscaled separately and smoothly (bicubic), not diffused.
    a = np.asarray(res.getchannel("A"), dtype=float)
    assert abs(a.mean() - np.asarray(rgba.getchannel("A"), dtype=float).mean()) < 3

    pal = decode_image(png_bytes(base.quantize(16)))
    assert not pal.grayscale and pal.rgb.shape == (11, 13, 3)
    # JPEG output of an RGBA image drops alpha instead of failing.
    assert Image.open(io.BytesIO(encode_image(out, "jpeg", 80))).mode == "RGB"
    assert Image.open(io.BytesIO(encode_image(out, "webp", 80))).size == (52, 44)


def test_sixteen_bit_png(upscaler: Upscaler) -> None:
    a = (np.linspace(0, 65535, 12 * 10).reshape(10, 12)).astype(np.uint16)
    img = decode_image(png_bytes(Image.fromarray(a)))  # mode I;16
    assert img.bit_depth == 16 and img.grayscale
    assert abs(float(img.rgb.max()) - 1.0) < 1e-6
    out = upscaler.upscale(img, steps=1)
    res = Image.open(io.BytesIO(encode_image(out, "png")))
    assert res.size == (48, 40) and res.mode.startswith("I")
    assert np.asarray(res).max() > 255  # still 16-bit


@pytest.mark.parametrize("grayscale, alpha, depth, mode", [
    (True, False, 8, "L"), (True, True, 8, "LA"), (False, False, 8, "RGB"), (False, True, 8, "RGBA"),
    (True, False, 16, "I;16"),
])
def test_png_is_lossless_in_every_layout(grayscale: bool, alpha: bool, depth: int, mode: str) -> None:
    rng = np.random.default_rng(0)
    top = 2**depth - 1
    gray = rng.integers(0, top + 1, (9, 14)) / top
    rgb = np.repeat(gray[:, :, None], 3, 2) if grayscale else rng.integers(0, 256, (9, 14, 3)) / 255
    img = DecodedImage(rgb=rgb.astype(np.float32), alpha=(rng.integers(0, 256, (9, 14)) / 255).astype(np.float32)
                       if alpha else None, grayscale=grayscale, bit_depth=depth)
    res = Image.open(io.BytesIO(encode_image(img, "png")))
    assert res.mode == mode
    back = decode_image(png_bytes(res))
    assert np.array_equal(np.round(back.rgb * top), np.round(img.rgb * top))
    if alpha:
        assert np.array_equal(np.round(back.alpha * 255), np.round(img.alpha * 255))


def test_png_of_a_flat_graphic_is_small() -> None:
    flat = np.zeros((512, 512, 3), np.float32)
    flat[:, 256:] = 0.8
    assert len(encode_image(DecodedImage(rgb=flat), "png")) < 512 * 512 * 3 / 200


def test_exif_rotation_is_applied(photo: Path) -> None:
    img = crop_of(photo, 20, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    dec = decode_image(png_bytes(img, format="JPEG", exif=exif.tobytes()))
    assert dec.rgb.shape == (20, 10, 3)


def test_bad_inputs(photo: Path) -> None:
    data = png_bytes(crop_of(photo, 64, 64))
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image at all")
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=64 * 63)
    # A decompression bomb: a tiny file that claims a huge image is refused before decoding.
    bomb = png_bytes(Image.new("L", (12000, 12000)), optimize=True)
    assert len(bomb) < 200_000
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb, max_pixels=4_000_000)
    # Formats outside the closed list (PostScript would run Ghostscript) are refused, with a clean message.
    with pytest.raises(ImageDecodeError, match="supported format") as err:
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    assert "BytesIO" not in str(err.value)
    # Float TIFFs with NaN are not images.
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(buf, format="TIFF")
    with pytest.raises(ImageDecodeError, match="NaN"):
        decode_image(buf.getvalue())


def test_seed_reproducible_and_batching_invariant(tiny_checkpoint: Path, photo: Path) -> None:
    rt = load_runtime(tiny_checkpoint, "torch", "cpu")
    img = decode_image(png_bytes(crop_of(photo, 30, 30)))
    a = Upscaler(rt, tile=16, overlap=4, max_batch=8).upscale(img, steps=3, sampler="ddpm", seed=7)
    b = Upscaler(rt, tile=16, overlap=4, max_batch=1).upscale(img, steps=3, sampler="ddpm", seed=7)
    c = Upscaler(rt, tile=16, overlap=4, max_batch=8).upscale(img, steps=3, sampler="ddpm", seed=8)
    assert np.allclose(a.rgb, b.rgb, atol=1e-5)
    assert not np.allclose(a.rgb, c.rgb, atol=1e-3)


def test_self_ensemble_averages_the_flips_upscaled(tiny_checkpoint: Path, photo: Path) -> None:
    rt = load_runtime(tiny_checkpoint, "torch", "cpu")
    up = Upscaler(rt, tile=16, overlap=4, max_batch=4)
    rgb = decode_image(png_bytes(crop_of(photo, 30, 22))).rgb
    # steps=0 has no noise, so each member is the flipped image's own upscale, flipped back.
    members = [flip(up.upscale_rgb(np.ascontiguousarray(flip(rgb, f)), steps=0), f) for f in ensemble_flips(4)]
    for n in (2, 4):
        assert np.allclose(up.upscale_rgb(rgb, steps=0, ensemble=n), np.mean(members[:n], axis=0), atol=1e-6)
    # With noise, member m's tiles draw the noise of tiles m * n_tiles + j: not member 0's noise again.
    two = up.upscale_rgb(rgb, steps=2, seed=3, ensemble=2)
    assert two.shape == (88, 120, 3) and not np.allclose(two, up.upscale_rgb(rgb, steps=2, seed=3), atol=1e-3)
    with pytest.raises(ValueError, match="ensemble must be one of 1, 2, 4"):
        up.upscale_rgb(rgb, steps=0, ensemble=3)


def test_condition_computed_once_per_tile(tiny_checkpoint: Path, photo: Path) -> None:
    rt = load_runtime(tiny_checkpoint, "torch", "cpu")
    counts = {"encode": 0, "denoise": 0}
    encode, denoise = rt.encode, rt.denoise

    def counting_encode(x: torch.Tensor) -> torch.Tensor:
        counts["encode"] += x.shape[0]
        return encode(x)

    def counting_denoise(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        counts["denoise"] += 1
        return denoise(x, t, c)

    rt.encode, rt.denoise = counting_encode, counting_denoise
    up = Upscaler(rt, tile=16, overlap=4, max_batch=16)
    up.upscale(decode_image(png_bytes(crop_of(photo, 40, 20))), steps=5)
    n_tiles = len(up.plan(20, 40))
    assert counts == {"encode": n_tiles, "denoise": 5}


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 70), w=st.integers(1, 70), tile=st.sampled_from([8, 16, 24]),
       overlap=st.integers(0, 4), value=st.floats(-1, 1))
def test_tiling_stitches_exactly(h: int, w: int, tile: int, overlap: int, value: float) -> None:
    grid = plan_tiles(h, w, tile, overlap, scale=4)
    lr = torch.full((3, h, w), value)
    tiles = extract_tiles(lr, grid)
    assert tiles.shape == (len(grid), 3, tile, tile)
    hr = stitch(torch.nn.functional.interpolate(tiles, scale_factor=4), grid)
    assert hr.shape == (3, 4 * h, 4 * w)
    assert torch.allclose(hr, torch.full_like(hr, value), atol=1e-5)
    # Every LR pixel is covered by some tile.
    cover = torch.zeros(grid.padded_height, grid.padded_width)
    for y, x in grid.origins:
        cover[y:y + tile, x:x + tile] = 1
    assert cover.all()


def test_blending_has_no_seams(tiny_checkpoint: Path) -> None:
    """A smooth ramp image stays smooth across tile borders."""
    grid = plan_tiles(40, 40, 16, 4, scale=4)
    yy, xx = torch.meshgrid(torch.arange(160.0), torch.arange(160.0), indexing="ij")
    hr_full = ((yy + xx) / 320)[None].repeat(3, 1, 1)
    tiles = extract_tiles(hr_full, grid, 4)
    tiles = tiles + torch.randn(len(grid), 1, 1, 1) * 0.05  # each tile with its own offset
    out = stitch(tiles, grid)
    step = (out[:, :, 1:] - out[:, :, :-1]).abs().max()
    assert step < 0.02  # an unblended 0.05 offset would jump by ~0.1 at a seam


def test_upscale_command_on_folder(tiny_checkpoint: Path, photo: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    crop_of(photo, 21, 14).save(src / "a.png")
    crop_of(photo, 9, 30).convert("L").save(src / "b.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    rc = main(["upscale", str(src), str(out), "--checkpoint", str(tiny_checkpoint), "--steps", "2", "--tile", "16"])
    assert rc == 1  # the broken file is reported, the others are written
    assert Image.open(out / "a.png").size == (84, 56)
    assert Image.open(out / "b.png").size == (36, 120)
    single = tmp_path / "single.webp"
    assert main(["upscale", str(src / "a.png"), str(single), "--checkpoint", str(tiny_checkpoint),
                 "--steps", "1", "--tile", "16", "--sampler", "ddpm", "--seed", "3"]) == 0
    assert Image.open(single).format == "WEBP"


def test_upscale_command_steps_zero_and_ensemble(tiny_checkpoint: Path, photo: Path, tmp_path: Path) -> None:
    """`--steps 0` is the fidelity mode (it once fell back to the default steps); `--ensemble 2` averages the
    mirror in, as `Upscaler.upscale(ensemble=2)` does."""
    src = tmp_path / "a.png"
    crop_of(photo, 21, 14).save(src)
    rt = load_runtime(tiny_checkpoint, "torch", "cpu")
    img = decode_image(src)
    up = Upscaler(rt, tile=16, overlap=4, max_batch=1, grow=SNUG_GROW)
    for args, ref in ((["--steps", "0"], up.upscale(img, steps=0)),
                      (["--steps", "2", "--ensemble", "2"], up.upscale(img, steps=2, ensemble=2))):
        out = tmp_path / "o.png"
        assert main(["upscale", str(src), str(out), "--checkpoint", str(tiny_checkpoint), "--tile", "16",
                     "--overlap", "4", "--batch", "1", "--precision", "fp32", *args]) == 0
        got = np.asarray(Image.open(out), dtype=np.float32) / 255
        assert np.abs(got - ref.rgb).max() <= 0.5 / 255 + 1e-4


@pytest.mark.parametrize("args", [["--steps", "200"], ["--tile", "8", "--overlap", "8"], ["--batch", "0"],
                                  ["--ensemble", "3"]])
def test_upscale_command_rejects_bad_options(tiny_checkpoint: Path, photo: Path, tmp_path: Path, args: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["upscale", str(photo), str(tmp_path / "o.png"), "--checkpoint", str(tiny_checkpoint), *args])
    assert rc == 2 and capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "o.png").exists()


def test_upscale_command_rejects_unknown_output_format(tiny_checkpoint: Path, photo: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["upscale", str(photo), str(tmp_path / "o.bmp"), "--checkpoint", str(tiny_checkpoint)]) == 2
    assert ".png" in capsys.readouterr().err


def test_the_command_as_a_process_exits_with_the_commands_code(tiny_checkpoint: Path, photo: Path,
                                                                tmp_path: Path) -> None:
    src, out = tmp_path / "in.png", tmp_path / "o.png"
    crop_of(photo, 24, 20).save(src)
    ok = subprocess.run([sys.executable, "-m", "samdiffsr", "upscale", str(src), str(out), "--checkpoint",
                         str(tiny_checkpoint), "--tile", "16"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert Image.open(out).size == (96, 80)
    bad = subprocess.run([sys.executable, "-m", "samdiffsr", "upscale", str(tmp_path / "missing.png"), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_decoded_image_type() -> None:
    img = DecodedImage(rgb=np.zeros((3, 4, 3), np.float32))
    assert (img.height, img.width) == (3, 4)


def test_cli_picks_a_model_by_id_from_the_models_dir(models_dir: Path, tmp_path: Path, photo: Path, capsys) -> None:
    src = tmp_path / "in.png"
    Image.open(photo).convert("RGB").crop((0, 0, 24, 20)).save(src)
    common = ["--steps", "1", "--tile", "16", "--seed", "3"]
    assert main(["upscale", str(src), str(tmp_path / "by-id.png"), "--model", "real", "--models-dir",
                 str(models_dir), *common]) == 0
    assert main(["upscale", str(src), str(tmp_path / "by-dir.png"), "--checkpoint", str(models_dir / "real"),
                 *common]) == 0
    assert main(["upscale", str(src), str(tmp_path / "default.png"), "--models-dir", str(models_dir), *common]) == 0
    by_id, by_dir = (tmp_path / "by-id.png").read_bytes(), (tmp_path / "by-dir.png").read_bytes()
    assert by_id == by_dir != (tmp_path / "default.png").read_bytes()
    capsys.readouterr()
    assert main(["upscale", str(src), str(tmp_path / "x.png"), "--model", "nope", "--models-dir",
                 str(models_dir)]) == 2
    assert "no model 'nope'" in (err := capsys.readouterr().err) and "default, real" in err
    with pytest.raises(SystemExit):
        main(["upscale", str(src), str(tmp_path / "x.png"), "--model", "real", "--checkpoint", str(models_dir)])
