"""Patch merging: per query, the union of some patches' RLE masks, run by run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence, Union

import numpy as np

from samantic.ops._common import as_numpy, load_C
from samantic.ops.rle import RleBatch, RleLike, _batch


@dataclass(frozen=True)
class PatchGroups:
    """Which patches form each query's union, as CSR: query ``q`` is
    ``indices[indptr[q]:indptr[q + 1]]``.

    Attributes:
        indptr: int64 ``[Q + 1]``, starts at 0, non-decreasing, ends at ``len(indices)``.
        indices: int64 ``[nnz]`` patch indices (repeats are harmless).
    """

    indptr: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_lists(cls, groups: Sequence[Sequence[int]]) -> "PatchGroups":
        """One sequence of patch indices per query (an empty one gives an empty mask)."""
        parts = []
        for q, g in enumerate(groups):
            a = as_numpy(g)
            if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
                raise ValueError(f"groups[{q}] must be a sequence of integer patch indices, got {g!r:.80}"
                                 + ("; for a membership matrix pass a 2-D array [Q, P]" if a.dtype == bool else ""))
            parts.append(a.astype(np.int64))
        indptr = np.zeros(len(parts) + 1, np.int64)
        if parts:
            indptr[1:] = np.cumsum([len(p) for p in parts])
        indices = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return cls(indptr, indices)

    @classmethod
    def from_membership(cls, membership: Any, n_patches: int) -> "PatchGroups":
        """A ``[Q, P]`` matrix, bool or 0/1, row ``q`` marking the patches of query ``q``."""
        m = as_numpy(membership)
        if m.ndim != 2 or m.shape[1] != n_patches:
            raise ValueError(f"membership must have shape (Q, {n_patches}) (one column per patch), got {m.shape}")
        if m.dtype != bool:
            if m.dtype.kind not in "iuf":
                raise ValueError(f"membership must be bool or 0/1, got dtype {m.dtype}")
            bad = m[(m != 0) & (m != 1)]
            if bad.size:
                raise ValueError(f"membership must be bool or 0/1, got the value {bad[0].item()!r} ({m.dtype})")
            m = m != 0
        rows, cols = np.nonzero(m)
        indptr = np.zeros(m.shape[0] + 1, np.int64)
        indptr[1:] = np.cumsum(np.bincount(rows, minlength=m.shape[0]))
        return cls(indptr, cols.astype(np.int64))


GroupsLike = Union[PatchGroups, Sequence[Sequence[int]], np.ndarray, Any]


def _groups(groups: GroupsLike, n_patches: int) -> PatchGroups:
    if isinstance(groups, PatchGroups):
        return groups
    if hasattr(groups, "ndim") and groups.ndim == 2:  # numpy array or torch tensor
        return PatchGroups.from_membership(groups, n_patches)
    if isinstance(groups, (str, bytes, dict)) or not hasattr(groups, "__len__"):
        raise ValueError("groups must be a PatchGroups, a membership matrix [Q, P] or a list of index lists, "
                         f"got {type(groups).__name__}")
    return PatchGroups.from_lists(groups)


class MergedPatches(NamedTuple):
    """Per-query results of :func:`merge_patches` (unpacks as ``rles, area, boxes``).

    Attributes:
        rles: the unions as an :class:`~samantic.ops.RleBatch` of the patches' size.
        area: int64 ``[Q]`` foreground pixels.
        boxes: int64 ``[Q, 4]`` XYXY with inclusive max, zeros for an empty union (the
            convention of ``PostprocessResult.boxes`` and ``MaskSet.boxes``; pycocotools'
            XYWH ``toBbox`` is ``[x0, y0, x1 - x0 + 1, y1 - y0 + 1]`` of it).
    """

    rles: RleBatch
    area: np.ndarray
    boxes: np.ndarray


def merge_patches(patches: RleLike, groups: GroupsLike, device: str = "cpu") -> MergedPatches:
    """Unions of patches, one per query, computed on the RLEs (no full-resolution mask).

    Each query's RLE is a k-way merge of its patches' runs (pycocotools'
    ``mask.merge(rles, intersect=False)`` for many groups at once, by ``samantic._C``,
    one query per loop iteration or CUDA thread); area and box come from the same pass.
    An empty group gives an empty mask (area 0, zero box).

    Args:
        patches: P RLEs of one size (:class:`~samantic.ops.RleBatch` or COCO dicts).
            Pass an RleBatch to keep the size when there are no patches.
        groups: a :class:`PatchGroups` (CSR), a ``[Q, P]`` bool or 0/1 membership
            matrix (numpy or torch), or Q sequences of patch indices.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        :class:`MergedPatches` ``(rles, area int64[Q], boxes int64[Q, 4])``.
    """
    b = _batch(patches, "patches")
    g = _groups(groups, len(b))
    indptr = np.ascontiguousarray(as_numpy(g.indptr))
    indices = np.ascontiguousarray(as_numpy(g.indices))
    for name, a in (("indptr", indptr), ("indices", indices)):
        if a.dtype.kind not in "iu" and not (a.size == 0 and a.dtype.kind == "f"):
            raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    out = load_C().merge_patches(b.counts, b.offsets, b.size[0], b.size[1], indptr.astype(np.int64, copy=False),
                                 indices.astype(np.int64, copy=False), str(device))
    return MergedPatches(RleBatch(out["counts"], out["offsets"], b.size), out["area"], out["boxes"])
