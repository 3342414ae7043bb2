"""Importing `segment_anything` on a machine where torchvision does not work (filled in below)."""

from __future__ import annotations

from types import ModuleType


def import_segment_anything() -> ModuleType:
    from training.masks import SamUnavailableError

    try:
        import segment_anything
    except ImportError as e:
        raise SamUnavailableError(f"segment-anything cannot be imported: {e}") from e
    return segment_anything
