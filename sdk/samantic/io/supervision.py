"""samantic results as ``supervision.Detections`` (Roboflow's supervision: annotators, trackers, zones, metrics).

Example:
    >>> import supervision as sv                                              # doctest: +SKIP
    >>> det = to_supervision(Segmenter(create_model("sam_nano"))(image))       # doctest: +SKIP
    >>> sv.MaskAnnotator().annotate(image.copy(), det)                         # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

__all__ = ["to_supervision", "COORDINATE_CONVENTIONS"]

COORDINATE_CONVENTIONS = ("inclusive", "exclusive")


def _import_supervision() -> Any:
    try:
        import supervision
    except ImportError as e:
        raise ImportError(f"to_supervision needs the supervision package ({e}): pip install supervision") from None
    return supervision


def _boxes(masks: np.ndarray, convention: str) -> np.ndarray:
    """Tight ``[N, 4]`` XYXY of bool masks ``[N, H, W]`` (supervision's ``mask_to_xyxy``, both conventions)."""
    n = masks.shape[0]
    out = np.zeros((n, 4), np.float32)
    rows, cols = masks.any(2), masks.any(1)
    for i in range(n):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if len(ys):
            out[i] = (xs[0], ys[0], xs[-1], ys[-1])
    if convention == "exclusive":
        out[rows.any(1), 2:] += 1
    return out


def to_supervision(result: Any, coordinate_convention: str = "inclusive") -> Any:
    """A :class:`~samantic.runtime.Result` or :class:`~samantic.runtime.PanopticResult` as ``supervision.Detections``.

    One detection per mask of a ``Result`` (in ``result.instances`` order), or per fused
    segment of a ``PanopticResult`` (things and stuff; the unfused thing candidates in
    ``result.detections`` are left out).

    Args:
        result: what :class:`~samantic.runtime.Segmenter` returned.
        coordinate_convention: ``"inclusive"`` (supervision's default, and samantic's and
            segment-anything's boxes: ``x_max`` / ``y_max`` are the last pixel of the mask) or
            ``"exclusive"`` (one past it, as in ``sv.mask_to_xyxy(..., coordinate_convention="exclusive")``).

    Returns:
        ``supervision.Detections`` with

        * ``xyxy``: float32 ``[N, 4]``, the tight box of each mask;
        * ``mask``: bool ``[N, H, W]``;
        * ``confidence``: float32 ``[N]``: the class score with a head (the segment score of a
          panoptic result), else SAM's predicted IoU;
        * ``class_id``: int ``[N]``, **0-based** into ``result.names`` (``category_id - 1``),
          ``None`` without a head;
        * ``data["class_name"]``: str ``[N]`` (with a head); a ``Result`` adds
          ``data["predicted_iou"]`` and ``data["stability_score"]``, a ``PanopticResult``
          ``data["segment_id"]`` (its id in ``panoptic_map``) and ``data["isthing"]``.

    Raises:
        ImportError: supervision is not installed.
        ValueError: an unknown ``coordinate_convention``.
    """
    sv = _import_supervision()
    if coordinate_convention not in COORDINATE_CONVENTIONS:
        raise ValueError(f"coordinate_convention must be one of {COORDINATE_CONVENTIONS}, got {coordinate_convention!r}")
    h, w = (int(v) for v in result.image_size)
    names = tuple(result.names)
    data: Dict[str, np.ndarray] = {}
    if hasattr(result, "panoptic_map"):
        segments = list(result.instances)
        ids = np.array([int(s["id"]) for s in segments], np.int64)
        masks = (np.asarray(result.panoptic_map)[None] == ids[:, None, None]) if len(ids) else np.zeros((0, h, w), bool)
        confidence = np.array([float(s["score"]) for s in segments], np.float32)
        class_id = np.array([int(s["category_id"]) - 1 for s in segments], np.int64)
        data["class_name"] = np.array([names[k] for k in class_id], dtype=str)
        data["segment_id"] = ids
        data["isthing"] = np.array([bool(s["isthing"]) for s in segments], bool)
    else:
        from samantic.ops import rle_decode

        ms = result.masks
        masks = rle_decode(ms.rles).astype(bool) if len(ms) else np.zeros((0, h, w), bool)
        cats = ms.fields.get("category_id") if names else None
        if cats is not None:
            class_id = np.asarray(cats, np.int64) - 1
            confidence = np.asarray(ms.fields["class_score"], np.float32)
            data["class_name"] = np.array([names[k] for k in class_id], dtype=str)
        else:
            class_id, confidence = None, np.asarray(ms.iou_preds, np.float32)
        data["predicted_iou"] = np.asarray(ms.iou_preds, np.float32)
        data["stability_score"] = np.asarray(ms.stability_score, np.float32)
    return sv.Detections(xyxy=_boxes(masks, coordinate_convention), mask=masks, confidence=confidence,
                         class_id=class_id, data=data)
