"""SAM-CP's image and patch inputs in numpy (torch-free): the runtime's twin of the head's torch steps.

The torch head resizes its input with ``F.interpolate`` (bilinear, antialiased when it
shrinks) and reads each patch's mask inside its box with torchvision's ``roi_align``
(:func:`samantic.heads.samcp.mask_to_roi`). A bundle runs the head on onnxruntime
without torch, so the same two steps are written here in numpy, to the same numbers
(tests compare them with torch and torchvision):

* :func:`resize_matrix` / :func:`resize_image`: PyTorch's separable bilinear resize
  (``align_corners=False``; the antialiased triangle filter of support ``in / out``
  when shrinking) as two small matrices, ``out = Ry @ image @ Rx^T`` per channel.
* :func:`roi_align_masks`: ``roi_align(aligned=True, sampling_ratio=2)`` of the decoded
  patch masks, each inside its own box (four bilinear samples per cell, averaged).
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import numpy as np

__all__ = ["resize_matrix", "resize_taps", "resized_shape", "resize_image", "roi_align_masks", "head_boxes"]


def resize_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """``[n_out, n_in]`` float64 weights of PyTorch's 1-D bilinear resize (``align_corners=False``).

    With ``antialias`` and ``n_out < n_in`` the triangle filter is stretched to the
    input spacing (PyTorch's ``_upsample_bilinear2d_aa``); otherwise the plain two-tap
    interpolation of ``F.interpolate(mode="bilinear")``.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
    scale = n_in / float(n_out)
    out = np.zeros((n_out, n_in), np.float64)
    if antialias and scale > 1.0:
        support = scale  # bilinear: interp_size / 2 = 1, times the scale
        inv = 1.0 / scale
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            j = np.arange(lo, hi)
            w = np.clip(1.0 - np.abs((j - center + 0.5) * inv), 0.0, None)
            total = w.sum()
            if total > 0:
                out[i, lo:hi] = w / total
        return out
    for i in range(n_out):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        j0 = min(int(src), n_in - 1)
        j1 = min(j0 + 1, n_in - 1)
        lam = src - j0
        out[i, j0] += 1.0 - lam
        out[i, j1] += lam
    return out


def resized_shape(h: int, w: int, size: int) -> Tuple[int, int]:
    """The head's input size for an ``h x w`` image: longer side ``size`` (0: unchanged)."""
    if size <= 0 or max(h, w) == size:
        return h, w
    scale = size / float(max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_taps(n_in: int, n_out: int, antialias: bool) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`resize_matrix` as taps: (first input index ``[n_out]``, weights ``[n_out, k]``) of each
    output's contiguous run of inputs (the matrix is banded)."""
    m = resize_matrix(n_in, n_out, antialias)
    nz = m != 0
    has = nz.any(1)
    lo = np.where(has, nz.argmax(1), 0)
    hi = np.where(has, n_in - nz[:, ::-1].argmax(1), 1)
    k = int((hi - lo).max())
    lo = np.minimum(lo, n_in - k)  # keep every window inside the input; extra taps weigh 0
    cols = lo[:, None] + np.arange(k)[None]
    return lo, np.take_along_axis(m, cols, 1)


def _resize_axis(x: np.ndarray, axis: int, n_out: int, antialias: bool) -> np.ndarray:
    lo, w = resize_taps(x.shape[axis], n_out, antialias)
    w = w.astype(np.float32)
    out = None
    for t in range(w.shape[1]):
        part = np.take(x, lo + t, axis=axis)
        shape = [1] * x.ndim
        shape[axis] = n_out
        part = part * w[:, t].reshape(shape)
        out = part if out is None else out + part
    return out


def resize_image(image: np.ndarray, size: int) -> Tuple[np.ndarray, Tuple[float, float]]:
    """uint8 RGB ``[H, W, 3]`` -> (float32 ``[1, 3, h, w]`` in [0, 1] with longer side ``size``, (sx, sy)).

    Equals the torch head's ``resize_input`` of ``image / 255`` (to float32 rounding): separable,
    rows then columns, each output a weighted sum of a few neighbouring inputs.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be RGB [H, W, 3], got shape {image.shape}")
    h, w = image.shape[:2]
    oh, ow = resized_shape(h, w, int(size))
    x = image.astype(np.float32) * np.float32(1.0 / 255.0)
    if (oh, ow) != (h, w):
        shrink = max(oh, ow) < max(h, w)  # the head antialiases when it shrinks
        x = _resize_axis(_resize_axis(x, 0, oh, shrink), 1, ow, shrink)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32), (ow / float(w), oh / float(h))


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
    counts = np.asarray(batch.counts, np.int64)
    offsets = np.asarray(batch.offsets, np.int64)
    for i in range(p):
        ends = np.cumsum(counts[offsets[i]:offsets[i + 1]])  # column-major runs: 0s, 1s, 0s, ...
        # pixel (y, x) is at x * H + y; its value is the parity of the run it falls in
        q = np.stack([xlo[i][None, :] * h + ylo[i][:, None], xhi[i][None, :] * h + ylo[i][:, None],
                      xlo[i][None, :] * h + yhi[i][:, None], xhi[i][None, :] * h + yhi[i][:, None]])
        val = (np.searchsorted(ends, q, side="right") & 1).astype(np.float64)  # [4, n, n]
        wy, wx = fy[i][:, None], fx[i][None, :]
        v = (1 - wy) * (1 - wx) * val[0] + (1 - wy) * wx * val[1] + wy * (1 - wx) * val[2] + wy * wx * val[3]
        v[yout[i][:, None] | xout[i][None, :]] = 0.0
        out[i] = np.clip(v.reshape(roi_size, grid, roi_size, grid).mean(axis=(1, 3)), 0.0, 1.0)
    return out
