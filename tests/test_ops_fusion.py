"""samantic.ops.panoptic_fusion against the numpy reference samantic.pipeline.panoptic.panoptic_fusion.

The reference works on dense ``[N, H, W]`` masks and restarts after each dropped candidate;
the kernel walks the RLEs once. Both must give the same map and kept flags, bit for bit, on
overlapping shapes, tied scores and every threshold; the CUDA backend must match the CPU one.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from pycocotools import mask as coco

from samantic import _C, ops
from samantic.ops import FusionResult, RleBatch
from samantic.pipeline.panoptic import panoptic_fusion as reference

CUDA = _C.cuda_status()
gpu = [pytest.mark.gpu, pytest.mark.skipif(CUDA["device_count"] == 0, reason="no CUDA device")]


def _shapes(n, h, w, seed):
    """Unions of rectangles and discs that overlap, nest and repeat, plus empty, full, one-pixel and
    sparse masks: what merged SAM-CP candidates look like, and the corners."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        kind = rng.integers(0, 10)
        if kind == 0:
            continue  # empty
        if kind == 1:
            out[i] = True
        elif kind == 2:
            out[i, rng.integers(0, h), rng.integers(0, w)] = True
        elif kind == 3:
            out[i] = rng.random((h, w)) < 0.2
        elif kind == 4 and i > 0:
            out[i] = out[rng.integers(0, i)]  # a duplicate of an earlier candidate
        else:
            for _ in range(rng.integers(1, 4)):
                if rng.random() < 0.5:
                    y0, x0 = rng.integers(0, h), rng.integers(0, w)
                    out[i, y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = True
                else:
                    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.5, max(1.0, max(h, w) / 3))
                    out[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    return out


def _scores(n, seed):
    """Few distinct values (many exact ties), sometimes all equal."""
    rng = np.random.default_rng(seed + 1)
    if rng.random() < 0.2:
        return np.full(n, 0.5)
    return rng.integers(0, max(2, n // 3), n) / max(2, n // 3)


def assert_matches_reference(masks, scores, overlap_thresh, min_area, out):
    ref_map, ref_kept = reference(masks, scores, overlap_thresh, min_area)
    fused, kept = out
    assert isinstance(out, FusionResult)
    assert fused.dtype == np.int32 and fused.shape == masks.shape[1:]
    assert kept.dtype == bool and kept.shape == (len(masks),)
    np.testing.assert_array_equal(kept, ref_kept)
    np.testing.assert_array_equal(fused, ref_map)


# (h, w, n, seed): 1x1, one row, one column, odd non-square sizes, many candidates
CASES = [(1, 1, 6, 0), (2, 2, 9, 1), (1, 97, 8, 2), (83, 1, 8, 3), (37, 53, 12, 4), (48, 64, 30, 5), (61, 29, 1, 6),
         (120, 97, 40, 7), (97, 120, 25, 8)]


@pytest.mark.parametrize("h, w, n, seed", CASES, ids=[f"{c[0]}x{c[1]}-n{c[2]}" for c in CASES])
@pytest.mark.parametrize("overlap_thresh", [0.0, 0.25, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("min_area", [0, 1, 7, 40])
def test_matches_numpy_reference(h, w, n, seed, overlap_thresh, min_area):
    for s in range(3):
        masks = _shapes(n, h, w, seed * 10 + s)
        scores = _scores(n, seed * 10 + s)
        out = ops.panoptic_fusion(ops.rle_encode(masks), scores, overlap_thresh, min_area)
        assert_matches_reference(masks, scores, overlap_thresh, min_area, out)


def test_random_cases_are_not_trivial():
    """The suite's cases drop candidates after others painted (the restart path of the reference)
    and keep several per image."""
    masks = _shapes(40, 120, 97, 70)
    scores = _scores(40, 70)
    fused, kept = ops.panoptic_fusion(ops.rle_encode(masks), scores, 0.5, 7)
    area = masks.reshape(40, -1).sum(1)
    assert kept.sum() >= 5
    assert (~kept & (area > 7)).sum() >= 5  # dropped for the overlap, not only for size
    assert len(np.unique(fused)) == kept.sum() + (fused == 0).any()


def test_dropped_candidate_frees_its_pixels():
    """A (best) takes columns 0-3; B overlaps A on 3 of its 4 columns and is dropped; C, the
    worst, then gets column 4, which B would have taken had it painted before being judged."""
    h, w = 2, 6
    a, b, c = (np.zeros((h, w), bool) for _ in range(3))
    a[:, 0:4] = True
    b[:, 1:5] = True
    c[:, 4:6] = True
    masks = np.stack([c, a, b])  # indices: c=0, a=1, b=2
    fused, kept = ops.panoptic_fusion(ops.rle_encode(masks), [0.1, 0.9, 0.5], overlap_thresh=0.5)
    assert kept.tolist() == [True, True, False]
    assert fused.tolist() == [[2, 2, 2, 2, 1, 1]] * 2


def test_ties_keep_index_order():
    """Equal scores: the lower index goes first; an identical copy after it has nothing left."""
    m = np.zeros((3, 4, 5), bool)
    m[:, 1:3, 1:4] = True
    fused, kept = ops.panoptic_fusion(ops.rle_encode(m), np.array([0.7, 0.7, 0.7], np.float32), 0.0, 0)
    assert kept.tolist() == [True, False, False]
    assert (fused[1:3, 1:4] == 1).all() and fused.sum() == 6


def test_threshold_boundaries():
    """Keeping exactly overlap_thresh of the area is enough; keeping exactly min_area pixels, or
    having exactly min_area, is not."""
    m = np.zeros((2, 1, 8), bool)
    m[0, 0, 0:2] = True  # the better one: 2 pixels
    m[1, 0, 0:4] = True  # 4 pixels, 2 of them left free
    rles = ops.rle_encode(m)
    assert ops.panoptic_fusion(rles, [1.0, 0.0], 0.5).kept.tolist() == [True, True]
    assert ops.panoptic_fusion(rles, [1.0, 0.0], 0.5 + 1e-9).kept.tolist() == [True, False]
    m[0, 0, 2] = True  # 3 pixels
    m[1, 0, 4] = True  # 5 pixels, 2 of them left free
    rles = ops.rle_encode(m)
    assert ops.panoptic_fusion(rles, [1.0, 0.0], 0.0, 1).kept.tolist() == [True, True]
    assert ops.panoptic_fusion(rles, [1.0, 0.0], 0.0, 2).kept.tolist() == [True, False]
    # area 3 <= 3: the better one is dropped and the other keeps its 5 pixels
    fused, kept = ops.panoptic_fusion(rles, [1.0, 0.0], 0.0, 3)
    assert kept.tolist() == [False, True] and fused.tolist() == [[2, 2, 2, 2, 2, 0, 0, 0]]


def test_no_candidates_empty_masks_and_one_pixel():
    empty = RleBatch(np.zeros(0, np.uint32), np.zeros(1, np.int64), (7, 5))
    fused, kept = ops.panoptic_fusion(empty, np.zeros(0))
    assert fused.shape == (7, 5) and fused.dtype == np.int32 and not fused.any()
    assert kept.shape == (0,) and kept.dtype == bool
    fused, kept = ops.panoptic_fusion([], [])
    assert fused.shape == (0, 0) and kept.shape == (0,)
    zeros = np.zeros((4, 6, 3), bool)
    assert_matches_reference(zeros, np.arange(4.0), 0.5, 0, ops.panoptic_fusion(ops.rle_encode(zeros), np.arange(4.0)))
    one = np.ones((3, 1, 1), bool)
    fused, kept = ops.panoptic_fusion(ops.rle_encode(one), [0.2, 0.9, 0.9])
    assert fused.tolist() == [[2]] and kept.tolist() == [False, True, False]
    assert not ops.panoptic_fusion(ops.rle_encode(one), [0.2, 0.9, 0.9], min_area=1).kept.any()
    zero_size = RleBatch(np.zeros(2, np.uint32), np.arange(3, dtype=np.int64), (0, 4))
    fused, kept = ops.panoptic_fusion(zero_size, [1.0, 2.0])
    assert fused.shape == (0, 4) and kept.tolist() == [False, False]


def test_input_forms_agree():
    """RleBatch, uncompressed and pycocotools-compressed dicts, merge_patches output; numpy
    float32/int and torch scores."""
    masks = _shapes(12, 37, 53, 3)
    scores = _scores(12, 3)
    ref = ops.panoptic_fusion(ops.rle_encode(masks), scores, 0.4, 3)
    compressed = coco.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    merged = ops.merge_patches(ops.rle_encode(masks), [[i] for i in range(12)]).rles
    for rles in (ops.rle_encode(masks).to_dicts(), compressed, merged):
        for s in (scores, scores.astype(np.float32), torch.from_numpy(scores), list(scores)):
            out = ops.panoptic_fusion(rles, s, 0.4, 3)
            np.testing.assert_array_equal(out.map, ref.map)
            np.testing.assert_array_equal(out.kept, ref.kept)
    ints = (scores * 6).astype(np.int64)
    assert_matches_reference(masks, ints, 0.4, 3, ops.panoptic_fusion(compressed, ints, 0.4, 3))


def test_noncanonical_rles():
    """Zero-length runs inside an RLE (legal COCO, not what encoders write) are skipped."""
    h, w = 4, 3
    rles = RleBatch.pack([np.array([2, 0, 3, 3, 4], np.uint32), np.array([0, 2, 0, 1, 9], np.uint32),
                          np.array([0, 0, 12], np.uint32)], (h, w))
    dense = ops.rle_decode(rles).astype(bool)
    for thr in (0.0, 0.5, 1.0):
        assert_matches_reference(dense, [0.3, 0.6, 0.9], thr, 0, ops.panoptic_fusion(rles, [0.3, 0.6, 0.9], thr))


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small():
    return ops.rle_encode(_shapes(3, 10, 12, 0))


def test_bad_scores_rejected(small):
    with pytest.raises(ValueError, match=re.escape("scores must have shape (3,), one per RLE, got (2,)")):
        ops.panoptic_fusion(small, [0.1, 0.2])
    with pytest.raises(ValueError, match=re.escape("scores must have shape (3,), one per RLE, got (3, 1)")):
        ops.panoptic_fusion(small, np.zeros((3, 1)))
    with pytest.raises(ValueError, match="scores must be real numbers, got dtype <U1"):
        ops.panoptic_fusion(small, ["a", "b", "c"])
    with pytest.raises(ValueError, match=re.escape("scores must not be NaN, got scores[1]=nan")):
        ops.panoptic_fusion(small, [0.1, np.nan, 0.3])


@pytest.mark.parametrize("kw, shows", [
    ({"overlap_thresh": -0.1}, "overlap_thresh must be in [0, 1], got -0.1"),
    ({"overlap_thresh": 1.5}, "overlap_thresh must be in [0, 1], got 1.5"),
    ({"overlap_thresh": float("nan")}, "overlap_thresh must be in [0, 1], got nan"),
    ({"overlap_thresh": "0.5"}, "overlap_thresh must be a number in [0, 1], got '0.5'"),
    ({"min_area": -1}, "min_area must be >= 0, got -1"),
    ({"min_area": 1.5}, "min_area must be an integer number of pixels, got 1.5"),
    ({"min_area": True}, "min_area must be an integer number of pixels, got True"),
    ({"device": "gpu"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
])
def test_bad_arguments_rejected(small, kw, shows):
    with pytest.raises(ValueError, match=re.escape(shows)):
        ops.panoptic_fusion(small, [0.1, 0.2, 0.3], **kw)


def test_bad_rles_rejected(small):
    bad = RleBatch(small.counts, small.offsets, (11, 12))
    with pytest.raises(ValueError, match=r"rles\[0\]: run lengths sum to 120 but the mask size 11x12 has 132"):
        ops.panoptic_fusion(bad, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="must all have one size"):
        ops.panoptic_fusion([{"size": [2, 2], "counts": [4]}, {"size": [2, 3], "counts": [6]}], [0.1, 0.2])


def test_cuda_without_a_device_is_an_error(small):
    if CUDA["device_count"] > 0:
        pytest.skip("a CUDA device is visible")
    err = RuntimeError if CUDA["compiled"] else ValueError
    with pytest.raises(err):
        ops.panoptic_fusion(small, [0.1, 0.2, 0.3], device="cuda")


# --------------------------------------------------------------------------- CUDA


# (h, w, n, seed): the CPU cases plus 640x480 images with 200 and 60 candidates
GPU_CASES = CASES + [(480, 640, 200, 9), (480, 640, 60, 10)]


@pytest.mark.parametrize("h, w, n, seed", GPU_CASES, ids=[f"{c[0]}x{c[1]}-n{c[2]}" for c in GPU_CASES])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_cuda_identical_to_cpu(device, h, w, n, seed):
    masks = _shapes(n, h, w, seed)
    rles, scores = ops.rle_encode(masks), _scores(n, seed)
    for overlap_thresh, min_area in [(0.0, 0), (0.5, 0), (0.5, 16), (0.8, 7), (1.0, 1)]:
        cuda = ops.panoptic_fusion(rles, scores, overlap_thresh, min_area, device=device)
        cpu = ops.panoptic_fusion(rles, scores, overlap_thresh, min_area, device="cpu")
        assert cuda.map.dtype == np.int32 and cuda.map.shape == (h, w) and cuda.kept.dtype == bool
        assert cuda.map.tobytes() == cpu.map.tobytes(), (overlap_thresh, min_area)
        assert cuda.kept.tobytes() == cpu.kept.tobytes(), (overlap_thresh, min_area)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu), pytest.param("cuda:0", marks=gpu)])
def test_cuda_empty_and_repeated_calls(device):
    empty = RleBatch(np.zeros(0, np.uint32), np.zeros(1, np.int64), (7, 5))
    fused, kept = ops.panoptic_fusion(empty, np.zeros(0), device=device)
    assert fused.shape == (7, 5) and not fused.any() and kept.shape == (0,)
    zeros = ops.rle_encode(np.zeros((3, 6, 4), bool))
    assert not ops.panoptic_fusion(zeros, [0.1, 0.2, 0.3], device=device).kept.any()
    masks = _shapes(30, 48, 64, 5)
    rles, scores = ops.rle_encode(masks), _scores(30, 5)
    first = ops.panoptic_fusion(rles, scores, 0.5, 3, device=device)
    for _ in range(3):  # buffers and streams are per call
        again = ops.panoptic_fusion(rles, scores, 0.5, 3, device=device)
        assert again.map.tobytes() == first.map.tobytes() and again.kept.tobytes() == first.kept.tobytes()
    assert_matches_reference(masks, scores, 0.5, 3, first)


@pytest.mark.parametrize("device", [pytest.param("cuda:99", marks=gpu)])
def test_cuda_bad_device_index_is_a_runtime_error(device, small):
    with pytest.raises(RuntimeError):
        ops.panoptic_fusion(small, [0.1, 0.2, 0.3], device=device)
