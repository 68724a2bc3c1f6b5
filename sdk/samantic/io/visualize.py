"""Overlays of masks on images, for people to look at (numpy + Pillow, no OpenCV)."""

from __future__ import annotations

import colorsys
from typing import Optional, Sequence, Tuple

import numpy as np


def palette(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct, saturated RGB colours (uint8 ``[n, 3]``), stable for a seed."""
    hues = (np.arange(n) * 0.61803398875 + seed * 0.1) % 1.0
    rgb = [colorsys.hsv_to_rgb(float(h), 200 / 255, 1.0) for h in hues]
    return np.round(np.array(rgb, np.float64).reshape(n, 3) * 255).astype(np.uint8)


def _dilate(m: np.ndarray) -> np.ndarray:
    """3x3 dilation of a boolean mask."""
    p = np.pad(m, 1)
    h, w = m.shape
    out = np.zeros_like(m)
    for dy in range(3):
        for dx in range(3):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def outline(mask: np.ndarray) -> np.ndarray:
    """A two-pixel boundary band of a boolean mask: pixels within one step of both the mask and its outside."""
    m = np.asarray(mask, bool)
    return _dilate(m) & _dilate(~m)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def overlay_masks(
    image: np.ndarray,
    masks: np.ndarray,
    labels: Optional[Sequence[str]] = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Draws masks (filled, with outlines) and optional labels on an RGB image.

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        masks: bool/uint8 ``[N, H, W]``, drawn largest first so small masks stay visible.
        labels: optional text per mask, centred on a point deep inside it (:func:`label_anchor`).
        alpha: fill opacity.

    Returns:
        uint8 ``[H, W, 3]`` RGB.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    masks = np.asarray(masks).astype(bool)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be [N, {image.shape[0]}, {image.shape[1]}], got {masks.shape}")
    if len(masks) == 0:
        return image.copy()
    return overlay_each(image, len(masks), masks.__getitem__, masks.reshape(len(masks), -1).sum(1), labels, alpha)


def overlay_segments(
    image: np.ndarray,
    segment_map: np.ndarray,
    ids: Sequence[int],
    labels: Optional[Sequence[str]] = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """:func:`overlay_masks` of the segments of a label map (e.g. a panoptic map), mask ``i`` being
    ``segment_map == ids[i]``, the same picture without an ``[N, H, W]`` stack (one mask at a time).

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        segment_map: int ``[H, W]`` segment ids.
        ids: the segments to draw, in the order of ``labels`` (their colours follow this order).
        labels: optional text per segment.
        alpha: fill opacity.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    segment_map = np.asarray(segment_map)
    if segment_map.shape != image.shape[:2]:
        raise ValueError(f"segment_map must be [{image.shape[0]}, {image.shape[1]}], got {segment_map.shape}")
    ids = [int(i) for i in ids]
    uniq, counts = np.unique(segment_map, return_counts=True)
    area = dict(zip(uniq.tolist(), counts.tolist()))
    return overlay_each(image, len(ids), lambda i: segment_map == ids[i], np.array([area.get(i, 0) for i in ids]),
                        labels, alpha)


def overlay_each(image: np.ndarray, n: int, mask_of, areas: Sequence[int], labels: Optional[Sequence[str]] = None,
                 alpha: float = 0.5) -> np.ndarray:
    """:func:`overlay_masks` of ``n`` masks made one at a time by ``mask_of(i)`` (bool ``[H, W]``; called once
    per mask), with their ``areas`` (for the drawing order, largest first): the same picture without
    holding every mask at once (RLE masks decoded one by one, segments of a label map)."""
    if n == 0:
        return image.copy()
    out = image.astype(np.float32)
    colours = palette(n)
    order = np.argsort(-np.asarray(areas), kind="stable")
    bands, origins = {}, {}  # each mask made once: its outline band and label corner kept for the later passes
    for i in order:
        m = mask_of(i)
        out[m] = out[m] * (1 - alpha) + colours[i].astype(np.float32) * alpha
        bands[i] = np.nonzero(outline(m))
        if labels is not None:
            origins[i] = label_anchor(m)
    out = out.clip(0, 255).astype(np.uint8)
    for i in order:
        out[bands[i]] = colours[i]
    if labels is not None:
        from PIL import Image, ImageDraw

        canvas = Image.fromarray(out)
        draw = ImageDraw.Draw(canvas)
        font = _font(12)
        for i in order:
            if origins[i] is not None:  # centred on the anchor, kept inside the image
                left, top, right, bottom = draw.textbbox((0, 0), str(labels[i]), font=font, stroke_width=2)
                x = min(max(origins[i][0] - (right - left) // 2, 0), max(canvas.width - (right - left), 0))
                y = min(max(origins[i][1] - (bottom - top) // 2, 0), max(canvas.height - (bottom - top), 0))
                draw.text((x, y), str(labels[i]), fill=(255, 255, 255), font=font, stroke_width=2,
                          stroke_fill=(0, 0, 0))
        out = np.asarray(canvas).copy()
    return out


def label_anchor(mask: np.ndarray, grid: int = 160) -> Optional[Tuple[int, int]]:
    """``(x, y)`` of a pixel deep inside ``mask``, away from its boundary and the image's edge: where a label
    names this segment and no other (a box corner can sit in another segment, and the corners of regions that
    touch the same image corner coincide). None for an empty mask.

    The mask is reduced to blocks wholly inside it (at most ``grid`` per side), eroded until one more step would
    empty it, and the block of the last remainder nearest its centre is taken: a point always inside the mask.
    A mask thinner than a block gets its pixel nearest its centroid. numpy only (the torch-free runtime draws
    overlays without OpenCV)."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return None
    h, w = m.shape
    s = max(1, -(-max(h, w) // grid))
    bh, bw = -(-h // s), -(-w // s)
    padded = np.zeros((bh * s, bw * s), bool)
    padded[:h, :w] = m
    cur = padded.reshape(bh, s, bw, s).all(axis=(1, 3))
    if not cur.any():
        return _nearest_centre(m, 1)
    while True:  # 4-neighbour erosion, the image's edge counting as outside
        nxt = cur.copy()
        nxt[1:] &= cur[:-1]
        nxt[:-1] &= cur[1:]
        nxt[:, 1:] &= cur[:, :-1]
        nxt[:, :-1] &= cur[:, 1:]
        nxt[0] = nxt[-1] = False
        nxt[:, 0] = nxt[:, -1] = False
        if not nxt.any():
            break
        cur = nxt
    return _nearest_centre(cur, s)


def _nearest_centre(cells: np.ndarray, s: int) -> Tuple[int, int]:
    """The cell of ``cells`` (bool; each ``s`` pixels a side) nearest their centroid, as the pixel ``(x, y)`` at its middle."""
    ys, xs = np.nonzero(cells)
    k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return int(xs[k]) * s + s // 2, int(ys[k]) * s + s // 2
