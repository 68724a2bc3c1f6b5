"""Reading images with clear errors naming the file and the problem."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np


class ImageReadError(ValueError):
    """An input image could not be used; the message names the file and the reason."""


def read_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Reads an image file as uint8 RGB ``[H, W, 3]``.

    Grayscale is expanded to three channels and an alpha channel dropped;
    16-bit images are rejected rather than silently rescaled.

    Raises:
        ImageReadError: missing, empty, undecodable or unsupported file.
    """
    import cv2

    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file")
    if p.is_dir():
        raise ImageReadError(f"{p}: is a directory, not an image")
    data = p.read_bytes()
    if not data:
        raise ImageReadError(f"{p}: file is empty (0 bytes)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"{p}: not a readable image (unknown format or truncated data)")
    if img.dtype != np.uint8:
        raise ImageReadError(f"{p}: {img.dtype} pixels are not supported; convert it to 8-bit")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    raise ImageReadError(f"{p}: {img.shape[2]} channels are not supported")
