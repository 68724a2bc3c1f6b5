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


def adaptive_levels(n_per_side: int) -> np.ndarray:
    """Refinement level of each point of a row-major ``n x n`` grid: 0 on every 4th row and column,
    1 on the remaining points of every 2nd row and column, 2 elsewhere (int64 ``[n * n]``)."""
    rows, cols = np.meshgrid(np.arange(n_per_side), np.arange(n_per_side), indexing="ij")
    level = np.full((n_per_side, n_per_side), 2, np.int64)
    level[(rows % 2 == 0) & (cols % 2 == 0)] = 1
    level[(rows % 4 == 0) & (cols % 4 == 0)] = 0
    return level.reshape(-1)


def adaptive_order(n_per_side: int) -> np.ndarray:
    """Grid point indices coarse to fine: every 4th point of every 4th row, then every 2nd, then the rest.

    Used by adaptive prompting so that large objects are found by the first,
    sparse points and the dense points inside them can be skipped.
    """
    return np.argsort(adaptive_levels(n_per_side), kind="stable")


OUTSIDE = -1  # a parent position beyond the grid's last row or column
NO_PARENT = -2  # an unused parent slot


def coarse_parents(n_per_side: int) -> np.ndarray:
    """The coarser-level neighbours each grid point is refined from (int64 ``[n * n, 4]``).

    A level-1 point lies 2 grid steps from its level-0 neighbours, a level-2 point 1 step
    from its level-0/1 neighbours: halfway between 2 of them along a row or column, or at
    the centre of 4 (the diagonals); those are its parents. Slots hold a point index,
    :data:`OUTSIDE` where the parent would lie beyond the last row or column (the coarse
    lattice does not reach the grid's far border), or :data:`NO_PARENT`. Level-0 points
    have no parents.
    """
    n = n_per_side
    level = adaptive_levels(n).reshape(n, n)
    out = np.full((n * n, 4), NO_PARENT, np.int64)
    for i in range(n):
        for j in range(n):
            lv = level[i, j]
            if lv == 0:
                continue
            step = 2 if lv == 1 else 1
            dr = [0] if i % (2 * step) == 0 else [-step, step]
            dc = [0] if j % (2 * step) == 0 else [-step, step]
            slots = [(i + a, j + b) for a in dr for b in dc]
            out[i * n + j, : len(slots)] = [r * n + c if 0 <= r < n and 0 <= c < n else OUTSIDE for r, c in slots]
    return out
