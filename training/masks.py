"""Segment training images, store the masks as RLE JSON, and turn them into SPE maps.

File format (one ``<image stem>.json`` per image), the same as SAM's own
``scripts/amg.py --convert-to-rle`` output so masks made elsewhere drop straight in: a JSON list of
annotations, each with ``segmentation`` (COCO RLE ``{"size": [h, w], "counts": str}``), ``area``,
``bbox`` (x, y, w, h), ``predicted_iou``, ``point_coords`` ([[x, y]]), ``stability_score`` and
``crop_box`` (x, y, w, h). Mask order matters: the SPE paints later masks over earlier ones.

Backends:

- `SamBackend`: SAM's automatic mask generator (`segment-anything`), as in the paper (ViT-H).
- `ClassicalBackend`: a scikit-image over-segmentation (Felzenszwalb or SLIC). It is a **stand-in for
  SAM** for machines without SAM weights: its regions are colour/texture segments, not SAM's
  object-level masks, so a model trained on them is not the paper's SAM-DiffSR.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from model.imaging import ImageDecodeError, decode_image, list_images
from training.sam_compat import SamUnavailableError, import_segment_anything
from training.spe import VARIANTS, encode_masks

ANNOTATION_KEYS = ("segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                   "crop_box")


class MaskFileError(ValueError):
    """A mask JSON file that is not in the expected RLE format."""


# ---------------------------------------------------------------------------------------------------
# Images and the RLE JSON format


def load_rgb8(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3), EXIF-rotated (grayscale is replicated to 3 channels)."""
    rgb = decode_image(Path(path)).rgb
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as `load_rgb8` would return it (reads only the header)."""
    from PIL import Image

    with Image.open(path) as img:
        orientation = img.getexif().get(0x0112, 1)
        w, h = img.size
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # these EXIF orientations swap the axes


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """A boolean (H, W) mask as COCO RLE with a str ``counts`` (JSON-serialisable)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (str or bytes counts) -> boolean (H, W) mask."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    rle = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():  # pycocotools' Cython code and numpy 2's copy= protocol
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def mask_annotation(mask: np.ndarray, predicted_iou: float = 1.0, stability_score: float = 1.0,
                    crop_box: list[int] | None = None) -> dict[str, Any]:
    """One annotation in SAM's RLE format for a boolean mask; ``point_coords`` is the region pixel
    nearest to its centroid."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("empty mask")
    cy, cx = ys.mean(), xs.mean()
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    h, w = mask.shape
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "segmentation": encode_rle(mask),
        "area": int(ys.size),
        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
        "predicted_iou": float(predicted_iou),
        "point_coords": [[float(xs[k]), float(ys[k])]],
        "stability_score": float(stability_score),
        "crop_box": crop_box or [0, 0, w, h],
    }


def write_annotations(path: str | Path, annotations: list[dict[str, Any]]) -> None:
    """Write a mask JSON file atomically (a crash never leaves a half-written file to be skipped)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(annotations, f)
    os.replace(tmp, path)


def read_annotations(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a mask JSON file (SAM's RLE format)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise MaskFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise MaskFileError(f"{path}: expected a JSON list of annotations, got {type(data).__name__}")
    for i, ann in enumerate(data):
        seg = ann.get("segmentation") if isinstance(ann, dict) else None
        if not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
            raise MaskFileError(f"{path}: annotation {i} has no COCO RLE 'segmentation' "
                                "(expected SAM's amg.py --convert-to-rle output)")
    return data


def read_masks(path: str | Path, shape: tuple[int, int] | None = None) -> list[np.ndarray]:
    """The boolean masks of a mask JSON file, in file order; checks their size against `shape`."""
    masks = [decode_rle(ann["segmentation"]) for ann in read_annotations(path)]
    if shape is not None:
        for m in masks:
            if m.shape != tuple(shape):
                raise MaskFileError(f"{path}: mask is {m.shape[0]}x{m.shape[1]}, image is {shape[0]}x{shape[1]}")
    return masks


# ---------------------------------------------------------------------------------------------------
# Backends


class MaskBackend(Protocol):
    name: str

    def __call__(self, rgb: np.ndarray) -> list[dict[str, Any]]:
        """uint8 RGB (H, W, 3) -> annotations in SAM's RLE format."""
        ...


@dataclass
class ClassicalConfig:
    """scikit-image over-segmentation settings (a stand-in for SAM)."""

    method: Literal["felzenszwalb", "slic"] = "felzenszwalb"
    scale: float = 400.0  # felzenszwalb: higher -> larger segments
    sigma: float = 0.8  # felzenszwalb / slic: Gaussian pre-smoothing
    min_size: int = 200  # felzenszwalb: minimum segment size in pixels
    n_segments: int = 100  # slic: approximate number of segments
    compactness: float = 10.0  # slic
    min_area_frac: float = 0.0005  # drop segments smaller than this fraction of the image (left at 0)
    max_side: int = 1024  # segment a copy downscaled to this long side (as SAM does), labels upscaled


class ClassicalBackend:
    """Felzenszwalb / SLIC segments written as SAM-format annotations, largest first.

    ``predicted_iou`` and ``stability_score`` are 1.0 (there is no model score).
    """

    def __init__(self, config: ClassicalConfig | None = None):
        self.config = config or ClassicalConfig()
        if self.config.method not in ("felzenszwalb", "slic"):
            raise ValueError(f"unknown classical method {self.config.method!r}")
        self.name = self.config.method

    def labels(self, rgb: np.ndarray) -> np.ndarray:
        """An (H, W) integer label map (0..n-1), computed at most at `max_side` resolution."""
        from PIL import Image
        from skimage import segmentation

        c = self.config
        h, w = rgb.shape[:2]
        work = rgb
        if c.max_side and max(h, w) > c.max_side:
            s = c.max_side / max(h, w)
            size = (max(1, round(w * s)), max(1, round(h * s)))
            work = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
        if c.method == "felzenszwalb":
            labels = segmentation.felzenszwalb(work, scale=c.scale, sigma=c.sigma, min_size=c.min_size)
        else:
            labels = segmentation.slic(work, n_segments=c.n_segments, compactness=c.compactness, sigma=c.sigma,
                                       start_label=0)
        if work is not rgb:
            labels = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((w, h), Image.Resampling.NEAREST))
        return labels.astype(np.int64)

    def __call__(self, rgb: np.ndarray) -> list[dict[str, Any]]:
        labels = self.labels(rgb)
        counts = np.bincount(labels.ravel())
        min_area = max(1, int(self.config.min_area_frac * labels.size))
        order = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] >= min_area]
        return [mask_annotation(labels == k) for k in order]


@dataclass
class SamConfig:
    """SAM automatic mask generator settings (defaults are segment-anything's)."""

    model_type: str = "vit_h"
    checkpoint: Path | None = None
    device: str = "cpu"
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    min_mask_region_area: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # any other SamAutomaticMaskGenerator argument

    def generator_kwargs(self) -> dict[str, Any]:
        names = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                 "stability_score_offset", "box_nms_thresh", "crop_n_layers", "min_mask_region_area")
        return {n: getattr(self, n) for n in names} | self.extra


class SamBackend:
    """SAM's automatic mask generator, writing the same RLE annotations as ``amg.py --convert-to-rle``."""

    name = "sam"

    def __init__(self, sam: Any, config: SamConfig | None = None):
        sa = import_segment_anything()
        self.config = config or SamConfig()
        self.generator = sa.SamAutomaticMaskGenerator(sam, output_mode="coco_rle",
                                                      **self.config.generator_kwargs())

    @classmethod
    def from_checkpoint(cls, config: SamConfig) -> SamBackend:
        """Build SAM of `config.model_type` and load its official weights (``sam_vit_h_4b8939.pth`` ...)."""
        import torch

        sa = import_segment_anything()
        if config.model_type not in sa.sam_model_registry:
            raise SamUnavailableError(f"unknown SAM model type {config.model_type!r}; "
                                      f"choose from {sorted(sa.sam_model_registry)}")
        if config.checkpoint is None or not Path(config.checkpoint).is_file():
            raise SamUnavailableError(f"SAM checkpoint not found: {config.checkpoint} (download the official "
                                      f"{config.model_type} weights, or use --backend felzenszwalb)")
        sam = sa.sam_model_registry[config.model_type](checkpoint=None)
        try:
            state = torch.load(config.checkpoint, map_location="cpu", weights_only=True)
            sam.load_state_dict(state)
        except Exception as e:  # a wrong file: unpickling or key/shape errors
            raise SamUnavailableError(f"cannot load SAM {config.model_type} weights from "
                                      f"{config.checkpoint}: {e}") from e
        sam.to(config.device).eval()
        return cls(sam, config)

    def __call__(self, rgb: np.ndarray) -> list[dict[str, Any]]:
        import torch

        with torch.inference_mode():
            anns = self.generator.generate(rgb)
        return [{k: ann[k] for k in ANNOTATION_KEYS} for ann in anns]


# ---------------------------------------------------------------------------------------------------
# Pipelines


@dataclass
class RunReport:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self, what: str) -> str:
        s = f"{len(self.done)} {what}, {len(self.skipped)} skipped (already done), {len(self.failed)} failed"
        return s + "".join(f"\n  failed: {p.name}: {why}" for p, why in self.failed)


def _progress(items: list[Path], desc: str, progress: bool) -> Iterable[Path]:
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img")


def generate_masks(images_dir: str | Path, out_dir: str | Path, backend: MaskBackend,
                   overwrite: bool = False, progress: bool = True,
                   on_image: Callable[[Path, int], None] | None = None) -> RunReport:
    """Segment every image of `images_dir` into ``out_dir/<stem>.json``.

    Resumable: images whose JSON already exists are skipped (unless `overwrite`). An image that
    cannot be read is reported in ``failed`` and the others go on.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = RunReport()
    for path in _progress(list_images(images_dir), f"masks ({backend.name})", progress):
        target = out_dir / f"{path.stem}.json"
        if target.exists() and not overwrite:
            report.skipped.append(path)
            continue
        try:
            rgb = load_rgb8(path)
        except ImageDecodeError as e:
            report.failed.append((path, str(e)))
            continue
        annotations = backend(rgb)
        write_annotations(target, annotations)
        report.done.append(path)
        if on_image:
            on_image(path, len(annotations))
    return report


def embed_image(image: str | Path, masks_json: str | Path, variant: str = "rope") -> np.ndarray:
    """The SPE map (float32, image size) of one image from its mask JSON file."""
    shape = image_size(image)
    return encode_masks(read_masks(masks_json, shape), variant, shape=shape)  # type: ignore[arg-type]


def embed_masks(images_dir: str | Path, masks_dir: str | Path, out_dir: str | Path, variant: str = "rope",
                overwrite: bool = False, progress: bool = True) -> RunReport:
    """Write ``out_dir/<stem>.npy`` (float32, image size) for every image of `images_dir`.

    An image whose mask file holds no masks gets an all-zero map; one with no mask file at all is
    reported in ``failed``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SPE variant {variant!r}; choose from {VARIANTS}")
    masks_dir, out_dir = Path(masks_dir), Path(out_dir)
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"mask folder not found: {masks_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = RunReport()
    for path in _progress(list_images(images_dir), f"spe ({variant})", progress):
        target = out_dir / f"{path.stem}.npy"
        if target.exists() and not overwrite:
            report.skipped.append(path)
            continue
        src = masks_dir / f"{path.stem}.json"
        if not src.exists():
            report.failed.append((path, f"no mask file {src}"))
            continue
        try:
            spe = embed_image(path, src, variant)
        except MaskFileError as e:
            report.failed.append((path, str(e)))
            continue
        tmp = out_dir / f"{path.stem}.tmp.npy"
        np.save(tmp, spe)
        os.replace(tmp, target)
        report.done.append(path)
    return report
