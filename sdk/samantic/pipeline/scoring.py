"""The hook through which a per-mask head (e.g. U-SAM's classifier) scores masks before upscaling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np


NONE_CLASS = "__none__"  # the "none of these" column of a semantic head


def check_class_names(classes: Union[str, Sequence[str]], what: str = "class list") -> Tuple[str, ...]:
    """Parses ``"a,b"`` or a sequence into a tuple of names; rejects empty and duplicate names."""
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",")]
    names = tuple(str(c).strip() for c in classes)
    if not names or all(not n for n in names):
        raise ValueError(f"the {what} is empty; give class names like 'circle,star'")
    if any(not n for n in names):
        raise ValueError(f"the {what} {','.join(names)!r} has an empty name")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"the {what} names {', '.join(dups)} more than once")
    if NONE_CLASS in names:
        raise ValueError(f"{NONE_CLASS!r} is reserved")
    return names


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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32 (numerically stable)."""
    x = np.asarray(logits, np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def grouped_probs(p: np.ndarray, members: Sequence[Sequence[int]]) -> np.ndarray:
    """Sums class probabilities ``[K, C + 1]`` into requested names; the rest goes to a final "other" column."""
    out = np.zeros((p.shape[0], len(members) + 1), np.float32)
    used = np.zeros(p.shape[1], bool)
    for j, cols in enumerate(members):
        out[:, j] = p[:, cols].sum(1)
        used[cols] = True
    out[:, -1] = p[:, ~used].sum(1)
    return out


class ClassLogitScorer:
    """A scorer on a semantic head's class logits ``[K, C + 1]`` (last column "none"), numpy only.

    A mask is kept when its best requested name beats "anything else" and
    reaches ``score_thresh``; a requested name is a head class or a group (the
    sum of its classes' probabilities). Fields carried into the results:
    ``category_id`` (1-based index into ``names``) and ``class_score``.

    Args:
        classes: the head's class names, one per logit column except the last.
        groups: superclass -> member classes.
        names: requested classes and/or groups (None: all classes).
        score_thresh: minimum probability of the winning name.
    """

    def __init__(self, classes: Sequence[str], groups: Optional[Mapping[str, Sequence[str]]] = None,
                 names: Optional[Sequence[str]] = None, score_thresh: float = 0.5) -> None:
        classes = tuple(classes)
        groups = {k: tuple(v) for k, v in (groups or {}).items()}
        names = classes if names is None else check_class_names(names, what="list of requested classes")
        known = list(classes) + [g for g in groups if g not in classes]
        unknown = [n for n in names if n not in known]
        if not names or unknown:
            raise ValueError(f"unknown class names {unknown or list(names)}; the head knows: {', '.join(known)}")
        index = {c: i for i, c in enumerate(classes)}
        self.classes = classes
        self.names = names
        self.score_thresh = float(score_thresh)
        self.members: List[List[int]] = [[index[n]] if n in index else [index[c] for c in groups[n] if c in index]
                                         for n in names]

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Probability of each requested name and of "anything else": ``[K, len(names) + 1]``."""
        logits = np.asarray(logits, np.float32)
        if logits.ndim != 2 or logits.shape[1] != len(self.classes) + 1:
            raise ValueError(f"class logits must be [K, {len(self.classes) + 1}], got {logits.shape}")
        return grouped_probs(softmax(logits), self.members)

    def __call__(self, logits: np.ndarray, iou_preds: Any = None) -> ScoredMasks:
        p = self.probs(logits)
        best = p[:, :-1].argmax(1) if len(p) else np.zeros(0, np.int64)
        score = p[np.arange(len(p)), best]
        keep = (score >= self.score_thresh) & (score >= p[:, -1])
        return ScoredMasks(keep=keep, fields={"category_id": (best + 1).astype(np.int64), "class_score": score.astype(np.float32)})
