"""Import `segment_anything` where torchvision does not work.

`segment-anything` imports torchvision at import time for four small helpers only:
``torchvision.ops.boxes.batched_nms`` / ``box_area`` (automatic mask generator) and
``torchvision.transforms.functional.resize`` / ``to_pil_image`` (``ResizeLongestSide.apply_image``).
PyPI's torchvision wheels for Linux are CUDA builds whose C++ extension links against
``libtorch_cuda.so`` / ``libc10_cuda.so``; beside a CPU build of torch that extension cannot load and
``import torchvision`` fails with ``operator torchvision::nms does not exist``. Each torchvision
release pins one exact torch release, and no CPU torchvision wheel is on PyPI.

So: when a working torchvision is importable it is used as is. Otherwise these four functions are
provided here, with torchvision's semantics for the arguments segment-anything passes (greedy NMS,
suppressing IoU > threshold, kept indices in decreasing score order; PIL bilinear resizing, which is
what torchvision does for PIL images), as stand-in modules that exist only while `segment_anything`
is being imported: nothing else in the process can see a fake ``torchvision``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

_STAND_IN_MODULES = ("torchvision", "torchvision.ops", "torchvision.ops.boxes", "torchvision.transforms",
                     "torchvision.transforms.functional")

class SamUnavailableError(RuntimeError):
    """segment-anything cannot be imported or the SAM checkpoint cannot be loaded."""


# How segment_anything was imported: "torchvision <version>" or "stand-in" (None before the import).
torchvision_source: str | None = None


def box_area(boxes: Tensor) -> Tensor:
    """Areas of (N, 4) boxes in (x1, y1, x2, y2) format."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) IoU matrix of two sets of (x1, y1, x2, y2) boxes."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression: keep the best box, drop boxes overlapping it with IoU > threshold.

    Returns the kept indices (int64) in decreasing order of score (ties: lower index first).
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    ranked = boxes[order]
    iou = box_iou(ranked, ranked).cpu().numpy()  # in the boxes' dtype, as torchvision's kernel computes
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category of `idxs`; kept indices in decreasing order of score."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for category in torch.unique(idxs):
        members = torch.where(idxs == category)[0]
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = torch.where(keep_mask)[0]
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


def to_pil_image(image: np.ndarray):
    """An (H, W, 3) uint8 array as a PIL RGB image."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise TypeError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    return Image.fromarray(image, mode="RGB")


def resize(img, size: Sequence[int]):
    """Resize a PIL image to (height, width) = `size` with bilinear filtering (torchvision's default)."""
    from PIL import Image

    if not isinstance(img, Image.Image) or len(size) != 2:
        raise TypeError("the stand-in resize takes a PIL image and a (height, width) size")
    h, w = int(size[0]), int(size[1])
    return img.resize((w, h), Image.Resampling.BILINEAR)


def _stand_in_modules() -> dict[str, ModuleType]:
    mods = {name: ModuleType(name, "stand-in from training.sam_compat") for name in _STAND_IN_MODULES}
    mods["torchvision.ops.boxes"].batched_nms = batched_nms  # type: ignore[attr-defined]
    mods["torchvision.ops.boxes"].box_area = box_area  # type: ignore[attr-defined]
    mods["torchvision.transforms.functional"].resize = resize  # type: ignore[attr-defined]
    mods["torchvision.transforms.functional"].to_pil_image = to_pil_image  # type: ignore[attr-defined]
    return mods


@contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    saved = {name: sys.modules.pop(name, None) for name in _STAND_IN_MODULES}
    sys.modules.update(_stand_in_modules())
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def real_torchvision() -> ModuleType | None:
    """torchvision if it is installed and imports; None otherwise (a failed import is cleaned up)."""
    if "torchvision" in sys.modules and sys.modules["torchvision"].__spec__ is not None:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        return importlib.import_module("torchvision")
    except Exception:  # e.g. RuntimeError: operator torchvision::nms does not exist
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return None


def import_segment_anything(use_torchvision: bool | None = None) -> ModuleType:
    """Import `segment_anything`, with torchvision if it works (or `use_torchvision`), else the stand-ins."""
    global torchvision_source
    if "segment_anything" in sys.modules:
        return sys.modules["segment_anything"]
    tv = real_torchvision() if use_torchvision is not False else None
    if use_torchvision and tv is None:
        raise SamUnavailableError("torchvision was asked for but cannot be imported")
    try:
        if tv is not None:
            module = importlib.import_module("segment_anything")
            torchvision_source = f"torchvision {tv.__version__}"
        else:
            with _torchvision_stand_in():
                module = importlib.import_module("segment_anything")
            torchvision_source = "stand-in"
    except ImportError as e:
        raise SamUnavailableError(f"segment-anything cannot be imported: {e}") from e
    return module
