"""Fused mask post-processing: SAM's upscaling, threshold, stability, area, box and RLE in one pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np

from samantic.ops._common import as_numpy, load_C
from samantic.ops.rle import Rle, RleBatch, _index


@dataclass(frozen=True)
class PostprocessResult:
    """Per-mask results of :func:`postprocess_masks`.

    Attributes:
        stability_score: float32 ``[N]`` (NaN when no pixel exceeds ``t - offset``, like segment-anything).
        area: int64 ``[N]``, pixels above ``mask_threshold``.
        boxes: int64 ``[N, 4]`` XYXY with inclusive max, in the mask's own (uncropped) coordinates;
            zeros for an empty mask, like ``batched_mask_to_box``.
        rles: the masks as an :class:`RleBatch` of the canvas size.
    """

    stability_score: np.ndarray
    area: np.ndarray
    boxes: np.ndarray
    rles: RleBatch

    def __len__(self) -> int:
        return len(self.area)

    def to_dicts(self, compressed: bool = False) -> List[Rle]:
        return self.rles.to_dicts(compressed=compressed)

    def select(self, index: Any) -> "PostprocessResult":
        """Keeps a subset (boolean mask or integer indices)."""
        idx = np.arange(len(self))[_index(index)]
        return PostprocessResult(self.stability_score[idx], self.area[idx], self.boxes[idx], self.rles.select(idx))


def _pair(value: Sequence[int], name: str) -> tuple:
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        a, b = (int(v) for v in value)
        # int() truncates: a float must hold an integer (2.5 is not a size)
        if any(isinstance(v, (float, np.floating)) and v != int(v) for v in value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a pair of ints (h, w), got {value!r}") from None
    return a, b


def postprocess_masks(
    logits: Any,
    *,
    input_size: Sequence[int],
    original_size: Sequence[int],
    img_size: int = 1024,
    mask_threshold: float = 0.0,
    stability_score_offset: float = 1.0,
    canvas_size: Optional[Sequence[int]] = None,
    offset: Sequence[int] = (0, 0),
    device: str = "cpu",
) -> PostprocessResult:
    """From low-res mask logits to stability, area, box and RLE per mask, in one pass.

    Equivalent to segment-anything's ``Sam.postprocess_masks`` (bilinear to
    ``img_size`` x ``img_size``, crop to ``input_size``, bilinear to
    ``original_size``) followed by ``calculate_stability_score``, thresholding,
    ``batched_mask_to_box`` and ``mask_to_rle_pytorch``, without ever holding a
    full-resolution float mask: values are computed on the fly, and blocks of
    low-res cells that cannot cross a threshold are emitted as whole runs.

    Args:
        logits: float32 ``[N, h, w]`` (or ``[B, M, h, w]``, flattened to ``B * M`` masks).
        input_size: (h, w) of the resized image inside the padded model input.
        original_size: (H, W) of the image (or crop) the masks describe.
        img_size: side of the padded square model input (``model.image_encoder.img_size``).
        mask_threshold: logit threshold of the mask (``model.mask_threshold``).
        stability_score_offset: offset of the stability score thresholds (>= 0).
        canvas_size: (H, W) the RLEs describe; defaults to ``original_size``. Use it
            with ``offset`` to place a crop's masks in the full image, as
            segment-anything's ``uncrop_masks`` does.
        offset: (x0, y0) of the mask's top-left corner inside the canvas.
        device: ``"cpu"`` or ``"cuda[:N]"``.

    Returns:
        A :class:`PostprocessResult`.
    """
    arr = as_numpy(logits)
    if arr.ndim == 4:
        arr = arr.reshape(-1, *arr.shape[2:])
    in_h, in_w = _pair(input_size, "input_size")
    out_h, out_w = _pair(original_size, "original_size")
    can_h, can_w = _pair(canvas_size, "canvas_size") if canvas_size is not None else (out_h, out_w)
    off_x, off_y = _pair(offset, "offset")
    r = load_C().postprocess_masks(
        arr, int(img_size), in_h, in_w, out_h, out_w, float(mask_threshold), float(stability_score_offset),
        can_h, can_w, off_x, off_y, device,
    )
    return PostprocessResult(
        stability_score=r["stability_score"],
        area=r["area"],
        boxes=r["boxes"],
        rles=RleBatch(r["counts"], r["offsets"], (can_h, can_w)),
    )
