"""Structural position encoding (SPE): SAM masks -> one float map per image.

A fixed position map P of the image's size is built; every mask region is painted with one
value, the mean of P * mask over the whole image (as the original code computes it). Regions
are painted in order (later masks overwrite earlier ones) and uncovered pixels stay 0.

Position maps (rows = image height, cols = image width):

- ``rope`` (default, the paper's): rotary position embedding applied to an all-ones (rows x cols)
  tensor, rows as the sequence axis and columns as the features. Verified against the original
  code's output (``samdiffsr verify-reference``). The original only handled even widths (the
  rotary library needs an even feature count); for an odd width the last column is left
  unrotated (value 1), which is how the library treats features beyond its rotary dimension.
- ``sincos``: ``P[i, j] = sin(f_cols(j)) * cos(sin(f_rows(i)))`` with ``f_n(k) = 1000 ** (2k / n)``.
  The original code built this from the row count only, as a (rows x rows) matrix, so it only worked
  for square images; here each axis uses its own length, which is identical for square images and
  well defined for any shape.
- ``linear``: the outer product of two random uniform vectors (fixed seed, so maps are reproducible).
- ``cosine``: no map; each region gets the cosine similarity between its mask and an all-ones image.

The original code indexed with the 0/1 ``uint8`` arrays that pycocotools returns for the non-RoPE
variants (integer, not boolean, indexing); all variants here paint the masked pixels, as intended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Variant = Literal["rope", "sincos", "linear", "cosine"]
VARIANTS: tuple[str, ...] = ("rope", "sincos", "linear", "cosine")


def rope_position_map(rows: int, cols: int) -> np.ndarray:
    """RoPE applied to an all-ones (rows x cols) tensor: rows are the sequence, columns the features."""
    from rotary_embedding_torch import RotaryEmbedding

    ones = torch.ones(1, 1, rows, cols)
    rot_dim = cols - cols % 2  # odd widths: the last feature column stays unrotated
    if rot_dim == 0:
        return ones[0, 0].numpy()
    rotary = RotaryEmbedding(dim=rot_dim)
    return rotary.rotate_queries_or_keys(ones)[0, 0].numpy()


def _sincos_freqs(n: int) -> np.ndarray:
    return 1.0 / np.power(0.001, 2.0 * np.arange(n) / n)


def sincos_position_map(rows: int, cols: int) -> np.ndarray:
    """``sin(f(col)) * cos(sin(f(row)))``; equals the original (square-only) map for square images."""
    col_term = np.sin(_sincos_freqs(cols))[None, :]
    row_term = np.cos(np.sin(_sincos_freqs(rows)))[:, None]
    return row_term * col_term


def linear_position_map(rows: int, cols: int, rng: np.random.Generator | None = None) -> np.ndarray:
    rng = rng or np.random.default_rng(0)
    return rng.uniform(0, 1, (rows, 1)) * rng.uniform(0, 1, (1, cols))


POSITION_MAPS: dict[str, Callable[[int, int], np.ndarray]] = {
    "rope": rope_position_map,
    "sincos": sincos_position_map,
    "linear": linear_position_map,
}


def encode_masks(
    masks: Sequence[np.ndarray] | np.ndarray,
    variant: Variant = "rope",
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Merge boolean masks (each rows x cols) into one SPE map (float32, rows x cols).

    With no masks, `shape` gives the size of the all-zero map that is returned.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SPE variant {variant!r}; choose from {VARIANTS}")
    masks = [np.asarray(m, dtype=bool) for m in masks]
    if not masks:
        if shape is None:
            raise ValueError("no masks to encode and no shape given")
        return np.zeros(shape, dtype=np.float32)
    rows, cols = masks[0].shape
    if shape is not None and tuple(shape) != (rows, cols):
        raise ValueError(f"masks are {rows}x{cols}, expected {shape[0]}x{shape[1]}")
    if any(m.shape != (rows, cols) for m in masks):
        raise ValueError("all masks must have the same shape")
    out = np.zeros((rows, cols), dtype=np.float32)
    if variant == "cosine":
        ones = np.ones(rows * cols)
        for m in masks:
            flat = m.reshape(-1).astype(np.float64)
            norm = np.linalg.norm(flat)
            out[m] = ones.dot(flat) / (np.linalg.norm(ones) * norm) if norm else 0.0
        return out
    pos = np.asarray(POSITION_MAPS[variant](rows, cols), dtype=np.float32)
    for m in masks:
        # mean of pos * mask over the whole image, accumulated in float64
        out[m] = pos[m].sum(dtype=np.float64) / pos.size
    return out


def conformance_check(vectors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Entry point for `samdiffsr verify-reference`: recompute `spe_out` from `spe_masks`."""
    if "spe_masks" not in vectors:
        return {}
    return {"spe_out": torch.from_numpy(encode_masks(vectors["spe_masks"].numpy(), "rope"))}
