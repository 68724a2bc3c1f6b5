"""Robust reading of images and atomic writing of results."""

from samantic.io.atomic import atomic_write_bytes, atomic_write_image, atomic_write_json
from samantic.io.images import ImageReadError, read_image
from samantic.io.visualize import overlay_masks, palette

__all__ = [
    "ImageReadError",
    "atomic_write_bytes",
    "atomic_write_image",
    "atomic_write_json",
    "overlay_masks",
    "palette",
    "read_image",
]
