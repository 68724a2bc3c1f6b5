"""Non-maximum suppression on boxes and on RLE masks."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from samantic.ops._common import as_numpy, load_C
from samantic.ops.rle import RleLike, _batch


def _idxs(idxs: Any) -> Optional[np.ndarray]:
    return None if idxs is None else as_numpy(idxs).astype(np.int64, copy=False)


def nms(boxes: Any, scores: Any, iou_threshold: float, idxs: Any = None, device: str = "cpu") -> np.ndarray:
    """Greedy NMS on XYXY boxes; the same kept set and order as torchvision's ``batched_nms``.

    Args:
        boxes: float32 ``[N, 4]`` XYXY.
        scores: float32 ``[N]``.
        iou_threshold: a box is dropped when its IoU with a kept, higher-scored
            box of the same category exceeds this.
        idxs: optional int ``[N]`` categories; boxes of different categories never suppress each other.
        device: ``"cpu"`` or ``"cuda[:N]"`` (when compiled with CUDA).

    Returns:
        int64 indices of the kept boxes, by descending score.
    """
    return load_C().nms(as_numpy(boxes), as_numpy(scores), float(iou_threshold), _idxs(idxs), device)


def mask_nms(rles: RleLike, scores: Any, iou_threshold: float, idxs: Any = None) -> np.ndarray:
    """Greedy NMS by mask IoU on RLEs of one size; kept indices by descending score."""
    b = _batch(rles)
    return load_C().mask_nms(b.counts, b.offsets, b.size[0], b.size[1], as_numpy(scores), float(iou_threshold), _idxs(idxs))
