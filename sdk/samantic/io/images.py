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


def _png_bit_depth(data: bytes) -> int:
    """Bits per sample from a PNG's IHDR chunk (0 if not a PNG)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 and data[12:16] == b"IHDR":
        return data[24]
    return 0


def _bit_depth(im, data: bytes) -> int:
    """Bits per sample of the file (PNG header or TIFF BitsPerSample), 8 when neither says."""
    depth = _png_bit_depth(data)
    if not depth and hasattr(im, "tag_v2"):
        bits = im.tag_v2.get(258)  # TIFF BitsPerSample: an int or one per sample
        depth = max(bits) if isinstance(bits, tuple) and bits else int(bits or 0)
    return depth or 8


# 16-bit grayscale as Pillow holds it; 16-bit RGB(A) it decodes to 8 bits itself, keeping each sample's
# high byte, which is OpenCV's colour read of a 16-bit PNG (value >> 8)
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# deeper modes that are refused, by the numpy dtype they stand for
_DEEP_MODES = {"I": "int32", "F": "float32"}


def read_image(path: Union[str, os.PathLike], max_pixels: int = MAX_PIXELS,
               notes: Optional[List[str]] = None) -> np.ndarray:
    """Reads an image file as uint8 RGB ``[H, W, 3]``, with its EXIF orientation applied.

    Grayscale is expanded to three channels, an alpha channel dropped and CMYK
    JPEGs converted. 16-bit PNG and TIFF (RGB, RGBA, grayscale) are scaled to 8 bits
    by keeping each sample's high byte (``value >> 8``), as OpenCV's colour read
    ``cv2.imread(path, cv2.IMREAD_COLOR)`` does for PNG and grayscale TIFF (for
    16-bit colour TIFF OpenCV goes through libtiff's RGBA reader, which rounds
    ``value / 257``: at most one level apart). Decoding is Pillow's, so reading
    needs neither OpenCV nor torch.

    Args:
        path: the image file.
        max_pixels: larger images are refused.
        notes: if given, a conversion that happened (16-bit, grayscale, alpha, CMYK) is appended as text.

    Raises:
        ImageReadError: missing, empty, truncated, undecodable, too large or unsupported file.
    """
    import io
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file")
    if p.is_dir():
        raise ImageReadError(f"{p}: is a directory, not an image")
    if not p.is_file():  # a FIFO would block the read, a socket or device is no image either
        raise ImageReadError(f"{p}: not a regular file (a pipe, socket or device)")
    try:
        data = p.read_bytes()
    except OSError as e:  # no permission, a socket or FIFO, an I/O error
        raise ImageReadError(f"{p}: cannot be read ({e.strerror or e})") from None
    if not data:
        raise ImageReadError(f"{p}: file is empty (0 bytes)")
    too_large = "{}x{} pixels is more than the limit of {:,}"
    truncated = f"{p}: truncated (the file ends before the image data does)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's decompression-bomb warning: the size is checked here
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                if im.width * im.height > max_pixels:
                    raise ImageReadError(f"{p}: " + too_large.format(im.width, im.height, max_pixels))
                if _truncated(data):
                    raise ImageReadError(truncated)
                im.load()
                depth = _bit_depth(im, data)
                im = ImageOps.exif_transpose(im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:  # beyond Pillow's own limit, raised while reading the header
        raise ImageReadError(f"{p}: too large ({e})") from None
    except UnidentifiedImageError:
        if _truncated(data):
            raise ImageReadError(truncated) from None
        raise ImageReadError(f"{p}: not a readable image (unknown format)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{p}: not a readable image ({e})") from None
    mode = im.mode
    if mode == "I" and _png_bit_depth(data) == 16:  # 16-bit grayscale PNG as older Pillow holds it (int32)
        mode = "I;16"
    if mode in _DEEP_MODES:
        raise ImageReadError(f"{p}: {_DEEP_MODES[mode]} pixels are not supported; convert it to 8-bit")
    if depth == 16 and notes is not None:
        notes.append("16-bit samples scaled to 8 bits")
    if mode in _UINT16_MODES:
        gray = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)  # astype: native order of I;16B
        if notes is not None:
            notes.append("grayscale expanded to RGB")
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    note = None
    if mode in ("1", "L"):
        note = "grayscale expanded to RGB"
    elif mode == "LA":
        note = "grayscale expanded to RGB, alpha channel dropped"
    elif mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        note = "alpha channel dropped"
    elif mode == "CMYK":
        note = "CMYK converted to RGB"
    elif mode not in ("RGB", "P", "YCbCr", "LAB", "HSV"):
        raise ImageReadError(f"{p}: pixel mode {mode!r} is not supported; convert it to 8-bit RGB")
    if note and notes is not None:
        notes.append(note)
    if mode in ("RGBA", "LA", "PA", "P"):
        # alpha is dropped, not composited: the colour values stay as stored
        im = im.convert("RGBA") if mode != "RGBA" else im
        return np.ascontiguousarray(np.asarray(im)[..., :3])
    return np.ascontiguousarray(np.asarray(im.convert("RGB")))
