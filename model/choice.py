"""`auto`: which model an image gets, the one rule of the service (`model=auto`) and `samdiffsr upscale --model auto`.

For a lossy upload (JPEG, lossy WebP) a model trained on real-world degradations; otherwise a clean one. Among
those, the first sized for the device it runs on (a GPU model on a CUDA device); else the model with id
`default`; else the first. Measured on the validation photos: docs/models.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

AUTO = "auto"


class Candidate(Protocol):
    """What `pick_auto` needs to know of a model."""

    @property
    def id(self) -> str: ...

    @property
    def degradation(self) -> str: ...

    @property
    def fits_device(self) -> bool: ...


M = TypeVar("M", bound=Candidate)


def degradation_of(training: dict[str, Any]) -> str:
    """A checkpoint's training inputs from its `training` record: `bicubic` (clean) or `real` (JPEG, noise, blur)."""
    return str(training.get("degradation", "bicubic"))


def pick_auto(models: Sequence[M], lossy: bool) -> M:
    """`auto`'s choice among `models` (see the module doc)."""
    if not models:
        raise ValueError("no models to choose from")
    if lossy:
        real = [m for m in models if m.degradation == "real"]
        if real:
            return next((m for m in real if m.fits_device), real[0])
    fitting = [m for m in models if m.fits_device and m.degradation != "real"]
    if fitting:
        return fitting[0]
    return next((m for m in models if m.id == "default"), models[0])


def is_lossy(data: bytes) -> bool:
    """A JPEG, or a WebP whose image is VP8 (lossy) rather than VP8L, from the first bytes (4 KiB are enough)."""
    if data[:3] == b"\xff\xd8\xff":
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        head = data[12:4096]
        lossy, lossless = head.find(b"VP8 "), head.find(b"VP8L")
        return lossy >= 0 and (lossless < 0 or lossy < lossless)
    return False
