"""The hook through which a per-mask head (e.g. U-SAM's classifier) scores masks before upscaling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Protocol

import numpy as np


@dataclass
class ScoredMasks:
    """A scorer's verdict on K candidate masks.

    Attributes:
        keep: bool[K]; False drops the mask before it is upscaled.
        fields: per-mask arrays ([K, ...]) carried through every later filter
            into the results (e.g. ``category_id``, ``class_score``).
    """

    keep: np.ndarray
    fields: Dict[str, np.ndarray] = field(default_factory=dict)


class MaskScorer(Protocol):
    """Called with the decoder's mask tokens of the masks that passed the IoU filter."""

    def __call__(self, mask_tokens, iou_preds) -> ScoredMasks:  # Tensor[K, D], Tensor[K]
        ...
