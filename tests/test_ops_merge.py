"""samantic.ops.merge_patches against pycocotools.mask.merge (union), area and toBbox."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from pycocotools import mask as coco

from samantic import ops
from samantic.ops import PatchGroups, RleBatch, merge_patches


def coco_encode(masks: np.ndarray) -> list:
    """pycocotools wants Fortran-order H x W x N uint8."""
    return coco.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def coco_union(rles: list, group, h: int, w: int) -> dict:
    """pycocotools' union of a group; an empty group is an empty mask (pycocotools gives a 0x0 RLE)."""
    if len(group) == 0:
        return coco_encode(np.zeros((1, h, w), np.uint8))[0]
    return coco.merge([rles[int(i)] for i in group], intersect=False)


def xyxy(xywh: np.ndarray) -> np.ndarray:
    """pycocotools' XYWH toBbox as the project's inclusive XYXY (zeros stay zeros)."""
    x, y, bw, bh = xywh
    return np.array([0, 0, 0, 0] if bw == 0 else [x, y, x + bw - 1, y + bh - 1], np.int64)


def assert_matches_pycocotools(masks: np.ndarray, groups: list, out) -> None:
    n, h, w = masks.shape
    ref_rles = coco_encode(masks) if n else []
    rles, area, boxes = out
    assert len(rles) == len(groups) and rles.size == (h, w)
    assert area.dtype == np.int64 and area.shape == (len(groups),)
    assert boxes.dtype == np.int64 and boxes.shape == (len(groups), 4)
    ours = rles.to_dicts(compressed=True)
    decoded = ops.rle_decode(rles)
    for q, g in enumerate(groups):
        ref = coco_union(ref_rles, g, h, w)
        assert ours[q]["counts"].encode() == ref["counts"], f"query {q} (patches {list(g)})"
        assert area[q] == coco.area(ref), q
        np.testing.assert_array_equal(boxes[q], xyxy(coco.toBbox(ref)), err_msg=f"query {q}")
        # and against the decoded masks themselves, the most independent reference
        expect = masks[np.asarray(g, np.int64)].any(0) if len(g) else np.zeros((h, w), bool)
        np.testing.assert_array_equal(decoded[q], expect, err_msg=f"query {q}")


# --------------------------------------------------------------------------- inputs


def _random(shape, p, seed):
    return (np.random.default_rng(seed).random(shape) < p).astype(np.uint8)


def _blobs(n, h, w, seed):
    """Rectangles and discs: long runs that overlap, touch and nest, like SAM patches."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5:
                y0, x0 = rng.integers(0, h), rng.integers(0, w)
                out[i, y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = True
            else:
                cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(h, w) / 3)
                out[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    return out.astype(np.uint8)


def _mixed(h, w, seed):
    """Empty, full, sparse, dense, single-pixel and column masks in one batch."""
    m = [np.zeros((h, w)), np.ones((h, w)), _random((h, w), 0.05, seed), _random((h, w), 0.9, seed + 1),
         _random((h, w), 0.5, seed + 2)]
    one = np.zeros((h, w))
    one[h // 2, w // 2] = 1
    col = np.zeros((h, w))
    col[:, w // 3] = 1
    return np.stack(m + [one, col]).astype(np.uint8)


CASES = {
    "1x1": np.stack([np.zeros((1, 1)), np.ones((1, 1)), np.ones((1, 1))]).astype(np.uint8),
    "1xW": _random((6, 1, 97), 0.4, 1),
    "Hx1": _random((6, 83, 1), 0.4, 2),
    "odd_sparse": _random((8, 37, 53), 0.05, 3),
    "odd_dense": _random((8, 37, 53), 0.9, 4),
    "odd_half": _random((10, 61, 29), 0.5, 5),
    "mixed": _mixed(31, 33, 6),
    "all_zero": np.zeros((4, 20, 30), np.uint8),
    "all_one": np.ones((3, 20, 30), np.uint8),
    "checkerboard": (np.indices((2, 31, 33)).sum(0) % 2).astype(np.uint8),  # complementary: the union is full
    "blobs": _blobs(24, 120, 97, 7),
    "blobs_large": _blobs(40, 480, 641, 8),
}


def _groups(n, n_queries, seed):
    """Empty, single, all, duplicated and random subsets of n patches."""
    rng = np.random.default_rng(seed)
    groups = [[], [0], [n - 1], list(range(n)), [0, 0, 0], list(range(n))[::-1] * 2]
    for _ in range(n_queries):
        k = int(rng.integers(1, n + 1))
        groups.append(rng.choice(n, size=k, replace=bool(rng.random() < 0.3)).tolist())
    return groups


@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_patches_matches_pycocotools(name):
    masks = CASES[name]
    groups = _groups(len(masks), 20, len(name))
    assert_matches_pycocotools(masks, groups, merge_patches(ops.rle_encode(masks), groups))


def test_blobs_are_not_trivial():
    """The blob unions have several runs per column and differ from every single patch."""
    masks = CASES["blobs"]
    rles, area, _ = merge_patches(ops.rle_encode(masks), [[0, 1, 2, 3]])
    assert 0 < area[0] < masks[0].size
    assert area[0] > masks[:4].reshape(4, -1).sum(1).max()
    assert len(rles.counts_of(0)) > 20


def test_group_forms_agree():
    """CSR, lists, bool and 0/1 membership matrices (numpy and torch) give one result."""
    masks = CASES["blobs"]
    patches = ops.rle_encode(masks)
    groups = _groups(len(masks), 10, 0)
    member = np.zeros((len(groups), len(masks)), bool)
    for q, g in enumerate(groups):
        member[q, g] = True
    ref = merge_patches(patches, groups)
    for form in (member, member.astype(np.uint8), member.astype(np.float32), torch.from_numpy(member),
                 PatchGroups.from_lists(groups), PatchGroups.from_membership(member, len(masks)),
                 [np.asarray(g, np.int32) for g in groups], tuple(tuple(g) for g in groups)):
        out = merge_patches(patches, form)
        assert out.rles.counts.tobytes() == ref.rles.counts.tobytes()
        assert out.rles.offsets.tobytes() == ref.rles.offsets.tobytes()
        np.testing.assert_array_equal(out.area, ref.area)
        np.testing.assert_array_equal(out.boxes, ref.boxes)


def test_dict_patches_compressed_and_not():
    masks = CASES["odd_half"]
    groups = _groups(len(masks), 5, 1)
    ref = merge_patches(ops.rle_encode(masks), groups)
    for patches in (coco_encode(masks), ops.rle_encode(masks).to_dicts()):
        out = merge_patches(patches, groups)
        assert out.rles.to_dicts(compressed=True) == ref.rles.to_dicts(compressed=True)


def test_no_queries_and_no_patches():
    patches = ops.rle_encode(CASES["odd_half"])
    rles, area, boxes = merge_patches(patches, [])
    assert len(rles) == 0 and rles.offsets.tolist() == [0] and area.shape == (0,) and boxes.shape == (0, 4)
    empty = RleBatch(np.zeros(0, np.uint32), np.zeros(1, np.int64), (7, 5))
    rles, area, boxes = merge_patches(empty, [[], []])
    assert rles.to_dicts() == [{"size": [7, 5], "counts": [35]}] * 2
    assert area.tolist() == [0, 0] and boxes.tolist() == [[0, 0, 0, 0]] * 2


def test_noncanonical_input_runs():
    """Zero-length runs inside an input (legal COCO, not what encoders write) still give the canonical union."""
    h, w = 4, 3
    patches = RleBatch.pack([np.array([2, 0, 3, 3, 4], np.uint32), np.array([0, 2, 0, 1, 9], np.uint32)], (h, w))
    rles, area, boxes = merge_patches(patches, [[0], [1], [0, 1]])
    dense = ops.rle_decode(patches)
    for q, g in enumerate([[0], [1], [0, 1]]):
        expect = dense[g].any(0)
        assert ops.rle_decode(rles)[q].tolist() == expect.astype(np.uint8).tolist()
        assert rles.to_dicts(compressed=True)[q]["counts"].encode() == coco_encode(expect[None])[0]["counts"]
    assert area.tolist() == [3, 3, 6]


# --------------------------------------------------------------------------- real patches


@pytest.fixture(scope="module")
def sam_patches():
    """Segment-everything patches of the shipped sam_nano on a small held-out scene."""
    from samantic.models import create_model
    from samantic.pipeline import AutomaticMaskGenerator
    from samantic.train.data.shapes import render_scene

    image = render_scene(900001, size=(120, 160)).image
    gen = AutomaticMaskGenerator(create_model("sam_nano"), points_per_side=8, pred_iou_thresh=0.3,
                                 stability_score_thresh=0.5)
    masks = gen.generate_masks(image)
    assert len(masks) >= 5, "the shipped nano finds patches on this scene"
    return masks


def test_real_patches_match_pycocotools(sam_patches):
    patches = sam_patches.rles
    dense = ops.rle_decode(patches)
    groups = _groups(len(patches), 40, 2)
    out = merge_patches(patches, groups)
    assert_matches_pycocotools(dense, groups, out)
    # a patch alone is itself, with the generator's own box
    singles = merge_patches(patches, [[i] for i in range(len(patches))])
    assert singles.rles.counts.tobytes() == patches.counts.tobytes()
    np.testing.assert_array_equal(singles.boxes, sam_patches.boxes)
    np.testing.assert_array_equal(singles.area, ops.rle_area(patches))


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small():
    return ops.rle_encode(CASES["odd_half"])  # 10 patches


@pytest.mark.parametrize(
    "indptr, indices, shows",
    [
        ([0, 2, 3], [0, 10, 1], "indices[1]=10 (query 0) is out of range for 10 patches"),
        ([0, 1], [-1], "indices[0]=-1 (query 0)"),
        ([0, 2, 1, 3], [0, 1, 2], "indptr must be non-decreasing, got indptr[1]=2 then indptr[2]=1"),
        ([0, 2], [0, 1, 2], "indptr must end at len(indices)=3, got indptr[1]=2"),
        ([1, 2], [0, 1], "indptr must start at 0, got indptr[0]=1"),
        ([], [], "indptr must have Q + 1 entries"),
    ],
)
def test_bad_csr_rejected(small, indptr, indices, shows):
    groups = PatchGroups(np.asarray(indptr, np.int64), np.asarray(indices, np.int64))
    with pytest.raises(ValueError, match=re.escape(shows)):
        merge_patches(small, groups)


def test_bad_groups_rejected(small):
    with pytest.raises(ValueError, match=r"indices\[2\]=12 \(query 1\)"):
        merge_patches(small, [[0, 1], [12]])
    with pytest.raises(ValueError, match=r"membership must have shape \(Q, 10\).*got \(2, 9\)"):
        merge_patches(small, np.ones((2, 9), bool))
    with pytest.raises(ValueError, match=r"membership must be bool or 0/1, got the value 2"):
        merge_patches(small, np.full((2, 10), 2, np.int64))
    with pytest.raises(ValueError, match=r"groups\[0\] must be a sequence of integer patch indices.*membership"):
        merge_patches(small, [[True, False] * 5])
    with pytest.raises(ValueError, match=r"groups\[1\] must be a sequence of integer patch indices"):
        merge_patches(small, [[0], [0.5]])
    with pytest.raises(ValueError, match="groups must be a PatchGroups"):
        merge_patches(small, 3)
    with pytest.raises(ValueError, match="indptr must hold integers, got dtype float64"):
        merge_patches(small, PatchGroups(np.array([0.0, 1.0]), np.array([0])))


def test_bad_patches_and_device_rejected(small):
    bad = RleBatch(small.counts, small.offsets, (61, 30))
    with pytest.raises(ValueError, match=r"patches\[0\]: run lengths sum to 1769 but the mask size 61x30 has 1830"):
        merge_patches(bad, [[0]])
    # a later decrease is caught before an earlier offset past the counts is read
    broken = RleBatch(small.counts, np.array([0, 10**6, *small.offsets[2:]], np.int64), small.size)
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing, got 1000000 then 1750"):
        merge_patches(broken, [[0]])
    with pytest.raises(ValueError, match="must all have one size"):
        merge_patches([{"size": [2, 2], "counts": [4]}, {"size": [2, 3], "counts": [6]}], [[0, 1]])
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        merge_patches(small, [[0]], device="gpu")
