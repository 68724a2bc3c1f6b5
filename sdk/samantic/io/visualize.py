"""Overlays of masks on images, for people to look at."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def palette(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct, saturated RGB colours (uint8 ``[n, 3]``), stable for a seed."""
    import cv2

    hues = (np.arange(n) * 0.61803398875 + seed * 0.1) % 1.0
    hsv = np.stack([hues * 179, np.full(n, 200), np.full(n, 255)], -1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


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
        labels: optional text per mask, drawn at the mask's top-left.
        alpha: fill opacity.

    Returns:
        uint8 ``[H, W, 3]`` RGB.
    """
    import cv2

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    masks = np.asarray(masks).astype(bool)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be [N, {image.shape[0]}, {image.shape[1]}], got {masks.shape}")
    out = image.astype(np.float32)
    colours = palette(len(masks))
    order = np.argsort(-masks.reshape(len(masks), -1).sum(1), kind="stable")
    for i in order:
        m = masks[i]
        out[m] = out[m] * (1 - alpha) + colours[i].astype(np.float32) * alpha
    out = out.clip(0, 255).astype(np.uint8)
    for i in order:
        contours, _ = cv2.findContours(masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in colours[i]), 2, cv2.LINE_AA)
    if labels is not None:
        for i in order:
            ys, xs = np.nonzero(masks[i])
            if len(xs) == 0:
                continue
            org = (int(xs.min()), max(12, int(ys.min()) - 4))
            cv2.putText(out, str(labels[i]), org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(out, str(labels[i]), org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return out
