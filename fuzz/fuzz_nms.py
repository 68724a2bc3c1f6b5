"""Fuzzes box NMS (``ops.nms``) and mask NMS (``ops.mask_nms``): boxes with NaN, inf, -0.0,
huge or degenerate (x2 < x1, zero area) coordinates, duplicate and tied scores, NaN scores,
thresholds NaN/inf/negative/above 1, categories, mismatched lengths, wrong shapes and dtypes.

Oracles: a pure numpy greedy NMS in float32 with torchvision's IoU formula and a stable
descending score order (finite scores); mask NMS against pycocotools' IoU of the same RLEs;
for NaN scores: kept indices unique, in range, and every suppressed box suppressed by a kept one.

    .venv/bin/python fuzz/fuzz_nms.py [corpus dir] -max_total_time=60
"""

from __future__ import annotations

import math

import numpy as np

from common import (EDGE_FLOATS, call, check, coco, coco_encode, main, must_reject, random_masks, seed_inputs,
                    wild_int)
from samantic import ops


def box_iou32(a: np.ndarray, b: np.ndarray) -> np.float32:
    """torchvision's IoU of two XYXY float32 boxes, one float32 rounding per operation."""
    f = np.float32
    with np.errstate(all="ignore"):
        xx1, yy1 = max(a[0], b[0]), max(a[1], b[1])
        xx2, yy2 = min(a[2], b[2]), min(a[3], b[3])
        w = f(xx2 - xx1) if f(xx2 - xx1) > 0 else f(0)
        h = f(yy2 - yy1) if f(yy2 - yy1) > 0 else f(0)
        inter = f(w * h)
        area_a = f(f(a[2] - a[0]) * f(a[3] - a[1]))
        area_b = f(f(b[2] - b[0]) * f(b[3] - b[1]))
        return f(inter / f(f(area_a + area_b) - inter))


def greedy(n: int, scores: np.ndarray, suppress) -> list:
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    removed = np.zeros(n, bool)
    keep = []
    for a, i in enumerate(order):
        if removed[i]:
            continue
        keep.append(int(i))
        for j in order[a + 1:]:
            if not removed[j] and suppress(i, j):
                removed[j] = True
    return keep


def coord(fdp) -> float:
    k = fdp.ConsumeIntInRange(0, 5)
    if k == 0:
        return fdp.PickValueInList(EDGE_FLOATS)
    if k == 1:
        return float(fdp.ConsumeIntInRange(0, 8))  # exact ties and shared edges
    return fdp.ConsumeFloatInRange(-2.0, 20.0)


def boxes_mode(fdp) -> None:
    n = fdp.ConsumeIntInRange(0, 12)
    boxes = np.array([[coord(fdp) for _ in range(4)] for _ in range(n)], np.float64).reshape(n, 4)
    if fdp.ConsumeBool():  # proper boxes: x2 >= x1, y2 >= y1
        boxes[:, 2:] = boxes[:, :2] + np.abs(boxes[:, 2:])
    with np.errstate(over="ignore", invalid="ignore"):
        boxes = boxes.astype(np.float32)
    scores = np.array([fdp.PickValueInList([0.5, 0.9, 0.1, 0.5, -0.0, 0.0, math.inf, -math.inf, math.nan])
                       if fdp.ConsumeBool() else fdp.ConsumeFloatInRange(0.0, 1.0) for _ in range(n)], np.float32)
    thr = fdp.PickValueInList([0.5, 0.0, 1.0, 0.3, 0.7, -1.0, 2.0, math.inf, -math.inf, 1e-7]) \
        if fdp.ConsumeBool() else fdp.ConsumeFloatInRange(0.0, 1.0)
    idxs = None
    if fdp.ConsumeBool():
        idxs = np.array([fdp.ConsumeIntInRange(0, 2) if fdp.ConsumeIntInRange(0, 7) else wild_int(fdp)
                         for _ in range(n)], dtype=object)
        idxs = idxs.astype(np.int64) if all(-(2**63) <= v < 2**63 for v in idxs) else np.zeros(n, np.int64)
    # sometimes break one argument: wrong shape, dtype or length
    broken = fdp.ConsumeIntInRange(0, 9)
    args = [boxes, scores, thr, idxs]
    if broken == 1:
        args[0] = boxes.reshape(-1)
    elif broken == 2:
        args[0] = boxes.astype(np.float64)
    elif broken == 3 and n:
        args[1] = scores[:-1]
    elif broken == 4:
        args[0] = np.zeros((n, 5), np.float32)
    elif broken == 5 and idxs is not None and n:
        args[3] = idxs[:-1]
    elif broken == 6:
        args[2] = math.nan
    elif broken == 7:
        args[1] = scores.astype(np.float16)
    ok, keep = call(ops.nms, *args)
    if broken in (1, 2, 4, 7) or (broken == 3 and n) or (broken == 5 and idxs is not None and n) or broken == 6:
        check(not ok, f"broken nms argument {broken} accepted: got {keep!r:.200}")
        return
    check(ok, f"valid nms call rejected: {keep}")
    check(keep.dtype == np.int64 and keep.ndim == 1, f"keep {keep.dtype} {keep.shape}")
    check(len(set(keep.tolist())) == len(keep) and all(0 <= k < n for k in keep.tolist()), f"keep {keep} for {n}")

    def suppress(i, j):
        if idxs is not None and idxs[i] != idxs[j]:
            return False
        return float(box_iou32(boxes[i], boxes[j])) > thr

    if not np.isnan(scores).any():
        want = greedy(n, scores, suppress)
        check(keep.tolist() == want, f"nms kept {keep.tolist()}, reference {want}; boxes {boxes.tolist()} "
                                     f"scores {scores.tolist()} thr {thr} idxs {idxs}")
    else:  # order undefined with NaN: only consistency
        kept = set(keep.tolist())
        for j in range(n):
            if j not in kept:
                check(any(suppress(i, j) for i in kept), f"box {j} dropped but no kept box suppresses it")


def masks_mode(fdp) -> None:
    masks = random_masks(fdp, n_max=6, side_max=8)
    n, h, w = masks.shape
    b = ops.rle_encode(masks)
    scores = np.array([fdp.PickValueInList([0.5, 0.9, 0.1, math.nan, -0.0, math.inf])
                       if fdp.ConsumeBool() else fdp.ConsumeFloatInRange(0.0, 1.0) for _ in range(n)], np.float32)
    thr = fdp.PickValueInList([0.5, 0.0, 1.0, -1.0, 2.0, math.inf]) if fdp.ConsumeBool() else \
        fdp.ConsumeFloatInRange(0.0, 1.0)
    idxs = np.array([fdp.ConsumeIntInRange(0, 1) for _ in range(n)], np.int64) if fdp.ConsumeBool() else None
    broken = fdp.ConsumeIntInRange(0, 5)
    if broken == 4:
        must_reject("NaN iou_threshold", ops.mask_nms, b, scores, math.nan, idxs)
        return
    if broken == 1 and n:
        must_reject("scores of another length", ops.mask_nms, b, scores[1:], thr, idxs)
        return
    if broken == 2:
        must_reject("float64 scores", ops.mask_nms, b, scores.astype(np.float64), thr, idxs)
        return
    if broken == 3 and n and idxs is not None:
        must_reject("idxs of another length", ops.mask_nms, b, scores, thr, idxs[1:])
        return
    ok, keep = call(ops.mask_nms, b, scores, thr, idxs)
    check(ok, f"valid mask_nms call rejected: {keep}")
    flat = masks.reshape(n, h * w)

    def iou(i, j):
        inter = int((flat[i] & flat[j]).sum())
        uni = int((flat[i] | flat[j]).sum())
        return inter / uni if uni else 0.0

    def suppress(i, j):
        return (idxs is None or idxs[i] == idxs[j]) and iou(i, j) > thr

    check(len(set(keep.tolist())) == len(keep) and all(0 <= k < n for k in keep.tolist()), f"keep {keep}")
    if not np.isnan(scores).any():
        want = greedy(n, scores, suppress)
        check(keep.tolist() == want, f"mask_nms kept {keep.tolist()}, reference {want}")
        if n and h and w:
            r = coco_encode(masks)
            ref_iou = np.asarray(coco().iou(r, r, [0] * n)).reshape(n, n)
            for i in range(n):
                for j in range(n):
                    if i != j:
                        check(abs(ref_iou[i, j] - iou(i, j)) < 1e-12, "pycocotools iou disagrees with numpy")
    else:
        kept = set(keep.tolist())
        for j in range(n):
            if j not in kept:
                check(any(suppress(i, j) for i in kept), f"mask {j} dropped but no kept mask suppresses it")


def TestOneInput(data: bytes) -> None:
    fdp = __import__("atheris").FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 2):
        boxes_mode(fdp)
    else:
        masks_mode(fdp)


def seeds():
    return seed_inputs(seed=4)


if __name__ == "__main__":
    main(TestOneInput, seeds)
