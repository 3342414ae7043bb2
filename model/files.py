"""Upscale files and folders (`samdiffsr upscale`): where outputs go, which model each image gets, progress.

Everything a user can get wrong (an output folder that cannot be made, an unknown model, a bad option) is found
before the first image is decoded: `plan_outputs` and `choose_models` raise `UsageError` with a message to print.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from model.checkpoint import CheckpointError, read_info
from model.choice import AUTO, degradation_of, is_lossy, pick_auto
from model.imaging import format_for, list_images
from model.repository import RegistryError, discover, find
from model.upscale import sized_for

HEAD_BYTES = 4096  # enough of a file to tell a lossy upload (model.choice.is_lossy)
EXIF_ORIENTATION = 274
TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class UsageError(ValueError):
    """A user error found before any work: the message says what to change."""


@dataclass(frozen=True)
class Candidate:
    """A model in the models folder, as `model.choice.pick_auto` sees it."""

    id: str
    path: Path
    degradation: str
    fits_device: bool


def plan_outputs(src: Path, output: str | Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs; output folders checked or made now. A folder of inputs writes `<stem>.png` files into
    `output` (made if missing); one input writes `output`, or `output/<stem>.png` where `output` is a folder or a
    name ending in / (made if missing)."""
    dst = Path(output)
    if not src.exists():
        raise UsageError(f"{src} does not exist")
    if src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise UsageError(f"{dst} is a file; the output of a folder of images is a folder")
        _make_folder(dst)
        return [(p, dst / f"{p.stem}.png") for p in list_images(src)]
    if dst.is_dir() or str(output).endswith(("/", os.sep)):
        _make_folder(dst)
        return [(src, dst / f"{src.stem}.png")]
    try:
        format_for(dst)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _make_folder(dst.parent)
    return [(src, dst)]


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"cannot make the folder {folder}: a file is in the way") from None
    except OSError as e:
        raise UsageError(f"cannot make the folder {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write into {folder}: permission denied")


def candidates(models_dir: Path, device_type: str) -> list[Candidate]:
    """The models in `models_dir`, in name order, with what `auto` needs to know of each."""
    try:
        found = discover(models_dir)
    except RegistryError as e:
        raise UsageError(f"{e} (name the models' folder with --models-dir or SAMDIFFSR_MODELS_DIR)") from None
    out = []
    for src in found:
        try:
            info = read_info(src.path)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        out.append(Candidate(src.id, src.path, degradation_of(info.training), sized_for(info.config) == device_type))
    if not out:
        raise UsageError(f"no models in {models_dir} (name the models' folder with --models-dir or "
                         "SAMDIFFSR_MODELS_DIR)")
    return out


def read_head(path: Path) -> bytes:
    """The first bytes of a file (empty where it cannot be read: decoding reports that)."""
    try:
        with path.open("rb") as f:
            return f.read(HEAD_BYTES)
    except OSError:
        return b""


def choose_models(inputs: list[Path], model: str, models_dir: Path, device_type: str) -> dict[Path, Candidate]:
    """Each input's model: `model` itself, or with `auto` the rule of `model.choice` by the file's kind."""
    if model != AUTO:
        try:
            path = find(model, models_dir)
        except RegistryError as e:
            raise UsageError(f"{e} (name the models' folder with --models-dir or SAMDIFFSR_MODELS_DIR)") from None
        one = Candidate(model, path, "", False)
        return dict.fromkeys(inputs, one)
    models = candidates(models_dir, device_type)
    return {p: pick_auto(models, is_lossy(read_head(p))) for p in inputs}


def header_size(path: Path) -> tuple[int, int] | None:
    """(height, width) as decoding will see it (EXIF-turned), from the header; None where Pillow cannot tell."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            turned = img.getexif().get(EXIF_ORIENTATION) in TURNED
    except Exception:
        return None
    return (w, h) if turned else (h, w)


@dataclass
class Summary:
    """What a run did: the line printed at its end."""

    images: int = 0
    failed: int = 0
    output_pixels: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        n = f"{self.images} image{'' if self.images == 1 else 's'}"
        failed = f" ({self.failed} failed)" if self.failed else ""
        return f"upscaled {n}{failed}: {self.output_pixels / 1e6:,.2f} MP out in {self.seconds:,.1f} s"
