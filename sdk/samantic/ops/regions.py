"""Small-region clean-up of binary masks (segment-anything's ``min_mask_region_area``)."""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from samantic.ops._common import as_numpy, load_C


def remove_small_regions(mask: Any, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fills holes (``mode="holes"``) or drops islands (``"islands"``) smaller than ``area_thresh`` pixels.

    The same result as segment-anything's ``utils.amg.remove_small_regions`` (8-connected
    regions, OpenCV's labelling order for the tie-break), computed by ``samantic._C`` so
    neither torch nor OpenCV is needed. Islands: if every island is small, the largest stays.

    Args:
        mask: bool/uint8 ``[H, W]``.
        area_thresh: regions with fewer pixels than this are flipped.
        mode: ``"holes"`` or ``"islands"``.

    Returns:
        (bool ``[H, W]`` mask, whether anything changed).
    """
    m = as_numpy(mask)
    if m.dtype not in (np.bool_, np.uint8):
        m = m != 0
    out, changed = load_C().remove_small_regions(m, float(area_thresh), str(mode))
    return out, bool(changed)
