"""samantic.ops.remove_small_regions against segment-anything's (OpenCV-based) reference."""

import numpy as np
import pytest
from segment_anything.utils.amg import remove_small_regions as sam_remove_small_regions

from samantic.ops import remove_small_regions


def _blobs(rng, h, w, p):
    """Random masks with structure: thresholded smoothed noise, plus salt for tiny islands and holes."""
    noise = rng.random((h // 4 + 1, w // 4 + 1))
    big = np.kron(noise, np.ones((4, 4)))[:h, :w] < p
    salt = rng.random((h, w)) < 0.02
    return big ^ salt


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area", [1, 3, 10, 50, 400.5, 10_000])
def test_matches_segment_anything_on_random_masks(mode, area):
    rng = np.random.default_rng(int(area * 10) + (mode == "holes"))
    for trial in range(12):
        h, w = rng.integers(1, 70, size=2)
        mask = _blobs(rng, h, w, rng.uniform(0.2, 0.8))
        want, want_changed = sam_remove_small_regions(mask, area, mode)
        got, changed = remove_small_regions(mask, area, mode)
        assert got.dtype == bool and got.shape == mask.shape
        assert changed == want_changed, (trial, h, w)
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial} ({h}x{w})")


def test_all_islands_small_keeps_the_one_opencv_numbers_first_among_equals():
    # equal-size islands: the tie-break follows OpenCV's label order (2x2 blocks in raster order),
    # which differs from pixel raster order for these two: (1, 0) comes first by blocks, (0, 4) by pixels
    mask = np.zeros((6, 8), bool)
    mask[1, 0] = mask[0, 4] = True
    want, _ = sam_remove_small_regions(mask, 5, "islands")
    got, changed = remove_small_regions(mask, 5, "islands")
    assert changed and got.sum() == 1
    np.testing.assert_array_equal(got, want)
    rng = np.random.default_rng(7)
    for _ in range(200):  # many single-pixel and two-pixel islands: ties everywhere
        mask = rng.random(tuple(rng.integers(2, 12, size=2))) < 0.15
        np.testing.assert_array_equal(remove_small_regions(mask, 100, "islands")[0],
                                      sam_remove_small_regions(mask, 100, "islands")[0])


def test_accepts_uint8_and_leaves_the_input_alone():
    mask = np.zeros((5, 5), np.uint8)
    mask[1:4, 1:4] = 7
    mask[2, 2] = 0
    before = mask.copy()
    got, changed = remove_small_regions(mask, 2, "holes")
    assert changed and got.sum() == 9 and got[1:4, 1:4].all()
    np.testing.assert_array_equal(mask, before)
    got, changed = remove_small_regions(mask[:, ::-1], 2, "holes")  # non-contiguous views work too
    assert changed and got[1:4, 1:4].all()


def test_empty_and_full_masks():
    for mask in (np.zeros((4, 6), bool), np.ones((4, 6), bool), np.zeros((0, 3), bool)):
        for mode in ("holes", "islands"):
            got, changed = remove_small_regions(mask, 3, mode)
            want, want_changed = sam_remove_small_regions(mask, 3, mode) if mask.size else (mask, False)
            np.testing.assert_array_equal(got, want)
            assert changed == want_changed


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.zeros((3, 3), bool), 5, "blobs"), "mode must be 'holes' or 'islands'"),
        ((np.zeros((3, 3, 1), bool), 5, "holes"), r"2 dimensions \(H, W\), got shape \(3, 3, 1\)"),
        ((np.zeros((3, 3), bool), float("nan"), "holes"), "area_thresh must be finite"),
    ],
)
def test_bad_arguments_say_what_is_wrong(args, match):
    with pytest.raises(ValueError, match=match):
        remove_small_regions(*args)
