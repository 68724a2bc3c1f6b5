"""Fuzzes ``merge_patches`` (per query the union of some patches' RLEs): patches canonical or
not (zero-length runs), of zero size, as dicts or ``RleBatch``; groups as index lists (repeats,
empty groups, negative or out-of-range indices, floats, bools), ``[Q, P]`` membership matrices
(bool, 0/1 ints or floats, other values, wrong width) and ``PatchGroups`` with broken CSR.

Oracle: the dense union of the decoded patches; the result's RLE must be its canonical RLE,
area and XYXY box must be its own; invalid groups must be rejected.

    .venv/bin/python fuzz/fuzz_merge.py [corpus dir] -max_total_time=60
"""

from __future__ import annotations

import numpy as np

from common import call, canonical_counts, check, main, random_masks, seed_inputs, wild_int, xyxy_box
from samantic import ops
from samantic.ops import PatchGroups, RleBatch


def patches_of(fdp):
    """(RleBatch or dicts, dense bool [P, H, W])."""
    masks = random_masks(fdp, n_max=6, side_max=10)
    p, h, w = masks.shape
    if fdp.ConsumeBool():
        return ops.rle_encode(masks), masks
    # non-canonical counts of the same masks: split runs with zero-length runs in between
    dicts = []
    for m in masks:
        counts = canonical_counts(m)
        out = []
        for c in counts:
            if c and fdp.ConsumeIntInRange(0, 3) == 0:
                a = fdp.ConsumeIntInRange(0, c)
                out += [a, 0, c - a]
            else:
                out.append(c)
        if fdp.ConsumeBool():
            out += [0, 0]
        dicts.append({"size": [h, w], "counts": out})
    if fdp.ConsumeBool():
        return RleBatch.from_dicts(dicts), masks
    return dicts, masks


def groups_of(fdp, p: int):
    """(groups argument, list of index lists or None when the groups are invalid)."""
    q = fdp.ConsumeIntInRange(0, 5)
    kind = fdp.ConsumeIntInRange(0, 4)
    lists = [[fdp.ConsumeIntInRange(0, p - 1) for _ in range(fdp.ConsumeIntInRange(0, 4))] if p else []
             for _ in range(q)]
    if kind == 0:
        return lists, lists
    if kind == 1:  # membership matrix
        dt = fdp.PickValueInList([bool, np.int64, np.uint8, np.float32, np.int8])
        mat = np.zeros((q, p), dt)
        for i, g in enumerate(lists):
            mat[i, g] = 1
        if fdp.ConsumeIntInRange(0, 3) == 0 and q and p and dt is not bool:
            v = fdp.PickValueInList([2, -1, 0.5])
            if np.can_cast(np.min_scalar_type(v), dt) or isinstance(v, float) and np.dtype(dt).kind == "f":
                mat[fdp.ConsumeIntInRange(0, q - 1), fdp.ConsumeIntInRange(0, p - 1)] = v
        valid = None if (mat[(mat != 0) & (mat != 1)]).size else [np.flatnonzero(row).tolist() for row in mat]
        if fdp.ConsumeIntInRange(0, 5) == 0:
            mat = np.zeros((q, p + 1), dt)
            valid = None
        return mat, valid
    if kind == 2:  # one bad index
        if lists and any(lists):
            i = fdp.ConsumeIntInRange(0, len(lists) - 1)
            if lists[i]:
                bad = fdp.PickValueInList([p, -1, p + 100, -(2**63), 2**63 - 1, 2**63, 1.5])
                lists[i][fdp.ConsumeIntInRange(0, len(lists[i]) - 1)] = bad
                ok = isinstance(bad, int) and not isinstance(bad, bool) and 0 <= bad < p
                return lists, lists if ok else None
        return lists, lists
    if kind == 3:  # PatchGroups with a broken CSR
        g = PatchGroups.from_lists(lists)
        indptr, indices = g.indptr.copy(), g.indices.copy()
        which = fdp.ConsumeIntInRange(0, 4)
        v = wild_int(fdp, -2, max(len(indices), p) + 2)
        v = v if -(2**63) <= v < 2**63 else -1
        if which == 0 and len(indptr):
            indptr[fdp.ConsumeIntInRange(0, len(indptr) - 1)] = v
        elif which == 1 and len(indices):
            indices[fdp.ConsumeIntInRange(0, len(indices) - 1)] = v
        elif which == 2:
            indptr = indptr[:-1]
        elif which == 3:
            indptr = indptr.astype(np.float64)
        valid_csr = (indptr.dtype.kind in "iu" and len(indptr) >= 1 and indptr[0] == 0
                     and bool(np.all(np.diff(indptr) >= 0)) and indptr[-1] == len(indices)
                     and bool(np.all((indices >= 0) & (indices < p))))
        if valid_csr:
            return PatchGroups(indptr, indices), [indices[indptr[i]:indptr[i + 1]].tolist()
                                                  for i in range(len(indptr) - 1)]
        return PatchGroups(indptr, indices), None
    return fdp.PickValueInList(["ab", {"a": 1}, 3, None, [[0.5]], [None], np.zeros((2, 2, 2))]), None


def TestOneInput(data: bytes) -> None:
    fdp = __import__("atheris").FuzzedDataProvider(data)
    patches, masks = patches_of(fdp)
    p, h, w = masks.shape
    groups, want_lists = groups_of(fdp, p)
    ok, res = call(ops.merge_patches, patches, groups)
    if want_lists is None:
        check(not ok, f"invalid groups accepted: {groups!r:.300} for {p} patches; got {res!r:.200}")
        return
    if p == 0:  # an empty list of dicts has no size: 0 x 0; an RleBatch keeps its own
        h, w = patches.size if isinstance(patches, RleBatch) else (0, 0)
    check(ok, f"valid merge_patches call rejected: {res}; groups {groups!r:.200}")
    q = len(want_lists)
    check(len(res.rles) == q and res.area.shape == (q,) and res.boxes.shape == (q, 4), "result lengths")
    check(res.rles.size == (h, w), f"size {res.rles.size} vs {(h, w)}")
    dicts = res.rles.to_dicts()
    for i, g in enumerate(want_lists):
        union = masks[g].any(0) if len(g) else np.zeros((h, w), bool)
        check(dicts[i]["counts"] == canonical_counts(union), f"query {i} ({g}): RLE {dicts[i]['counts']} vs "
                                                            f"{canonical_counts(union)}")
        check(int(res.area[i]) == int(union.sum()), f"query {i}: area {res.area[i]} vs {union.sum()}")
        check(res.boxes[i].tolist() == xyxy_box(union), f"query {i}: box {res.boxes[i]} vs {xyxy_box(union)}")


def seeds():
    return seed_inputs(seed=5)


if __name__ == "__main__":
    main(TestOneInput, seeds)
