"""SAM-CP's image and patch inputs in numpy (torch-free): the runtime's twin of the head's torch steps.

The torch head resizes its input with ``F.interpolate`` (bilinear, antialiased when it
shrinks) and reads each patch's mask inside its box with torchvision's ``roi_align``
(:func:`samantic.heads.samcp.mask_to_roi`). A bundle runs the head on onnxruntime
without torch, so the same two steps are written here in numpy, to the same numbers
(tests compare them with torch and torchvision):

* :func:`resize_image`: PyTorch's bilinear resize (``align_corners=False``; the
  antialiased triangle filter of support ``in / out`` when shrinking), by Pillow on
  float planes.
* :func:`roi_align_masks`: ``roi_align(aligned=True, sampling_ratio=2)`` of the
  patch masks, each inside its own box (four bilinear samples per cell, averaged), read
  from the run lengths.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import numpy as np

__all__ = ["resized_shape", "resize_image", "roi_align_masks", "head_boxes"]


def resized_shape(h: int, w: int, size: int) -> Tuple[int, int]:
    """The head's input size for an ``h x w`` image: longer side ``size`` (0: unchanged)."""
    if size <= 0 or max(h, w) == size:
        return h, w
    scale = size / float(max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_image(image: np.ndarray, size: int) -> Tuple[np.ndarray, Tuple[float, float]]:
    """uint8 RGB ``[H, W, 3]`` -> (float32 ``[1, 3, h, w]`` in [0, 1] with longer side ``size``, (sx, sy)).

    Equals the torch head's ``resize_input`` of ``image / 255`` (to float32 rounding): Pillow's
    bilinear filter on float planes (mode ``F``, no rounding to bytes) is the separable triangle
    filter PyTorch's antialiased bilinear was written to match, stretched to the input spacing
    when shrinking and the plain two-tap interpolation when enlarging.
    """
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be RGB [H, W, 3], got shape {image.shape}")
    h, w = image.shape[:2]
    oh, ow = resized_shape(h, w, int(size))
    x = image.astype(np.float32) * np.float32(1.0 / 255.0)
    if (oh, ow) == (h, w):
        planes = [x[..., c] for c in range(3)]
    else:
        planes = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c])).resize((ow, oh), Image.BILINEAR),
                             np.float32) for c in range(3)]
    return np.stack(planes)[None], (ow / float(w), oh / float(h))


def head_boxes(boxes_xyxy_inclusive: np.ndarray) -> np.ndarray:
    """Patch boxes as the head takes them: float32 xyxy with exclusive max ``[P, 4]``."""
    boxes = np.asarray(boxes_xyxy_inclusive, np.float32).reshape(-1, 4).copy()
    boxes[:, 2:] += 1.0
    return boxes


def _bilinear_coords(start: np.ndarray, length: np.ndarray, size: int, roi: int, grid: int, limit: int):
    """Sample positions (low index, high index, weight of high) along one axis: ``[P, roi * grid]``."""
    bin_len = length / roi
    k = np.arange(roi * grid)
    pos = start[:, None] + (k // grid)[None] * bin_len[:, None] + ((k % grid) + 0.5)[None] * (bin_len / grid)[:, None]
    outside = (pos < -1.0) | (pos > limit)
    pos = np.maximum(pos, 0.0)
    low = np.floor(pos).astype(np.int64)
    top = low >= limit - 1
    low = np.where(top, limit - 1, low)
    high = np.where(top, limit - 1, low + 1)
    pos = np.where(top, low.astype(np.float64), pos)
    frac = pos - low
    return low, high, frac, outside


def roi_align_masks(rles: Any, boxes: np.ndarray, roi_size: int = 7) -> np.ndarray:
    """Each patch's mask inside its own box, ``[P, r, r]`` float32 in [0, 1].

    torchvision's ``roi_align(masks, boxes, r, spatial_scale=1, sampling_ratio=2, aligned=True)``
    in numpy, the torch-free twin of :func:`samantic.heads.samcp.mask_to_roi`. The masks are
    never decoded: the few pixels the samples read are looked up in the run lengths.

    Args:
        rles: the patches (:class:`samantic.ops.RleBatch` or COCO RLE dicts), at image size.
        boxes: ``[P, 4]`` xyxy (exclusive max, :func:`head_boxes`) in image pixels.
        roi_size: r.
    """
    from samantic.ops import RleBatch
    from samantic.ops.rle import _batch

    batch = rles if isinstance(rles, RleBatch) else _batch(list(rles), "rles") if len(rles) else None
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    p = 0 if batch is None else len(batch)
    if boxes.shape[0] != p:
        raise ValueError(f"boxes must be [P, 4] with P = {p} patches, got shape {boxes.shape}")
    out = np.zeros((p, roi_size, roi_size), np.float32)
    if p == 0:
        return out
    h, w = (int(v) for v in batch.size)
    grid = 2
    start = boxes - 0.5  # aligned=True: pixel centres at +0.5
    ylo, yhi, fy, yout = _bilinear_coords(start[:, 1], start[:, 3] - start[:, 1], h, roi_size, grid, h)
    xlo, xhi, fx, xout = _bilinear_coords(start[:, 0], start[:, 2] - start[:, 0], w, roi_size, grid, w)
    # pixel (y, x) of patch i is at x * H + y of its column-major runs (0s, 1s, 0s, ...); all patches'
    # runs back to back, each patch's positions shifted by i * H * W, make one sorted sequence of run ends
    counts = np.asarray(batch.counts, np.int64)
    offsets = np.asarray(batch.offsets, np.int64)
    ends = np.cumsum(counts)
    shift = (np.arange(p, dtype=np.int64) * (h * w))[:, None, None]
    corners = [(ylo, xlo), (ylo, xhi), (yhi, xlo), (yhi, xhi)]
    val = []
    for ys, xs in corners:
        q = xs[:, None, :] * h + ys[:, :, None] + shift  # [P, n, n]
        run = np.searchsorted(ends, q, side="right") - offsets[:-1, None, None]
        val.append((run & 1).astype(np.float64))
    wy, wx = fy[:, :, None], fx[:, None, :]
    v = (1 - wy) * (1 - wx) * val[0] + (1 - wy) * wx * val[1] + wy * (1 - wx) * val[2] + wy * wx * val[3]
    v[yout[:, :, None] | xout[:, None, :]] = 0.0
    out[:] = np.clip(v.reshape(p, roi_size, grid, roi_size, grid).mean(axis=(2, 4)), 0.0, 1.0)
    return out
