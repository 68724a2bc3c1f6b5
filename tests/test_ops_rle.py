"""samantic.ops RLE kernels against pycocotools.mask, the reference COCO implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as coco
from skimage import data, filters

from samantic import ops
from samantic.ops import RleBatch


def coco_encode(masks: np.ndarray) -> list:
    """pycocotools wants Fortran-order H x W x N uint8."""
    return coco.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def coco_decode(rles: list) -> np.ndarray:
    return coco.decode(rles).transpose(2, 0, 1)


# --------------------------------------------------------------------------- inputs


def _random(shape, p, seed):
    return (np.random.default_rng(seed).random(shape) < p).astype(np.uint8)


def _corners(h, w):
    m = np.zeros((4, h, w), np.uint8)
    m[0, 0, 0] = m[1, 0, -1] = m[2, -1, 0] = m[3, -1, -1] = 1
    return m


def _blobs(n, h, w, seed):
    """Smooth random fields thresholded: connected blobs with long runs and holes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        field = filters.gaussian(rng.standard_normal((h, w)), sigma=rng.uniform(2, 8))
        out.append(field > rng.uniform(-0.02, 0.05))
    return np.stack(out).astype(np.uint8)


def _real():
    coins = data.coins()
    camera = data.camera()
    masks = [coins > filters.threshold_otsu(coins)] + [camera > t for t in (30, 100, 200)]
    masks = [m[:303, :384] for m in masks]  # one size per batch
    return np.stack(masks).astype(np.uint8)


CASES = {
    "1x1_zero": np.zeros((1, 1, 1), np.uint8),
    "1x1_one": np.ones((1, 1, 1), np.uint8),
    "1xW": _random((5, 1, 97), 0.5, 1),
    "Hx1": _random((5, 83, 1), 0.5, 2),
    "odd_sparse": _random((6, 37, 53), 0.05, 3),
    "odd_dense": _random((6, 37, 53), 0.95, 4),
    "odd_half": _random((8, 61, 29), 0.5, 5),
    "wide": _random((3, 3, 1001), 0.3, 6),
    "all_zero": np.zeros((3, 40, 30), np.uint8),
    "all_one": np.ones((3, 40, 30), np.uint8),
    "mixed_empty_full": np.stack([np.zeros((17, 19)), np.ones((17, 19)), _random((17, 19), 0.5, 7)]).astype(np.uint8),
    "corners_odd": _corners(13, 7),
    "corners_square": _corners(8, 8),
    "checkerboard": (np.indices((2, 31, 33)).sum(0) % 2).astype(np.uint8),  # a run per pixel
    "full_columns": np.repeat((np.arange(41) % 3 == 0)[None, None, :], 23, axis=1).repeat(2, 0).astype(np.uint8),
    "blobs": _blobs(6, 120, 97, 8),
    "blobs_large": _blobs(2, 480, 641, 9),
    "real": _real(),
}


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request):
    return CASES[request.param]


# --------------------------------------------------------------------------- encode / decode


def test_encode_byte_identical_to_pycocotools(case):
    batch = ops.rle_encode(case)
    assert len(batch) == case.shape[0]
    assert batch.size == case.shape[1:]
    ours = ops.rle_compress(batch)
    ref = coco_encode(case)
    assert [r["counts"] for r in ours] == [r["counts"].decode() for r in ref]
    assert [r["size"] for r in ours] == [r["size"] for r in ref]
    # to_dicts(compressed=True) is the same thing
    assert [r["counts"] for r in batch.to_dicts(compressed=True)] == [r["counts"] for r in ours]


def test_uncompressed_counts_match_pycocotools(case):
    """Our list counts, handed to pycocotools, compress to pycocotools' own string."""
    h, w = case.shape[1:]
    ours = ops.rle_encode(case).to_dicts()
    ref = coco_encode(case)
    for o, r in zip(ours, ref):
        assert all(isinstance(c, int) for c in o["counts"])
        assert sum(o["counts"]) == h * w
        assert coco.frPyObjects(o, h, w)["counts"] == r["counts"]


def test_decode_roundtrip(case):
    dec = ops.rle_decode(ops.rle_encode(case))
    assert dec.dtype == np.uint8
    assert dec.shape == case.shape
    np.testing.assert_array_equal(dec, case)


@pytest.mark.parametrize("kind", ["str", "bytes"])
def test_decode_pycocotools_strings(case, kind):
    ref = coco_encode(case)
    dicts = [{"size": r["size"], "counts": r["counts"] if kind == "bytes" else r["counts"].decode()} for r in ref]
    np.testing.assert_array_equal(ops.rle_decode(dicts), coco_decode(ref))
    np.testing.assert_array_equal(ops.rle_decode(dicts), case)
    # decompress gives the same run lengths as encoding the mask directly
    assert ops.rle_decompress(dicts) == ops.rle_encode(case).to_dicts()


def test_nonzero_uint8_is_foreground():
    m = np.random.default_rng(0).integers(0, 4, size=(3, 21, 22), dtype=np.uint8)
    m[0] *= 60  # values 0, 60, 120, 180
    expected = coco_encode(m != 0)
    assert [r["counts"] for r in ops.rle_compress(ops.rle_encode(m))] == [r["counts"].decode() for r in expected]


def test_bool_torch_2d_and_strided_inputs():
    m = _blobs(3, 45, 70, 10)
    ref = [r["counts"].decode() for r in coco_encode(m)]
    strings = lambda b: [r["counts"] for r in ops.rle_compress(b)]  # noqa: E731
    assert strings(ops.rle_encode(m.astype(bool))) == ref
    assert strings(ops.rle_encode(torch.from_numpy(m.astype(bool)))) == ref
    assert strings(ops.rle_encode(torch.from_numpy(m))) == ref
    assert strings(ops.rle_encode(m[1])) == ref[1:2]  # [H, W] is one mask
    assert strings(ops.rle_encode(np.asfortranarray(m))) == ref
    # a transposed (non-contiguous) view encodes the transposed masks
    t = m.transpose(0, 2, 1)
    assert not t.flags.c_contiguous
    assert strings(ops.rle_encode(t.astype(bool))) == [r["counts"].decode() for r in coco_encode(np.ascontiguousarray(t))]
    # every other mask, every other row: strides in all dimensions
    s = m.astype(bool)[::2, ::2, ::3]
    assert strings(ops.rle_encode(s)) == [r["counts"].decode() for r in coco_encode(np.ascontiguousarray(s))]


# --------------------------------------------------------------------------- area, bbox, iou, merge


def test_area(case):
    area = ops.rle_area(ops.rle_encode(case))
    assert area.dtype == np.int64
    np.testing.assert_array_equal(area, coco.area(coco_encode(case)))


def test_to_bbox(case):
    box = ops.rle_to_bbox(ops.rle_encode(case))
    assert box.dtype == np.float64 and box.shape == (case.shape[0], 4)
    np.testing.assert_array_equal(box, coco.toBbox(coco_encode(case)))


def test_to_bbox_from_pycocotools_strings(case):
    ref = coco_encode(case)
    np.testing.assert_array_equal(ops.rle_to_bbox(ref), coco.toBbox(ref))
    np.testing.assert_array_equal(ops.rle_area(ref), coco.area(ref))


@pytest.mark.parametrize("crowd", [None, "mixed", "all"])
def test_iou(case, crowd):
    n = case.shape[0]
    dt, gt = case, np.concatenate([case[::-1], case[: max(1, n // 2)]])  # identical pairs, other pairs, and repeats
    rng = np.random.default_rng(n)
    iscrowd = {None: None, "mixed": rng.integers(0, 2, len(gt)), "all": np.ones(len(gt), int)}[crowd]
    ours = ops.rle_iou(ops.rle_encode(dt), ops.rle_encode(gt), iscrowd)
    ref = coco.iou(coco_encode(dt), coco_encode(gt), [0] * len(gt) if iscrowd is None else iscrowd.tolist())
    assert ours.dtype == np.float64 and ours.shape == (len(dt), len(gt))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_iou_blobs_overlap_a_lot():
    """Blob pairs with IoU spread over (0, 1); dicts with str counts as input."""
    a, b = _blobs(12, 90, 70, 11), _blobs(9, 90, 70, 12)
    ra, rb = coco_encode(a), coco_encode(b)
    ref = coco.iou(ra, rb, [0] * 9)
    assert ((ref > 0.05) & (ref < 0.95)).sum() > 20  # the case is not trivial
    dicts = lambda rs: [{"size": r["size"], "counts": r["counts"].decode()} for r in rs]  # noqa: E731
    np.testing.assert_allclose(ops.rle_iou(dicts(ra), dicts(rb)), ref, rtol=0, atol=1e-12)
    crowd = [1, 0, 1, 0, 0, 1, 1, 0, 1]
    np.testing.assert_allclose(ops.rle_iou(ra, rb, crowd), coco.iou(ra, rb, crowd), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        ops.rle_iou(ra, rb, np.array(crowd, bool)), coco.iou(ra, rb, crowd), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("intersect", [False, True])
def test_merge(case, intersect):
    ref = coco.merge(coco_encode(case), intersect=int(intersect))
    ours = ops.rle_merge(ops.rle_encode(case), intersect=intersect)
    assert ours["size"] == ref["size"]
    assert all(isinstance(c, int) for c in ours["counts"])
    assert ops.rle_compress([ours])[0]["counts"] == ref["counts"].decode()
    expected = case.all(0) if intersect else case.any(0)
    np.testing.assert_array_equal(ops.rle_decode([ours])[0], expected)


@pytest.mark.parametrize("intersect", [False, True])
def test_merge_blobs_pairs_and_many(intersect):
    m = _blobs(7, 64, 51, 13)
    for sel in ([0], [0, 1], [2, 3, 4], list(range(7))):
        ref = coco.merge(coco_encode(m[sel]), intersect=int(intersect))
        ours = ops.rle_merge(coco_encode(m[sel]), intersect=intersect)
        assert ops.rle_compress([ours])[0]["counts"] == ref["counts"].decode(), sel


# --------------------------------------------------------------------------- RleBatch


def test_batch_select_and_dicts():
    m = _blobs(5, 33, 44, 14)
    b = ops.rle_encode(m)
    full = b.to_dicts()
    assert len(b) == 5
    for index, expected in (([3, 0], [3, 0]), (np.array([True, False, False, True, True]), [0, 3, 4]), (np.zeros(5, bool), [])):
        sub = b.select(index)
        assert isinstance(sub, RleBatch) and sub.size == (33, 44)
        assert sub.to_dicts() == [full[i] for i in expected]
        np.testing.assert_array_equal(ops.rle_decode(sub), m[expected].reshape(len(expected), 33, 44))
    assert RleBatch.from_dicts(full).to_dicts() == full
    assert RleBatch.from_dicts(full[2]).to_dicts() == full[2:3]  # one dict is a batch of one


def test_batch_select_empty_index_list():
    """``[]`` is an empty list of integer indices, as numpy's own ``a[[]]`` reads it (e.g. ``keep = []``)."""
    b = ops.rle_encode(_random((3, 4, 5), 0.5, 17))
    sub = b.select([])
    assert len(sub) == 0 and sub.size == (4, 5) and sub.to_dicts() == []


# --------------------------------------------------------------------------- empty inputs


def test_empty_inputs():
    b = ops.rle_encode(np.zeros((0, 6, 5), bool))
    assert len(b) == 0 and b.size == (6, 5)
    assert ops.rle_decode(b).shape == (0, 6, 5)
    assert ops.rle_area(b).shape == (0,) and ops.rle_area(b).dtype == np.int64
    assert ops.rle_to_bbox(b).shape == (0, 4)
    assert ops.rle_compress(b) == [] and ops.rle_decompress(b) == [] and b.to_dicts() == []
    assert ops.rle_decode([]).shape[0] == 0
    other = ops.rle_encode(_random((3, 6, 5), 0.5, 15))
    assert ops.rle_iou(b, other).shape == (0, 3)
    assert ops.rle_iou(other, b).shape == (3, 0)
    assert ops.rle_iou(other, []).shape == (3, 0)


# --------------------------------------------------------------------------- invalid input


def _msg(excinfo) -> str:
    return str(excinfo.value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int8])
def test_encode_rejects_dtype(dtype):
    with pytest.raises(ValueError) as e:
        ops.rle_encode(np.zeros((2, 3, 4), dtype))
    assert np.dtype(dtype).name in _msg(e)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5), ()])
def test_encode_rejects_ndim(shape):
    with pytest.raises(ValueError) as e:
        ops.rle_encode(np.zeros(shape, bool))
    assert str(shape) in _msg(e)


BAD_TOTAL = {"size": [3, 4], "counts": [5, 6]}  # 11 pixels for a 3x4 mask


@pytest.mark.parametrize(
    "fn",
    [
        ops.rle_decode,
        ops.rle_area,
        ops.rle_to_bbox,
        ops.rle_merge,
        lambda r: ops.rle_iou(r, r),
        lambda r: ops.mask_nms(r, np.ones(len(r), np.float32), 0.5),
    ],
    ids=["decode", "area", "bbox", "merge", "iou", "mask_nms"],
)
def test_wrong_total_rejected(fn):
    with pytest.raises(ValueError) as e:
        fn([{"size": [3, 4], "counts": [12]}, BAD_TOTAL])
    assert "11" in _msg(e) and "12" in _msg(e) and "[1]" in _msg(e)


def test_wrong_total_from_string_rejected():
    s = coco_encode(np.ones((1, 3, 4), np.uint8))[0]["counts"]
    with pytest.raises(ValueError) as e:
        ops.rle_decode([{"size": [3, 5], "counts": s}])
    assert "15" in _msg(e) and "12" in _msg(e)


def test_mixed_sizes_rejected():
    a = ops.rle_encode(np.ones((1, 3, 4), bool)).to_dicts()
    b = ops.rle_encode(np.ones((1, 4, 3), bool)).to_dicts()
    for fn in (ops.rle_decode, ops.rle_area, ops.rle_merge, ops.rle_compress):
        with pytest.raises(ValueError) as e:
            fn(a + b)
        assert "[4, 3]" in _msg(e) and "[3, 4]" in _msg(e)
    with pytest.raises(ValueError) as e:
        ops.rle_iou(a, b)
    assert "[4, 3]" in _msg(e) and "[3, 4]" in _msg(e)


@pytest.mark.parametrize(
    "counts, shows",
    [
        ("!!", ("33", "'!'")),  # below the alphabet
        ("0\x7f", ("127",)),  # above it
        ("g", ("g",)),  # a continuation bit with nothing after it
        ("000O", ("-1",)),  # a delta that makes a run negative
    ],
)
@pytest.mark.parametrize("as_bytes", [False, True])
def test_garbage_string_rejected(counts, shows, as_bytes):
    with pytest.raises(ValueError) as e:
        ops.rle_decode([{"size": [1, 1], "counts": counts.encode("latin-1") if as_bytes else counts}])
    assert any(s in _msg(e) for s in shows), _msg(e)


def test_bad_counts_list_rejected():
    with pytest.raises(ValueError) as e:
        ops.rle_decode([{"size": [2, 2], "counts": [-1, 5]}])
    assert "-1" in _msg(e)
    with pytest.raises(ValueError) as e:
        ops.rle_decode([{"size": [2, 2], "counts": [1.5, 2.5]}])
    assert "1.5" in _msg(e)


def test_bad_dicts_rejected():
    with pytest.raises(ValueError, match="size"):
        ops.rle_decode([{"counts": [4]}])
    with pytest.raises(ValueError) as e:
        ops.rle_decode([{"size": [2, 2, 2], "counts": [8]}])
    assert "[2, 2, 2]" in _msg(e)


def test_iscrowd_length_and_empty_merge_rejected():
    r = ops.rle_encode(_random((3, 5, 5), 0.5, 16))
    with pytest.raises(ValueError) as e:
        ops.rle_iou(r, r, iscrowd=[0, 1])
    assert "(2,)" in _msg(e) and "3" in _msg(e)
    with pytest.raises(ValueError):
        ops.rle_merge([])


# --------------------------------------------------------------------------- found by fuzz/ (fuzz/README.md)


def test_to_strings_checks_every_offset_first():
    """fuzz_rle_string: rle_to_strings checked each offset pair only as it went, so an early
    offset past the counts (a later one decreasing) read past the array (ASan: heap overflow, or
    an 8 GB reserve for [0, 2^32, 3])."""
    counts = np.array([1, 2, 3], np.uint32)
    for offsets in ([0, 5, 3], [0, 2**32, 3], [0, 2, 1, 3]):
        with pytest.raises(ValueError, match="offsets must be non-decreasing"):
            RleBatch(counts, np.array(offsets, np.int64), (1, 6)).to_dicts(compressed=True)
    ok = RleBatch(counts, np.array([0, 1, 3], np.int64), (1, 1)).to_dicts(compressed=True)
    assert [d["counts"] for d in ok] == ["1", "23"]


@pytest.mark.parametrize("counts", ["P" * 12 + "N", "o" * 12 + "O", b"P" * 12 + b"@", "P" * 12 + "8"])
def test_thirteen_character_number_rejected_before_shifting(counts):
    """fuzz_rle_string under UBSan: the 13th character of a number was shifted by 60 bits
    (signed overflow, UB) before the length check rejected it; now it is rejected first."""
    with pytest.raises(ValueError, match="longer than 12 characters at position 13"):
        ops.rle_decode({"size": [1, 1], "counts": counts})


@pytest.mark.parametrize("counts", [[2**32 + 4], np.array([1, 2**63], np.uint64), np.array([0, 2**32], np.int64)])
def test_counts_beyond_uint32_rejected(counts):
    """fuzz_rle_dict: counts >= 2^32 wrapped modulo 2^32 (a 1x4 mask from [2^32 + 4])."""
    with pytest.raises(ValueError, match="below 2\\^32"):
        ops.rle_area({"size": [1, 4], "counts": counts})
    with pytest.raises(ValueError, match="below 2\\^32"):
        ops.rle_decompress({"size": [1, 4], "counts": counts})


@pytest.mark.parametrize("size", [[float("inf"), 2], [float("nan"), 2], [2.5, 2], [-1, -1], "22", None])
def test_bad_sizes_rejected(size):
    """fuzz_rle_dict: inf gave OverflowError, 2.5 was truncated to 2, [-1, -1] compressed fine."""
    for fn in (ops.rle_area, ops.rle_compress, ops.rle_decompress):
        with pytest.raises(ValueError, match=r"\['size'\] must be \[h, w\]"):
            fn({"size": size, "counts": [4]})
    assert ops.rle_area({"size": [2.0, np.int64(2)], "counts": [1, 3]}).tolist() == [3]  # integral floats are fine


@pytest.mark.parametrize("size", [(2**32, 2**32), (2**62, 4), (2**33, 2**31)])
def test_mask_size_overflowing_64_bits_rejected(size):
    """fuzz_rle_dict: h * w wrapped to 0, so an empty counts list passed as a 2^32 x 2^32 mask."""
    empty = RleBatch(np.zeros(0, np.uint32), np.zeros(2, np.int64), size)
    for fn in (ops.rle_area, ops.rle_to_bbox, ops.rle_merge, lambda r: ops.mask_nms(r, np.ones(1, np.float32), 0.5),
               lambda r: ops.merge_patches(r, [[0]]), lambda r: ops.panoptic_fusion(r, [1.0])):
        with pytest.raises(ValueError, match="more pixels than fit in 64 bits"):
            fn(empty)
