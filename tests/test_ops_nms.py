"""samantic.ops box NMS against torchvision.ops, mask NMS against a greedy loop over pycocotools IoUs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from pycocotools import mask as coco

from samantic import _C, ops

CUDA = _C.cuda_status()
from conftest import DEVICES  # noqa: E402
THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 1.0]


def random_boxes(n: int, seed: int, span: float = 100.0):
    """XYXY float32 boxes, half of them jittered copies of others (IoUs up to ~1), and distinct scores."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, span, size=(n, 2))
    wh = rng.uniform(1, span / 2, size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    copies = np.flatnonzero(rng.random(n) < 0.5)
    src = rng.integers(0, n, len(copies))
    boxes[copies] = boxes[src] + rng.normal(0, 1.5, (len(copies), 4)) * (boxes[src, 2:] - boxes[src, :2]).repeat(2, 1) / 20
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
    boxes = boxes.astype(np.float32)
    scores = (rng.permutation(n) / n + 0.5 / n).astype(np.float32)
    return boxes, scores


def tv_nms(boxes, scores, thr, idxs=None) -> np.ndarray:
    b, s = torch.from_numpy(boxes), torch.from_numpy(scores)
    keep = torchvision.ops.nms(b, s, thr) if idxs is None else torchvision.ops.batched_nms(b, s, torch.from_numpy(idxs), thr)
    return keep.numpy()


# --------------------------------------------------------------------------- box NMS vs torchvision


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("thr", THRESHOLDS)
@pytest.mark.parametrize("n, seed", [(1, 0), (7, 1), (64, 2), (300, 3)])
def test_nms_matches_torchvision(device, thr, n, seed):
    boxes, scores = random_boxes(n, seed)
    keep = ops.nms(boxes, scores, thr, device=device)
    ref = tv_nms(boxes, scores, thr)
    assert keep.dtype == np.int64
    np.testing.assert_array_equal(keep, ref)
    # kept by descending score
    assert np.all(np.diff(scores[keep]) < 0)
    if 0 < thr < 1 and n > 50:
        assert 0 < len(keep) < n  # the case suppresses something, and not everything


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("thr", THRESHOLDS)
@pytest.mark.parametrize("n, n_cat, seed", [(50, 3, 4), (300, 7, 5), (1200, 5, 6)])  # 1200 boxes: torchvision's vanilla path
def test_batched_nms_matches_torchvision(device, thr, n, n_cat, seed):
    boxes, scores = random_boxes(n, seed)
    idxs = np.random.default_rng(seed + 100).integers(0, n_cat, n).astype(np.int64)
    keep = ops.nms(boxes, scores, thr, idxs=idxs, device=device)
    np.testing.assert_array_equal(keep, tv_nms(boxes, scores, thr, idxs))
    if 0 < thr < 1:
        # categories matter: ignoring them suppresses more
        assert len(keep) > len(ops.nms(boxes, scores, thr, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_nms_torch_inputs_and_negative_categories(device):
    boxes, scores = random_boxes(80, 7)
    idxs = np.random.default_rng(8).integers(-2, 2, 80)
    keep = ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.4, idxs=torch.from_numpy(idxs), device=device)
    np.testing.assert_array_equal(keep, tv_nms(boxes, scores, 0.4, idxs))
    # strided views: every other box, columns reordered then restored
    view = np.asfortranarray(boxes)[::2]
    assert not view.flags.c_contiguous
    keep = ops.nms(view, scores[::2], 0.4, device=device)
    np.testing.assert_array_equal(keep, tv_nms(np.ascontiguousarray(view), scores[::2].copy(), 0.4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("thr", [0.0, 0.5, 0.99, 1.0])
def test_nms_duplicates_and_degenerate_boxes(device, thr):
    """Identical boxes (IoU exactly 1), zero-area boxes (0/0 IoU never suppresses), nested and touching boxes."""
    boxes = np.array(
        [
            [10, 10, 20, 20],
            [10, 10, 20, 20],
            [5, 5, 5, 5],  # a point
            [5, 5, 5, 5],
            [0, 0, 30, 0],  # a line
            [12, 12, 18, 18],  # inside box 0
            [20, 10, 30, 20],  # touches box 0 along an edge: IoU 0
            [-5, -5, 0, 0],
        ],
        np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], np.float32)
    keep = ops.nms(boxes, scores, thr, device=device)
    np.testing.assert_array_equal(keep, tv_nms(boxes, scores, thr))
    assert 0 in keep and 2 in keep and 3 in keep and 6 in keep


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("thr", [0.3, 0.7, 0.1, 0.6])
@pytest.mark.parametrize("frac", [(1, 10), (3, 10), (7, 10), (6, 10), (3, 5)])
def test_nms_iou_on_the_threshold(device, thr, frac):
    """IoUs of small integer ratios land exactly on float32(thr): torchvision compares the float32 IoU
    with the threshold as a double, so float32(0.3) = 0.300000012 > 0.3 suppresses."""
    inter, union = frac
    boxes = np.array([[0, 0, union, 1], [0, 0, inter, 1]], np.float32)
    scores = np.array([1.0, 0.5], np.float32)
    np.testing.assert_array_equal(ops.nms(boxes, scores, thr, device=device), tv_nms(boxes, scores, thr))


def test_nms_empty():
    keep = ops.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5)
    assert keep.dtype == np.int64 and keep.shape == (0,)
    keep = ops.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5, idxs=np.zeros(0, np.int64))
    assert keep.shape == (0,)


# --------------------------------------------------------------------------- box NMS: invalid input


def test_nms_rejects_bad_input():
    boxes, scores = random_boxes(4, 9)
    cases = [
        (lambda: ops.nms(boxes.astype(np.float64), scores, 0.5), "float64"),
        (lambda: ops.nms(boxes, scores.astype(np.float16), 0.5), "float16"),
        (lambda: ops.nms(np.zeros((3, 5), np.float32), np.zeros(3, np.float32), 0.5), "(3, 5)"),
        (lambda: ops.nms(boxes[0], scores, 0.5), "(4,)"),
        (lambda: ops.nms(boxes, scores[:3], 0.5), "(3,)"),
        (lambda: ops.nms(boxes, scores[:, None], 0.5), "(4, 1)"),
        (lambda: ops.nms(boxes, scores, 0.5, idxs=np.zeros(5, np.int64)), "(5,)"),
        (lambda: ops.nms(boxes, scores, float("nan")), "nan"),
        (lambda: ops.nms(boxes, scores, 0.5, device="tpu"), "'tpu'"),
        (lambda: ops.nms(boxes, scores, 0.5, device="cuda:x"), "'cuda:x'"),
    ]
    for fn, shown in cases:
        with pytest.raises(ValueError) as e:
            fn()
        assert shown in str(e.value), (shown, str(e.value))


def test_nms_cuda_unavailable_is_an_error():
    if CUDA["device_count"] > 0:
        pytest.skip("a CUDA device is available")
    boxes, scores = random_boxes(10, 10)
    expected = RuntimeError if CUDA["compiled"] else ValueError
    for device in ("cuda", "cuda:0"):
        with pytest.raises(expected) as e:
            ops.nms(boxes, scores, 0.5, device=device)
        assert device in str(e.value) or "CUDA" in str(e.value)
    if not CUDA["compiled"]:
        assert "without CUDA" in str(e.value)


# --------------------------------------------------------------------------- mask NMS vs pycocotools IoU


def coco_encode(masks: np.ndarray) -> list:
    return coco.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def greedy_reference(rles: list, scores: np.ndarray, thr: float, idxs=None) -> np.ndarray:
    """Greedy NMS over pycocotools' IoU matrix: the definition, nothing more."""
    iou = coco.iou(rles, rles, [0] * len(rles))
    order = sorted(range(len(rles)), key=lambda i: -scores[i])
    removed = np.zeros(len(rles), bool)
    keep = []
    for a, i in enumerate(order):
        if removed[i]:
            continue
        keep.append(i)
        for j in order[a + 1 :]:
            if (idxs is None or idxs[i] == idxs[j]) and iou[i, j] > thr:
                removed[j] = True
    return np.array(keep, np.int64)


def random_masks(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Jittered discs and boxes around a few centres: IoUs spread over [0, 1], a few empty masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    centres = rng.uniform([0, 0], [h, w], size=(4, 2))
    out = np.zeros((n, h, w), bool)
    for k in range(n):
        cy, cx = centres[rng.integers(4)] + rng.normal(0, 4, 2)
        r = rng.uniform(4, min(h, w) / 3)
        if rng.random() < 0.5:
            out[k] = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        else:
            out[k] = (abs(yy - cy) < r) & (abs(xx - cx) < r * rng.uniform(0.5, 1.5))
    out[rng.integers(n)] = False
    return out


@pytest.mark.parametrize("thr", THRESHOLDS + [0.9])
@pytest.mark.parametrize("with_idxs", [False, True])
@pytest.mark.parametrize("n, h, w, seed", [(1, 15, 12, 0), (40, 61, 47, 1), (150, 100, 120, 2)])
def test_mask_nms_matches_greedy_pycocotools(thr, with_idxs, n, h, w, seed):
    masks = random_masks(n, h, w, seed)
    rles = coco_encode(masks)
    scores = (np.random.default_rng(seed).permutation(n) / n).astype(np.float32)
    idxs = np.random.default_rng(seed + 1).integers(0, 3, n) if with_idxs else None
    ref = greedy_reference(rles, scores, thr, idxs)
    for inp in (rles, ops.rle_encode(masks)):  # pycocotools dicts and our batch
        keep = ops.mask_nms(inp, scores, thr, idxs=idxs)
        assert keep.dtype == np.int64
        np.testing.assert_array_equal(keep, ref)
    if n > 1 and 0 < thr < 1:
        assert 0 < len(ref) < n


@pytest.mark.parametrize("thr", [0.1, 0.3, 0.6, 0.7])
@pytest.mark.parametrize("frac", [(1, 10), (3, 10), (7, 10), (6, 10), (3, 5)])
def test_mask_nms_iou_on_the_threshold(thr, frac):
    """IoU exactly equal to the threshold (7/10 vs 0.7) does not exceed it, so nothing is suppressed
    (pycocotools computes 7/10 in double, and 0.7 is the same double)."""
    inter, union = frac
    masks = np.zeros((2, 1, union), np.uint8)
    masks[0] = 1
    masks[1, 0, :inter] = 1
    rles = coco_encode(masks)
    scores = np.array([1.0, 0.5], np.float32)
    np.testing.assert_array_equal(ops.mask_nms(rles, scores, thr), greedy_reference(rles, scores, thr))


def test_mask_nms_empty_and_bad_input():
    empty = ops.rle_encode(np.zeros((0, 4, 4), bool))
    keep = ops.mask_nms(empty, np.zeros(0, np.float32), 0.5)
    assert keep.dtype == np.int64 and keep.shape == (0,)
    assert ops.mask_nms([], np.zeros(0, np.float32), 0.5).shape == (0,)

    rles = ops.rle_encode(random_masks(5, 20, 20, 3))
    cases = [
        (lambda: ops.mask_nms(rles, np.ones(5, np.float64), 0.5), "float64"),
        (lambda: ops.mask_nms(rles, np.ones(4, np.float32), 0.5), "(4,)"),
        (lambda: ops.mask_nms(rles, np.ones((5, 1), np.float32), 0.5), "(5, 1)"),
        (lambda: ops.mask_nms(rles, np.ones(5, np.float32), 0.5, idxs=np.zeros(6, np.int64)), "(6,)"),
    ]
    for fn, shown in cases:
        with pytest.raises(ValueError) as e:
            fn()
        assert shown in str(e.value), (shown, str(e.value))


def test_mask_nms_rejects_nan_threshold():
    """fuzz_nms: box NMS rejected a NaN iou_threshold, mask NMS silently kept every mask."""
    rles = ops.rle_encode(random_masks(3, 20, 20, 1))
    with pytest.raises(ValueError, match="iou_threshold must be a number, got nan"):
        ops.mask_nms(rles, np.ones(3, np.float32), float("nan"))
