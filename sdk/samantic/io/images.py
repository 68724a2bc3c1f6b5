"""Reading images with clear errors naming the file and the problem."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Union

import numpy as np


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_PIXELS = 100_000_000  # larger images are refused rather than risking the machine's memory


class ImageReadError(ValueError):
    """An input image could not be used; the message names the file and the reason."""


def _truncated(data: bytes) -> bool:
    """JPEG without its end-of-image marker or PNG without its IEND chunk."""
    if data[:2] == b"\xff\xd8":
        return b"\xff\xd9" not in data[-64:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-64:]
    return False


def _jpeg_components(data: bytes) -> int:
    """Number of colour components in a JPEG's frame header (4 = CMYK/YCCK), 0 if not found."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return 0
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[i + 9]
        i += 2 + length
    return 0


def _header_size(data: bytes):
    """(width, height) from the header without decoding pixels, when Pillow is available."""
    try:
        import io

        from PIL import Image
    except ImportError:
        return None
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's decompression-bomb warning: we check the size ourselves
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Exception:
        return None


def read_image(path: Union[str, os.PathLike], max_pixels: int = MAX_PIXELS,
               notes: Optional[List[str]] = None) -> np.ndarray:
    """Reads an image file as uint8 RGB ``[H, W, 3]``.

    Grayscale is expanded to three channels, an alpha channel dropped and CMYK
    JPEGs converted; 16-bit images are rejected rather than silently rescaled.

    Args:
        path: the image file.
        max_pixels: larger images are refused.
        notes: if given, a conversion that happened (grayscale, alpha, CMYK) is appended as text.

    Raises:
        ImageReadError: missing, empty, truncated, undecodable, too large or unsupported file.
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
    size = _header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageReadError(f"{p}: {size[0]}x{size[1]} pixels is more than the limit of {max_pixels:,}")
    if _truncated(data):
        raise ImageReadError(f"{p}: truncated (the file ends before the image data does)")
    is_jpeg = data[:2] == b"\xff\xd8"
    if is_jpeg and notes is not None and _jpeg_components(data) == 4:
        notes.append("CMYK converted to RGB")
    # JPEG has no alpha and may be CMYK: let the decoder convert it to BGR
    flags = cv2.IMREAD_COLOR if is_jpeg else cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise ImageReadError(f"{p}: cannot be decoded ({str(e).strip().splitlines()[-1]})") from None
    if img is None:
        raise ImageReadError(f"{p}: not a readable image (unknown format or truncated data)")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise ImageReadError(f"{p}: {img.shape[1]}x{img.shape[0]} pixels is more than the limit of {max_pixels:,}")
    if img.dtype != np.uint8:
        raise ImageReadError(f"{p}: {img.dtype} pixels are not supported; convert it to 8-bit")
    if img.ndim == 2:
        if notes is not None:
            notes.append("grayscale expanded to RGB")
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        if notes is not None:
            notes.append("alpha channel dropped")
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    raise ImageReadError(f"{p}: {img.shape[2]} channels are not supported")
