"""SAM's input transform in numpy and Pillow (torch-free).

segment-anything's ``ResizeLongestSide.apply_image`` resizes through
torchvision's ``resize(to_pil_image(image), size)``, i.e. Pillow's bilinear
(antialiased) ``Image.resize``; :func:`resize_longest_side` makes the same
Pillow call, so the pixels are identical. ``Sam.preprocess`` then normalizes
in float32 and zero-pads to a square; :func:`normalize_pad` does the same
float32 arithmetic. The tests compare both with segment-anything.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Sequence, Tuple

import numpy as np

from samantic.pipeline.prompts import preprocess_shape


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resizes uint8 ``[H, W, 3]`` so its longest side is ``long_side`` (Pillow bilinear, like segment-anything)."""
    from PIL import Image

    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    if h < 1 or w < 1:
        raise ValueError(f"image of {image.shape[0]}x{image.shape[1]} pixels is too elongated: resized to the model's "
                         f"input side {long_side}, its short side would be 0 pixels")
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR))


def apply_coords(coords: np.ndarray, original_size: Sequence[int], long_side: int) -> np.ndarray:
    """Point coordinates (x, y) of an image of ``original_size`` (H, W) in the resized frame, float64."""
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    out = deepcopy(coords).astype(float)
    out[..., 0] = out[..., 0] * (new_w / old_w)
    out[..., 1] = out[..., 1] * (new_h / old_h)
    return out


def normalize_pad(resized: np.ndarray, pixel_mean: Sequence[float], pixel_std: Sequence[float], img_size: int) -> np.ndarray:
    """``(x - mean) / std`` in float32, zero-padded bottom/right to ``img_size``: float32 ``[1, 3, S, S]``."""
    h, w = resized.shape[:2]
    if h > img_size or w > img_size:
        raise ValueError(f"resized image {h}x{w} is larger than the model input {img_size}")
    mean = np.asarray(pixel_mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(pixel_std, np.float32).reshape(3, 1, 1)
    out = np.zeros((1, 3, img_size, img_size), np.float32)
    out[0, :, :h, :w] = (resized.transpose(2, 0, 1).astype(np.float32) - mean) / std
    return out


def preprocess(image: np.ndarray, pixel_mean: Sequence[float], pixel_std: Sequence[float],
               img_size: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """RGB uint8 ``[H, W, 3]`` -> (encoder input float32 ``[1, 3, S, S]``, resized (h, w) before padding)."""
    resized = resize_longest_side(image, img_size)
    return normalize_pad(resized, pixel_mean, pixel_std, img_size), (int(resized.shape[0]), int(resized.shape[1]))
