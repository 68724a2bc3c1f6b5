"""Fuzzes uncompressed COCO RLE dicts and CSR batches through the RLE ops: ``rle_decode``,
``rle_area``, ``rle_to_bbox``, ``rle_iou``, ``rle_merge``, ``rle_compress`` / ``rle_decompress``,
``RleBatch`` with arbitrary arrays.

Inputs: counts lists with odd lengths, huge (> 2^32), negative, float, bool or object values,
numpy arrays of every integer dtype, sizes that do not match the counts, are negative, huge
(h * w overflowing 64 bits), floats or strings; and valid masks.

Oracles: a valid RLE (non-negative counts that fit uint32 and sum to h * w) gives what
pycocotools gives (decode, area, toBbox, iou, merge, the compressed string); an invalid one is
rejected; a decompressed dict holds exactly the counts it was given.

    .venv/bin/python fuzz/fuzz_rle_dict.py [corpus dir] -max_total_time=60
"""

from __future__ import annotations

import numbers

import numpy as np

from common import (U32_MAX, _C, call, canonical_counts, check, coco, coco_encode, dense_from_counts,
                    is_canonical, main, must_reject, random_masks, seed_inputs, split_total, wild_int, xywh_box)
from samantic import ops
from samantic.ops import RleBatch

DENSE_MAX = 4096
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


def _int_like(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _size_value(v):
    """The integer a size entry stands for, or None: ints, integral floats and digit strings are
    taken at their value (lenient), anything else (3.5, NaN, inf, None) must be rejected."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if _int_like(v):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return int(v) if np.isfinite(v) and float(v).is_integer() else None
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return None
    return None


def wild_counts(fdp, total: int):
    """A counts value: mostly a list/array summing to ``total``, sometimes broken."""
    counts = split_total(fdp, max(total, 0)) if total >= 0 else [fdp.ConsumeIntInRange(0, 9)]
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind <= 3:
        return counts
    if kind == 4 and counts:  # one value replaced by something wild (negative, > 2^32, 2^64 ...)
        counts[fdp.ConsumeIntInRange(0, len(counts) - 1)] = wild_int(fdp)
        return counts
    if kind == 5 and counts:  # a value shifted by a multiple of 2^32: wraps to the same uint32
        i = fdp.ConsumeIntInRange(0, len(counts) - 1)
        counts[i] += fdp.PickValueInList([2**32, 2**33, 2**64, -(2**32)])
        return counts
    if kind == 6:  # numpy array of some integer dtype (values may not fit: then skip)
        dt = fdp.PickValueInList(INT_DTYPES)
        if all(np.iinfo(dt).min <= c <= np.iinfo(dt).max for c in counts):
            return np.array(counts, dt)
        return counts
    if kind == 7:
        return fdp.PickValueInList([[1.0, 2.0], [0.5], [True, False], [None], [[1, 2]], "", None, 3, np.zeros(
            (2, 2), np.int64), np.array([1.5, 2.5]), np.array(["a"]), [2**70], [-(2**70)], {"a": 1}])
    if kind == 8:  # a float array that holds integers
        return np.array(counts, np.float64)
    return counts + [fdp.ConsumeIntInRange(0, 5)]  # sum no longer matches (unless 0 added)


def wild_size(fdp, h: int, w: int):
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind <= 5:
        return [h, w]
    if kind == 6:
        return [wild_int(fdp), wild_int(fdp)]
    if kind == 7:  # h * w overflows 64 bits (or 32) while counts may still match it modulo 2^64
        return fdp.PickValueInList([[2**32, 2**32], [2**33, 2**31], [2**62, 4], [-1, -1], [2**63 - 1, 2],
                                    [-(2**32), -(2**32)], [2**31, 2**31]])
    if kind == 8:
        return fdp.PickValueInList([[h], [h, w, 1], [float(h), float(w)], [h + 0.5, w], ["3", "4"], None, "ab",
                                    [None, w], [float("inf"), w], [float("nan"), w], np.array([h, w]), (h, w)])
    return [w, h]


def normalize(rle):
    """(h, w, counts as Python ints) when ``rle`` is a valid RLE dict, else None."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        return None
    size, counts = rle["size"], rle["counts"]
    if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2:
        return None
    h, w = _size_value(size[0]), _size_value(size[1])
    if h is None or w is None or h < 0 or w < 0:
        return None
    if isinstance(counts, (str, bytes)):
        try:
            counts = _C.rle_from_string(counts.encode("ascii") if isinstance(counts, str) else counts)
        except ValueError:
            return None
    if isinstance(counts, np.ndarray):
        if counts.ndim != 1 or (counts.size and counts.dtype.kind not in "iu"):
            return None
        counts = counts.tolist()
    if not isinstance(counts, list) or not all(_int_like(c) for c in counts):
        return None
    counts = [int(c) for c in counts]
    if any(c < 0 or c > U32_MAX for c in counts):
        return None
    return h, w, counts


def check_valid(rles, parsed, fdp) -> None:
    """Every op on valid RLEs of one size, against pycocotools / dense numpy."""
    h, w = parsed[0][0], parsed[0][1]
    hw = h * w
    n = len(rles)
    counts = [p[2] for p in parsed]
    if hw >= 2**63 or not all(sum(c) == hw for c in counts):
        for fn in (ops.rle_area, ops.rle_decode, ops.rle_to_bbox):
            must_reject(f"counts do not sum to h * w = {h}x{w}", fn, rles)
        return
    area = ops.rle_area(rles)
    check(area.tolist() == [sum(c[1::2]) for c in counts], f"rle_area {area} for {counts}")
    dec = ops.rle_decompress(rles)
    check([d["counts"] for d in dec] == counts, f"rle_decompress changed the counts: {dec} vs {counts}")
    comp = ops.rle_compress(rles)
    check([_C.rle_from_string(d["counts"].encode()).tolist() for d in comp] == counts, "compress round trip")
    if hw > DENSE_MAX or n == 0:
        return
    mc = coco()
    ref_rles = [mc.frPyObjects({"size": [h, w], "counts": c}, h, w) for c in counts]
    for d, r in zip(comp, ref_rles):
        check(d["counts"].encode() == r["counts"], f"compressed {d['counts']!r} != pycocotools {r['counts']!r}")
    dense = ops.rle_decode(rles)
    check(dense.shape == (n, h, w) and dense.dtype == np.uint8, f"rle_decode shape {dense.shape} {dense.dtype}")
    for i, c in enumerate(counts):
        check(np.array_equal(dense[i].astype(bool), dense_from_counts(c, h, w)), f"rle_decode mask {i} of {c}")
    boxes = ops.rle_to_bbox(rles)
    check(boxes.shape == (n, 4) and boxes.dtype == np.float64, f"rle_to_bbox {boxes.shape} {boxes.dtype}")
    for i, c in enumerate(counts):
        want = xywh_box(dense[i])
        check(boxes[i].tolist() == want, f"rle_to_bbox {boxes[i]} vs {want} for {c} size {[h, w]}")
        if h and w and is_canonical(c):
            check(boxes[i].tolist() == mc.toBbox(ref_rles[i]).tolist(), f"rle_to_bbox vs pycocotools for {c}")
    # merge: dense union / intersection
    intersect = fdp.ConsumeBool()
    merged = ops.rle_merge(rles, intersect=intersect)
    want = dense.astype(bool).all(0) if intersect else dense.astype(bool).any(0)
    check(merged["size"] == [h, w] and sum(merged["counts"]) == hw, f"rle_merge {merged}")
    check(np.array_equal(dense_from_counts(merged["counts"], h, w), want), f"rle_merge wrong for {counts}")
    canonical = all(is_canonical(c) for c in counts)  # pycocotools' bbox prefilter is wrong otherwise
    if n >= 2 and h and w and canonical:
        ref = mc.merge(ref_rles, intersect=intersect)
        check(mc.decode(ref).astype(bool).tolist() == want.tolist(), "pycocotools merge disagrees with numpy")
    # iou against a second set (some of the same masks), crowd flags random
    k = fdp.ConsumeIntInRange(0, n)
    gt = rles[:k]
    crowd = [fdp.ConsumeBool() for _ in range(k)]
    iou = ops.rle_iou(rles, gt, crowd)
    check(iou.shape == (n, k), f"rle_iou shape {iou.shape}")
    d = dense.reshape(n, -1).astype(bool)
    for i in range(n):
        for j in range(k):
            inter = int((d[i] & d[j]).sum())
            uni = int(d[i].sum()) if crowd[j] else int((d[i] | d[j]).sum())
            want_iou = inter / uni if uni else 0.0
            check(abs(iou[i, j] - want_iou) < 1e-12, f"rle_iou[{i},{j}] {iou[i, j]} vs {want_iou}")
    if k and h and w and canonical:
        ref_iou = np.asarray(mc.iou(ref_rles, ref_rles[:k], [int(c) for c in crowd])).reshape(n, k)
        check(np.allclose(ref_iou, iou, atol=1e-12), f"rle_iou vs pycocotools {iou} {ref_iou}")


def dicts_mode(fdp) -> None:
    if fdp.ConsumeIntInRange(0, 9) == 0:  # h * w a multiple of 2^64: wraps to 0, like an empty counts list
        size = fdp.PickValueInList([[2**32, 2**32], [2**62, 4], [2**33, 2**31], [2**40, 2**40], [2**63 - 2**62, 4]])
        fn = fdp.PickValueInList([ops.rle_area, ops.rle_to_bbox, ops.rle_merge, lambda r: ops.rle_iou(r, r),
                                  lambda r: ops.merge_patches(r, [[0]])])
        must_reject(f"mask size {size} overflows 64 bits", fn, [{"size": size, "counts": []}])
        return
    n = fdp.ConsumeIntInRange(0, 4)
    h, w = fdp.ConsumeIntInRange(0, 9), fdp.ConsumeIntInRange(0, 9)
    rles = []
    for _ in range(n):
        size = wild_size(fdp, h, w)
        total = h * w if isinstance(size, list) and size == [h, w] else -1
        rle = {"size": size, "counts": wild_counts(fdp, total if total >= 0 else h * w)}
        if fdp.ConsumeIntInRange(0, 15) == 0:
            rle = fdp.PickValueInList([{"size": [h, w]}, {"counts": [h * w]}, [h * w], None, "x"])
        rles.append(rle)
    parsed = [normalize(r) for r in rles]
    sizes = {(p[0], p[1]) for p in parsed if p is not None}
    op = fdp.ConsumeIntInRange(0, 6)
    if all(p is not None for p in parsed) and len(sizes) <= 1:
        if n == 0:
            check(len(ops.rle_area(rles)) == 0, "no RLEs, no areas")
            must_reject("rle_merge of nothing", ops.rle_merge, rles)
            return
        check_valid(rles, parsed, fdp)
        return
    # something is invalid: whichever op runs must reject it
    fn = [ops.rle_decode, ops.rle_area, ops.rle_to_bbox, ops.rle_merge, ops.rle_compress, ops.rle_decompress,
          lambda r: ops.rle_iou(r, r)][op]
    what = f"rles {[r if not isinstance(r, dict) else {k: v for k, v in r.items()} for r in rles]!r:.300}"
    if op in (4, 5) and all(p is not None for p in parsed):
        # compress/decompress do not need the counts to sum to h * w, only one size
        ok, res = call(fn, rles)
        if ok:
            check(len(sizes) <= 1, f"mixed sizes accepted: {what}")
        return
    must_reject(what, fn, rles)


def batch_mode(fdp) -> None:
    """RleBatch built directly from arrays (what the kernels see)."""
    h, w = wild_int(fdp, 0, 8), wild_int(fdp, 0, 8)
    n = fdp.ConsumeIntInRange(0, 4)
    parts = [split_total(fdp, h * w) if 0 <= h * w <= 200 else [fdp.ConsumeIntInRange(0, 9)] for _ in range(n)]
    counts = [c for p in parts for c in p]
    offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()
    kind = fdp.ConsumeIntInRange(0, 6)
    cdt, odt = np.uint32, np.int64
    if kind == 1 and offsets:
        offsets[fdp.ConsumeIntInRange(0, len(offsets) - 1)] = wild_int(fdp, -2, len(counts) + 2)
    elif kind == 2:
        cdt = fdp.PickValueInList([np.int32, np.int64, np.uint64, np.float32, np.uint16])
    elif kind == 3:
        odt = fdp.PickValueInList([np.int32, np.uint64, np.float64])
    elif kind == 4:
        offsets = offsets[:-1] if fdp.ConsumeBool() else []
    elif kind == 5 and counts:
        counts[fdp.ConsumeIntInRange(0, len(counts) - 1)] += fdp.ConsumeIntInRange(1, 3)
    if any(not -(2**63) <= o < 2**63 for o in offsets) or not (-(2**63) <= h < 2**63 and -(2**63) <= w < 2**63):
        return
    cs = np.array(counts, np.int64).astype(cdt)
    if fdp.ConsumeIntInRange(0, 7) == 0:
        cs = cs.reshape(1, -1)
    b = RleBatch(cs, np.array(offsets, odt), (h, w))
    valid = (cdt is np.uint32 and odt is np.int64 and cs.ndim == 1 and len(offsets) >= 1 and offsets[0] == 0
             and offsets[-1] == len(counts) and all(a <= b_ for a, b_ in zip(offsets, offsets[1:])) and h >= 0
             and w >= 0 and h * w < 2**64)
    if valid:
        totals = [sum(counts[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]
        valid = all(t == h * w for t in totals)
    op = fdp.ConsumeIntInRange(0, 7)
    fn = [ops.rle_area, ops.rle_to_bbox, ops.rle_merge,
          lambda r: ops.mask_nms(r, np.ones(len(r), np.float32), 0.5),
          lambda r: ops.rle_iou(r, r),
          ops.rle_decode if 0 <= h * w <= DENSE_MAX else ops.rle_area,
          lambda r: ops.merge_patches(r, [list(range(len(r)))]),
          lambda r: ops.panoptic_fusion(r, np.ones(len(r))) if 0 <= h * w <= DENSE_MAX else ops.rle_area(r)][op]
    ok, res = call(fn, b)
    if not valid:
        check(not ok, f"invalid batch accepted by op {op}: counts {counts} ({np.dtype(cdt)}), offsets {offsets} "
                      f"({np.dtype(odt)}), size {(h, w)}; got {res!r:.200}")


def encoded_mode(fdp) -> None:
    """Masks encoded by rle_encode vs pycocotools.mask.encode, then every op."""
    masks = random_masks(fdp)
    b = ops.rle_encode(masks)
    n, h, w = masks.shape
    check(len(b) == n and b.size == (h, w), f"rle_encode batch {len(b)} {b.size}")
    dicts = b.to_dicts()
    for i in range(n):
        check(dicts[i]["counts"] == canonical_counts(masks[i]), f"rle_encode mask {i}: {dicts[i]['counts']}")
    if n and h and w:
        ref = coco_encode(masks)
        comp = b.to_dicts(compressed=True)
        for i in range(n):
            check(comp[i]["counts"].encode() == ref[i]["counts"], f"compressed mask {i}")
    check(np.array_equal(ops.rle_decode(b).astype(bool), masks), "decode(encode(m)) != m")
    if n:
        check_valid(dicts, [(h, w, d["counts"]) for d in dicts], fdp)


def TestOneInput(data: bytes) -> None:
    fdp = __import__("atheris").FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:
        dicts_mode(fdp)
    elif mode == 1:
        batch_mode(fdp)
    else:
        encoded_mode(fdp)


def seeds():
    return seed_inputs(seed=2)


if __name__ == "__main__":
    main(TestOneInput, seeds)
