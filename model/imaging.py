"""Image decoding and encoding: any mode in, float RGB (+ alpha) out, and back. Pillow decodes and writes JPEG
and WebP; PNGs are written by libpng through imagecodecs (faster).

Handles EXIF orientation, grayscale, palette, RGBA/LA (alpha kept apart and upscaled separately),
16-bit PNGs, truncated files and decompression bombs.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

OutputFormat = Literal["png", "jpeg", "webp"]
FORMATS: dict[str, str] = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Input formats Pillow may decode. A closed list: no PostScript/EPS (Pillow would hand those to
# Ghostscript) and no exotic plugins on untrusted uploads.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "TGA", "ICO")
# File name suffixes of the images that folder-wide commands (upscale, masks, training, eval) pick up.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class ImageDecodeError(ValueError):
    """The data is not a decodable image (unknown format, truncated, corrupt)."""


class ImageTooLargeError(ValueError):
    """The image has more pixels than allowed (decompression bombs included)."""


@dataclass
class DecodedImage:
    rgb: np.ndarray  # float32 (H, W, 3) in [0, 1]
    alpha: np.ndarray | None = None  # float32 (H, W) in [0, 1]
    grayscale: bool = False
    bit_depth: int = 8

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def list_images(folder: str | Path) -> list[Path]:
    """Image files (by suffix) directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _to_float(img: Image.Image) -> tuple[np.ndarray, int]:
    """A single-band or RGB image -> float32 array in [0, 1], and its bit depth."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        # 16-bit PNGs decode as I;16 (or I with values up to 65535).
        return (np.clip(a, 0, 65535) / 65535.0).astype(np.float32), 16
    if img.mode == "F":  # float TIFFs: NaN/inf are not pixel values
        a = np.asarray(img, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ImageDecodeError("the image holds NaN or infinite pixel values")
        return np.clip(a, 0, 1), 16
    return np.asarray(img, dtype=np.float32) / 255.0, 8


def icon_frame_sizes(data: bytes) -> list[tuple[int, int]] | None:
    """The real (width, height) of every image in an ICO / CUR file, read from each embedded PNG's IHDR or BMP's
    DIB header (not from the directory, which may lie); None for other files. Pillow decodes an icon's largest
    frame while opening it, so this is what bounds that work before it starts."""
    if len(data) < 6 or data[:4] not in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):
        return None
    (count,) = struct.unpack_from("<H", data, 4)
    sizes = []
    for i in range(count):
        entry = 6 + 16 * i
        if entry + 16 > len(data):
            raise ImageDecodeError("truncated icon directory")
        dir_w, dir_h = data[entry] or 256, data[entry + 1] or 256
        (offset,) = struct.unpack_from("<I", data, entry + 12)
        frame = data[offset:offset + 26]
        if frame[:8] == b"\x89PNG\r\n\x1a\n" and len(frame) >= 24:
            sizes.append(struct.unpack(">II", frame[16:24]))
        elif len(frame) >= 12 and struct.unpack_from("<I", frame)[0] >= 12:  # a DIB header: its height is doubled
            w, h = struct.unpack_from("<ii", frame, 4)
            sizes.append((abs(w), abs(h) // 2))
        else:
            sizes.append((dir_w, dir_h))  # Pillow reports what it cannot read
    return sizes


def check_frames(data: bytes, max_pixels: int | None) -> None:
    """ImageTooLargeError for a container (ICO, CUR) holding an image over `max_pixels`, before Pillow opens it."""
    sizes = icon_frame_sizes(data) if max_pixels is not None else None
    for w, h in sizes or ():
        if w * h > max_pixels:  # type: ignore[operator]
            raise ImageTooLargeError(f"the icon holds a {w}x{h} = {w * h:,}-pixel image; the limit is "
                                     f"{max_pixels:,}")


def decode_image(data: bytes | str | Path | BinaryIO, max_pixels: int | None = None) -> DecodedImage:
    """Decode an image file or bytes. Raises ImageDecodeError / ImageTooLargeError."""
    if isinstance(data, bytes | bytearray | memoryview):
        check_frames(bytes(data), max_pixels)
    src = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(src, formats=INPUT_FORMATS)
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageTooLargeError(f"image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}")
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageTooLargeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"image rejected as a decompression bomb: {e}") from e
    except FileNotFoundError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image in a supported format ({', '.join(INPUT_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"cannot decode image: {e}") from e

    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        img = img.convert("RGB")
    elif mode == "La":
        img = img.convert("LA")
    elif mode == "RGBa":
        img = img.convert("RGBA")

    alpha = None
    if img.mode in ("RGBA", "LA"):
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
        img = img.convert("RGB" if img.mode == "RGBA" else "L")

    if img.mode == "RGB":
        rgb, depth = _to_float(img)
        return DecodedImage(rgb=np.ascontiguousarray(rgb), alpha=alpha, grayscale=False, bit_depth=depth)
    # Single band: L, I;16, I, F.
    gray, depth = _to_float(img)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    return DecodedImage(rgb=rgb, alpha=alpha, grayscale=True, bit_depth=depth)


def resize_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Upscale an alpha channel with bicubic interpolation (alpha is not diffused)."""
    h, w = alpha.shape
    img = Image.fromarray(alpha.astype(np.float32))  # mode F
    out = np.asarray(img.resize((w * scale, h * scale), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(out, 0, 1)


def with_rgb(src: DecodedImage, rgb: np.ndarray, scale: int) -> DecodedImage:
    """The upscaled counterpart of `src`: new RGB, alpha upscaled separately, same mode and depth."""
    alpha = resize_alpha(src.alpha, scale) if src.alpha is not None else None
    return replace(src, rgb=np.clip(np.asarray(rgb, dtype=np.float32), 0, 1), alpha=alpha)


def quantize(a: np.ndarray, depth: int) -> np.ndarray:
    """[0, 1] floats -> 8- or 16-bit pixels: what every encoder of the CLI and the service writes."""
    if depth == 16:
        return np.round(np.clip(a, 0, 1) * 65535).astype(np.uint16)
    return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)


def pixels(img: DecodedImage, fmt: str = "png") -> np.ndarray:
    """The pixels an encoder of `fmt` writes, in the richest layout it takes: (H, W) gray, 8- or 16-bit (16 for a
    16-bit grayscale image without alpha as PNG); (H, W, 2) gray and alpha; (H, W, 3) RGB; (H, W, 4) RGBA."""
    fmt = fmt.lower()
    if img.bit_depth == 16 and fmt == "png" and img.grayscale and img.alpha is None:
        return quantize(img.rgb[:, :, 0], 16)
    base = quantize(img.rgb[:, :, 0] if img.grayscale else img.rgb, 8)
    return np.dstack((base, quantize(img.alpha, 8))) if img.alpha is not None and fmt != "jpeg" else base


def png_bytes(pix: np.ndarray) -> bytes:
    """(H, W[, C]) uint8 or uint16 pixels as PNG, by libpng through imagecodecs (it releases the GIL).

    zlib level 1 with run-length matching (Z_RLE) and the Paeth filter on every row: a 2048x2048 upscaled photo
    encodes in half Pillow's time at the same size (Pillow tries every filter on every row), and a flat
    2048x2048 graphic still takes 16 kB (docs/benchmarks.md)."""
    import imagecodecs  # here: only what writes PNGs loads it (a training process never does)

    return imagecodecs.png_encode(np.ascontiguousarray(pix), level=1, strategy=imagecodecs.PNG.STRATEGY.RLE,
                                  filter=imagecodecs.PNG.FILTER.PAETH)


def encode_pixels(pix: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """Pixels in a layout of `pixels` as PNG (`png_bytes`), JPEG or WebP (Pillow, `quality` 1-100), the one encoder
    of the CLI and the service."""
    key = fmt.lower()
    if key not in FORMATS:
        raise ValueError(f"unsupported output format {fmt!r}; choose png, jpeg or webp")
    if not 1 <= quality <= 100:
        raise ValueError("quality must be in 1..100")
    if FORMATS[key] == "PNG":
        return png_bytes(pix)
    buf = io.BytesIO()
    Image.fromarray(pix).save(buf, format=FORMATS[key], quality=quality)
    return buf.getvalue()


def encode_image(img: DecodedImage, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode to PNG (lossless), JPEG or WebP (lossy, `quality` 1-100)."""
    return encode_pixels(pixels(img, fmt), fmt, quality)


def format_for(path: str | Path) -> str:
    """The output format a file name asks for by its extension (none: png). ValueError for others."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    if fmt not in FORMATS:
        raise ValueError(f"cannot write {path}: use a .png, .jpg or .webp file name")
    return fmt


def save_image(img: DecodedImage, path: str | Path, quality: int = 95) -> None:
    Path(path).write_bytes(encode_image(img, format_for(path), quality))
