"""Point grids and crop boxes of the segment-everything pipeline (numpy, torch-free).

Same definitions as segment-anything's ``build_point_grid``,
``build_all_layer_point_grids`` and ``generate_crop_boxes`` (the tests compare
them), so samantic's generator prompts exactly where the reference does.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np


def point_grid(n_per_side: int) -> np.ndarray:
    """``n_per_side**2`` points evenly spaced in [0, 1]^2 (cell centres), float64 ``[N, 2]`` as (x, y), row-major."""
    if n_per_side < 1:
        raise ValueError(f"points per side must be >= 1, got {n_per_side}")
    half = 1.0 / (2 * n_per_side)
    ticks = np.linspace(half, 1.0 - half, n_per_side)
    xs = np.tile(ticks[None, :], (n_per_side, 1))
    ys = np.tile(ticks[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def layer_point_grids(n_per_side: int, n_layers: int, downscale: int) -> List[np.ndarray]:
    """One grid per crop layer; layer i has ``int(n_per_side / downscale**i)`` points per side."""
    return [point_grid(int(n_per_side / (downscale**i))) for i in range(n_layers + 1)]


def crop_boxes(image_size: Sequence[int], n_layers: int, overlap_ratio: float) -> Tuple[List[List[int]], List[int]]:
    """XYXY crop boxes and their layer index: the whole image, then (2**i)**2 overlapping crops in layer i."""
    im_h, im_w = (int(v) for v in image_size)
    boxes: List[List[int]] = [[0, 0, im_w, im_h]]
    layers: List[int] = [0]
    short_side = min(im_h, im_w)
    for layer in range(n_layers):
        per_side = 2 ** (layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_w = int(math.ceil((overlap * (per_side - 1) + im_w) / per_side))
        crop_h = int(math.ceil((overlap * (per_side - 1) + im_h) / per_side))
        xs = [int((crop_w - overlap) * i) for i in range(per_side)]
        ys = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0 in xs:  # x-major, like itertools.product(xs, ys)
            for y0 in ys:
                boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
                layers.append(layer + 1)
    return boxes, layers


def near_crop_edge(boxes: np.ndarray, crop_box: Sequence[int], image_box: Sequence[int], atol: float = 20.0) -> np.ndarray:
    """Whether each XYXY box (crop coordinates) lies within ``atol`` of a crop edge that is not an image edge."""
    x0, y0 = crop_box[0], crop_box[1]
    b = (np.asarray(boxes, dtype=np.int64) + np.array([x0, y0, x0, y0], dtype=np.int64)).astype(np.float32)
    crop = np.asarray(crop_box, dtype=np.float32)[None]
    image = np.asarray(image_box, dtype=np.float32)[None]
    at_crop = np.abs(b - crop) <= atol
    at_image = np.abs(b - image) <= atol
    return np.any(at_crop & ~at_image, axis=1)


def preprocess_shape(h: int, w: int, long_side: int) -> Tuple[int, int]:
    """Size of an image resized so its longest side is ``long_side`` (ResizeLongestSide.get_preprocess_shape)."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def adaptive_order(n_per_side: int) -> np.ndarray:
    """Grid point indices coarse to fine: every 4th point of every 4th row, then every 2nd, then the rest.

    Used by adaptive prompting so that large objects are found by the first,
    sparse points and the dense points inside them can be skipped.
    """
    idx = np.arange(n_per_side * n_per_side).reshape(n_per_side, n_per_side)
    rows, cols = np.meshgrid(np.arange(n_per_side), np.arange(n_per_side), indexing="ij")
    level = np.full((n_per_side, n_per_side), 2)
    level[(rows % 2 == 0) & (cols % 2 == 0)] = 1
    level[(rows % 4 == 0) & (cols % 4 == 0)] = 0
    return idx.reshape(-1)[np.argsort(level.reshape(-1), kind="stable")]
