"""Panoptic fusion on RLEs: per pixel the best-scoring candidate that survives wins."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import numpy as np

from samantic.ops._common import as_numpy, load_C
from samantic.ops.rle import RleLike, _batch


class FusionResult(NamedTuple):
    """What :func:`panoptic_fusion` gives (unpacks as ``map, kept``).

    Attributes:
        map: int32 ``[H, W]`` index + 1 of the candidate that owns each pixel, 0 where none does.
        kept: bool ``[N]`` whether each candidate survived (a kept one owns at least one pixel).
    """

    map: np.ndarray
    kept: np.ndarray


def panoptic_fusion(rles: RleLike, scores: Any, overlap_thresh: float = 0.5, min_area: int = 0,
                    device: str = "cpu") -> FusionResult:
    """Fuses overlapping candidate masks into one non-overlapping map, on their RLEs.

    Candidates are visited by descending score (ties in index order); each one takes the pixels
    of its mask that no earlier candidate took, unless the pixels left to it are fewer than
    ``overlap_thresh`` of its area or at most ``min_area`` (or its area is at most ``min_area``):
    then it is dropped and takes nothing, so its pixels stay free for the later ones. This is
    :func:`samantic.pipeline.panoptic.panoptic_fusion` (dense masks, numpy) without any
    ``[N, H, W]`` mask: ``samantic._C`` walks each candidate's runs, in sequence on the CPU or
    with its pixels in parallel on CUDA.

    Args:
        rles: N candidate masks of one size (:class:`~samantic.ops.RleBatch`, e.g.
            ``merge_patches(...).rles``, or COCO dicts). Pass an RleBatch to keep the size
            when there are no candidates (an empty list gives a ``0 x 0`` map).
        scores: ``[N]`` real numbers (numpy or torch), compared as float64; NaN is rejected.
        overlap_thresh: in ``[0, 1]``; the fraction of its area a candidate must keep.
        min_area: pixels (``>= 0``); a candidate must keep more than this many.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        :class:`FusionResult` ``(map int32[H, W], kept bool[N])``.
    """
    b = _batch(rles, "rles")
    s = as_numpy(scores)
    if s.ndim != 1 or s.shape[0] != len(b):
        raise ValueError(f"scores must have shape ({len(b)},), one per RLE, got {s.shape}")
    if s.size and s.dtype.kind not in "biuf":
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    if isinstance(overlap_thresh, bool) or not isinstance(overlap_thresh, numbers.Real):
        raise ValueError(f"overlap_thresh must be a number in [0, 1], got {overlap_thresh!r}")
    if isinstance(min_area, bool) or not isinstance(min_area, numbers.Integral):
        raise ValueError(f"min_area must be an integer number of pixels, got {min_area!r}")
    fused, kept = load_C().panoptic_fusion(b.counts, b.offsets, b.size[0], b.size[1],
                                           np.ascontiguousarray(s, np.float64), float(overlap_thresh),
                                           int(min_area), str(device))
    return FusionResult(fused, kept)
