"""samantic.ops.postprocess_masks against segment-anything's own post-processing.

The reference is a real ``segment_anything.modeling.Sam`` (tiny, random weights:
only ``postprocess_masks`` is used, which reads ``image_encoder.img_size``)
followed by ``calculate_stability_score``, ``> mask_threshold``,
``batched_mask_to_box``, ``uncrop_masks`` and ``mask_to_rle_pytorch`` from
``segment_anything.utils.amg``, exactly as ``SamAutomaticMaskGenerator`` chains them.

Tolerance (the op's spec): masks equal except at pixels whose reference logit
is within 1e-4 of the threshold; stability scores within 1e-4.
"""

from __future__ import annotations

import functools
import os
import shutil

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.amg import (
    batched_mask_to_box,
    calculate_stability_score,
    mask_to_rle_pytorch,
    uncrop_masks,
)
from segment_anything.utils.transforms import ResizeLongestSide
from skimage import filters

from samantic import _C, ops
from samantic.ops import PostprocessResult, RleBatch

CUDA = _C.cuda_status()
from conftest import DEVICES  # noqa: E402
TOL = 1e-4


# --------------------------------------------------------------------------- reference


@functools.lru_cache(maxsize=None)
def reference_sam(img_size: int) -> Sam:
    """A real Sam, as small as its constructors allow (postprocess_masks needs no weights)."""
    torch.manual_seed(0)
    dim, patch = 8, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=patch, embed_dim=dim, depth=1, num_heads=1, out_chans=dim
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(img_size // patch, img_size // patch),
            input_image_size=(img_size, img_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, num_heads=1, mlp_dim=16),
            iou_head_depth=1,
            iou_head_hidden_dim=dim,
        ),
    )
    return sam.eval()


def input_size_for(original_size, img_size):
    return ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], img_size)


@torch.no_grad()
def reference(logits: np.ndarray, original_size, img_size, mask_threshold, offset, dtype=torch.float32):
    """Upscaled logits, stability, masks and boxes as segment-anything computes them."""
    sam = reference_sam(img_size)
    input_size = input_size_for(original_size, img_size)
    up = sam.postprocess_masks(torch.from_numpy(logits).to(dtype)[None], input_size, tuple(original_size))[0]
    stability = calculate_stability_score(up, mask_threshold, offset)
    masks = up > mask_threshold
    return {
        "logits": up.numpy(),
        "stability": stability.numpy(),
        "masks": masks,
        "boxes": batched_mask_to_box(masks).numpy(),
        "input_size": input_size,
        "args": (logits, original_size, img_size, mask_threshold, offset),
    }


def run(logits, original_size, img_size=1024, mask_threshold=0.0, stab_offset=1.0, **kw) -> PostprocessResult:
    return ops.postprocess_masks(
        logits,
        input_size=input_size_for(original_size, img_size),
        original_size=original_size,
        img_size=img_size,
        mask_threshold=mask_threshold,
        stability_score_offset=stab_offset,
        **kw,
    )


def check_against_reference(res: PostprocessResult, ref: dict, mask_threshold: float):
    """The op's spec, checked pixel by pixel.

    "Within 1e-4 of the threshold" is judged on the float32 reference and, where
    that disagrees, on the same segment-anything code run in float64: with
    large-magnitude logits, float32 bilinear itself is off by more than 1e-4
    (e.g. 0.0015 for a midpoint of -100 and 100), and a result closer to the
    exact value must not fail.
    """
    n = ref["logits"].shape[0]
    assert isinstance(res, PostprocessResult) and len(res) == n
    assert res.stability_score.dtype == np.float32 and res.stability_score.shape == (n,)
    assert res.area.dtype == np.int64 and res.area.shape == (n,)
    assert res.boxes.dtype == np.int64 and res.boxes.shape == (n, 4)
    exact = functools.lru_cache()(lambda: reference(*ref["args"], dtype=torch.float64))

    # masks: equal except where the reference logit is within TOL of the threshold
    got = ops.rle_decode(res.rles).astype(bool)
    ref_masks = ref["masks"].numpy()
    assert got.shape == ref_masks.shape
    wrong = (got != ref_masks) & (np.abs(ref["logits"] - mask_threshold) > TOL)
    if wrong.any():
        wrong &= np.abs(exact()["logits"] - mask_threshold) > TOL
    if wrong.any():
        m, y, x = np.argwhere(wrong)[0]
        pytest.fail(
            f"{wrong.sum()} pixels differ beyond tolerance; first: mask {m} (y={y}, x={x}), "
            f"reference logit {ref['logits'][m, y, x]!r} (float64: {exact()['logits'][m, y, x]!r}), got {got[m, y, x]}"
        )

    # RLEs are canonical: what segment-anything's encoder makes of the same mask
    assert res.to_dicts() == mask_to_rle_pytorch(torch.from_numpy(got))
    # area and box are those of the returned mask, by segment-anything's functions
    np.testing.assert_array_equal(res.area, got.sum(axis=(1, 2)))
    np.testing.assert_array_equal(res.boxes, batched_mask_to_box(torch.from_numpy(got)).numpy())
    if not (got != ref_masks).any():
        np.testing.assert_array_equal(res.boxes, ref["boxes"])
        np.testing.assert_array_equal(res.area, ref_masks.sum(axis=(1, 2)))

    # stability: within TOL (NaN, an empty union, where the reference has it)
    def close(expected):
        e = expected.astype(np.float64)
        s = res.stability_score.astype(np.float64)
        return (np.isnan(s) & np.isnan(e)) | (np.abs(s - e) <= TOL)

    ok = close(ref["stability"])
    if not ok.all():
        ok |= close(exact()["stability"])
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        pytest.fail(
            f"stability of mask {i}: got {res.stability_score[i]!r}, segment-anything {ref['stability'][i]!r} "
            f"(float64: {exact()['stability'][i]!r}); all: {res.stability_score} vs {ref['stability']}"
        )


# --------------------------------------------------------------------------- logits


def smooth_field(h, w, rng, scale=6.0, sigma=None):
    sigma = sigma if sigma is not None else rng.uniform(2, 12)
    f = filters.gaussian(rng.standard_normal((h, w)), sigma=sigma)
    return (f / (f.std() + 1e-12) * scale + rng.uniform(-2, 2)).astype(np.float32)


def sharp_blobs(h, w, rng, magnitude=40.0):
    yy, xx = np.mgrid[:h, :w]
    out = np.full((h, w), -magnitude, np.float32)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, h / 4)
        out[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = magnitude
    return out


def logit_stack(h, w, seed, mask_threshold=0.0, offset=1.0):
    """Smooth fields, sharp blobs, constants on both sides, exact ties at every threshold."""
    rng = np.random.default_rng(seed)
    t = np.float32(mask_threshold)
    lattice = rng.integers(-1, 2, size=(h // 8 + 1, w // 8 + 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
    ties = smooth_field(h, w, rng)
    ties[rng.random((h, w)) < 0.3] = t  # cells exactly at the threshold inside a varying field
    return np.stack(
        [
            smooth_field(h, w, rng),
            smooth_field(h, w, rng, scale=0.5),  # many pixels near the thresholds
            sharp_blobs(h, w, rng, magnitude=rng.uniform(20, 100)),
            np.full((h, w), t + 5, np.float32),  # all above every threshold
            np.full((h, w), t - 5, np.float32),  # all below: empty mask, NaN stability
            np.full((h, w), t, np.float32),  # exactly at the threshold everywhere
            (t + np.float32(offset) * lattice).astype(np.float32),  # blocks exactly at t - offset, t, t + offset
            ties,
        ]
    ).astype(np.float32)


# --------------------------------------------------------------------------- against segment-anything

SIZES_1024 = [(37, 53), (1000, 301), (768, 1024), (1024, 1024), (1, 1), (2, 999), (999, 2), (1500, 1500), (480, 640)]
SIZES_512 = [(37, 53), (300, 500), (512, 512), (800, 600), (1, 1), (7, 512)]


@pytest.mark.parametrize("original_size", SIZES_1024)
def test_matches_segment_anything_1024(original_size):
    logits = logit_stack(256, 256, seed=sum(original_size))
    res = run(logits, original_size)
    check_against_reference(res, reference(logits, original_size, 1024, 0.0, 1.0), 0.0)


@pytest.mark.parametrize("original_size", SIZES_512)
def test_matches_segment_anything_512(original_size):
    logits = logit_stack(128, 128, seed=sum(original_size) + 1)
    res = run(logits, original_size, img_size=512)
    check_against_reference(res, reference(logits, original_size, 512, 0.0, 1.0), 0.0)


@pytest.mark.parametrize(
    "mask_threshold, offset", [(0.5, 1.0), (-2.0, 0.5), (1.0, 0.0), (0.0, 2.5), (3.25, 0.1)]
)
@pytest.mark.parametrize("original_size", [(333, 517), (1200, 901)])
def test_thresholds_and_offsets(original_size, mask_threshold, offset):
    logits = logit_stack(256, 256, seed=7, mask_threshold=mask_threshold, offset=offset)
    res = run(logits, original_size, mask_threshold=mask_threshold, stab_offset=offset)
    check_against_reference(res, reference(logits, original_size, 1024, mask_threshold, offset), mask_threshold)


def test_non_square_low_res():
    """Low-res masks need not be square or a quarter of img_size."""
    logits = np.stack([smooth_field(64, 100, np.random.default_rng(i)) for i in range(3)])
    for original_size in [(250, 260), (40, 1000)]:
        check_against_reference(run(logits, original_size), reference(logits, original_size, 1024, 0.0, 1.0), 0.0)


def test_constant_and_exact_results():
    """Cases whose answer is known without any tolerance."""
    h, w = 301, 203
    logits = np.stack([np.full((256, 256), 5, np.float32), np.full((256, 256), -5, np.float32),
                       np.zeros((256, 256), np.float32)])
    res = run(logits, (h, w))
    np.testing.assert_array_equal(res.area, [h * w, 0, 0])
    np.testing.assert_array_equal(res.boxes, [[0, 0, w - 1, h - 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert res.stability_score[0] == 1.0 and np.isnan(res.stability_score[1])
    assert res.stability_score[2] == 0.0  # 0 > -1 everywhere, 0 > 1 nowhere
    assert res.to_dicts() == [{"size": [h, w], "counts": [0, h * w]}, {"size": [h, w], "counts": [h * w]},
                              {"size": [h, w], "counts": [h * w]}]


@pytest.mark.parametrize(
    "value, mask_threshold, offset",
    [(1.0, 0.0, 1.0), (-1.0, 0.0, 1.0), (2.5, 0.0, 2.5), (1.7, 0.7, 1.0), (1.1, 0.1, 1.0), (-0.9, 0.1, 1.0)],
)
@pytest.mark.parametrize("original_size", [(1000, 301), (480, 640)])
def test_plateau_exactly_at_a_stability_threshold(original_size, value, mask_threshold, offset):
    """Logits exactly at t + offset or t - offset over whole regions (saturated or quantized logits).

    A bilinear mix of equal values is that value, and PyTorch's resize reproduces
    it exactly, so segment-anything counts none of those pixels as above it. The
    stability score must still be within 1e-4 (the mask tolerance does not cover
    t +- offset)."""
    rng = np.random.default_rng(int(value * 10) + original_size[0])
    field = smooth_field(256, 256, rng, scale=3.0)
    clipped = np.minimum(field, value) if value > mask_threshold else np.maximum(field, value)
    logits = np.stack([np.full((256, 256), value, np.float32), clipped.astype(np.float32)])
    res = run(logits, original_size, mask_threshold=mask_threshold, stab_offset=offset)
    ref = reference(logits, original_size, 1024, mask_threshold, offset)
    assert (ref["logits"][0] == np.float32(value)).all()  # the reference keeps the plateau exact
    check_against_reference(res, ref, mask_threshold)


@pytest.mark.slow
def test_matches_segment_anything_4000x3000():
    logits = logit_stack(256, 256, seed=4000)[:3]
    check_against_reference(run(logits, (4000, 3000)), reference(logits, (4000, 3000), 1024, 0.0, 1.0), 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_4d_equals_flattened(device):
    logits = logit_stack(256, 256, seed=11)[:6].reshape(2, 3, 256, 256)
    a = run(logits, (480, 640), device=device)
    b = run(logits.reshape(6, 256, 256), (480, 640), device=device)
    np.testing.assert_array_equal(a.stability_score, b.stability_score)
    np.testing.assert_array_equal(a.area, b.area)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert a.to_dicts() == b.to_dicts()
    check_against_reference(a, reference(logits.reshape(6, 256, 256), (480, 640), 1024, 0.0, 1.0), 0.0)


def test_torch_input():
    logits = logit_stack(128, 128, seed=12)
    a = run(torch.from_numpy(logits), (100, 90), img_size=512)
    b = run(logits, (100, 90), img_size=512)
    assert a.to_dicts() == b.to_dicts()
    np.testing.assert_array_equal(a.stability_score, b.stability_score)


# --------------------------------------------------------------------------- crops in a canvas


@pytest.mark.parametrize(
    "crop_box, canvas",
    [
        ((100, 50, 400, 350), (700, 900)),  # inside
        ((0, 0, 300, 200), (500, 600)),  # top-left corner
        ((250, 180, 600, 500), (500, 600)),  # bottom-right corner
        ((120, 0, 420, 500), (500, 600)),  # full height: runs continue across columns
        ((0, 33, 600, 97), (500, 600)),  # full width
        ((5, 7, 6, 8), (20, 20)),  # one pixel
    ],
)
def test_crop_in_canvas_matches_uncrop_masks(crop_box, canvas):
    x0, y0, x1, y1 = crop_box
    crop_size = (y1 - y0, x1 - x0)
    logits = logit_stack(256, 256, seed=x0 + y0)
    res = run(logits, crop_size, canvas_size=canvas, offset=(x0, y0))
    ref = reference(logits, crop_size, 1024, 0.0, 1.0)

    got = ops.rle_decode(res.rles).astype(bool)
    assert res.rles.size == canvas and got.shape == (len(logits), *canvas)
    # nothing outside the crop
    outside = np.ones(canvas, bool)
    outside[y0:y1, x0:x1] = False
    assert not got[:, outside].any()
    # the crop itself passes the spec; boxes stay in crop coordinates
    inner = ops.postprocess_masks(  # the same call without a canvas
        logits, input_size=ref["input_size"], original_size=crop_size
    )
    check_against_reference(inner, ref, 0.0)
    np.testing.assert_array_equal(got[:, y0:y1, x0:x1], ops.rle_decode(inner.rles).astype(bool))
    np.testing.assert_array_equal(res.boxes, inner.boxes)
    np.testing.assert_array_equal(res.area, inner.area)
    np.testing.assert_array_equal(res.stability_score, inner.stability_score)
    # RLEs: segment-anything's uncrop_masks + mask_to_rle_pytorch of that crop mask
    crop_masks = torch.from_numpy(got[:, y0:y1, x0:x1])
    assert res.to_dicts() == mask_to_rle_pytorch(uncrop_masks(crop_masks, list(crop_box), *canvas))
    # and where the crop has no ambiguous pixel, of the reference mask itself
    assert res.to_dicts()[3] == mask_to_rle_pytorch(uncrop_masks(ref["masks"][3:4], list(crop_box), *canvas))[0]


def test_full_height_crop_of_ones_is_one_run():
    logits = np.full((1, 256, 256), 9, np.float32)
    res = run(logits, (40, 30), canvas_size=(40, 100), offset=(20, 0))
    assert res.to_dicts() == [{"size": [40, 100], "counts": [20 * 40, 30 * 40, 50 * 40]}]
    np.testing.assert_array_equal(res.boxes, [[0, 0, 29, 39]])


# --------------------------------------------------------------------------- empty, select


def test_empty_batch():
    res = run(np.zeros((0, 256, 256), np.float32), (300, 400), canvas_size=(500, 600), offset=(10, 20))
    assert len(res) == 0
    assert res.stability_score.dtype == np.float32 and res.stability_score.shape == (0,)
    assert res.area.dtype == np.int64 and res.area.shape == (0,)
    assert res.boxes.dtype == np.int64 and res.boxes.shape == (0, 4)
    assert isinstance(res.rles, RleBatch) and len(res.rles) == 0 and res.rles.size == (500, 600)
    assert res.to_dicts() == []
    assert ops.rle_decode(res.rles).shape == (0, 500, 600)
    res4 = run(np.zeros((0, 3, 256, 256), np.float32), (300, 400))
    assert len(res4) == 0 and res4.boxes.shape == (0, 4)


def test_select():
    res = run(logit_stack(128, 128, seed=13), (90, 70), img_size=512)
    for index in ([4, 0, 2], np.array([True, False] * 4)):
        sub = res.select(index)
        idx = np.arange(len(res))[index]
        np.testing.assert_array_equal(sub.area, res.area[idx])
        np.testing.assert_array_equal(sub.boxes, res.boxes[idx])
        np.testing.assert_array_equal(sub.stability_score, res.stability_score[idx])
        assert sub.to_dicts() == [res.to_dicts()[i] for i in idx]


def test_select_empty_index_list():
    """``[]`` is an empty list of integer indices (numpy's ``a[[]]``), e.g. nothing passed a filter."""
    res = run(logit_stack(128, 128, seed=14)[:3], (60, 50), img_size=512)
    sub = res.select([])
    assert len(sub) == 0 and sub.boxes.shape == (0, 4) and sub.rles.size == (60, 50)


# --------------------------------------------------------------------------- invalid input

GOOD = np.zeros((2, 256, 256), np.float32)


def _raises(shown, fn):
    with pytest.raises(ValueError) as e:
        fn()
    assert all(s in str(e.value) for s in shown), (shown, str(e.value))


def _call(logits=GOOD, **kw):
    args = dict(input_size=(768, 1024), original_size=(480, 640))
    args.update(kw)
    return lambda: ops.postprocess_masks(logits, **args)


@pytest.mark.parametrize(
    "call, shown",
    [
        (_call(GOOD.astype(np.float64)), ["float64"]),
        (_call(GOOD.astype(np.float16)), ["float16"]),
        (_call(GOOD[0]), ["(256, 256)"]),
        (_call(GOOD[None, None]), ["(1, 1, 2, 256, 256)"]),
        (_call(np.zeros((2, 0, 256), np.float32)), ["(2, 0, 256)"]),
        (_call(input_size=(1025, 1024)), ["1025"]),
        (_call(input_size=(768, 2048)), ["2048"]),
        (_call(input_size=(0, 1024)), ["(0, 1024)"]),
        (_call(img_size=128), ["128"]),
        (_call(original_size=(0, 640)), ["(0, 640)"]),
        (_call(original_size=(480, -3)), ["-3"]),
        (_call(original_size="big"), ["'big'"]),
        (_call(np.where(np.arange(256) == 77, np.nan, GOOD).astype(np.float32)), ["nan"]),
        (_call(np.where(np.arange(256) == 77, np.inf, GOOD).astype(np.float32)), ["inf"]),
        (_call(mask_threshold=float("nan")), ["nan"]),
        (_call(stability_score_offset=-0.5), ["-0.5"]),
        (_call(offset=(-1, 0)), ["-1"]),
        (_call(offset=(0, -7), canvas_size=(600, 700)), ["-7"]),
        (_call(offset=(61, 0), canvas_size=(480, 700)), ["x=61", "480x700"]),
        (_call(offset=(0, 1), canvas_size=(480, 640)), ["y=1", "480x640"]),
        (_call(canvas_size=(479, 640)), ["479x640"]),
        (_call(device="tpu"), ["'tpu'"]),
    ],
)
def test_rejects_bad_input(call, shown):
    _raises(shown, call)


def test_cuda_unavailable_is_an_error():
    if CUDA["device_count"] > 0:
        pytest.skip("a CUDA device is available")
    with pytest.raises(RuntimeError if CUDA["compiled"] else ValueError) as e:
        _call(device="cuda")()
    assert "cuda" in str(e.value).lower()


@pytest.mark.gpu
@pytest.mark.skipif(CUDA["device_count"] == 0, reason="no CUDA device")
@pytest.mark.parametrize("original_size", [(37, 53), (1500, 1500), (768, 1024)])
def test_cuda_matches_cpu_and_segment_anything(original_size):
    logits = logit_stack(256, 256, seed=21)
    res = run(logits, original_size, device="cuda")
    check_against_reference(res, reference(logits, original_size, 1024, 0.0, 1.0), 0.0)
    cpu = run(logits, original_size)
    assert res.to_dicts() == cpu.to_dicts()
    np.testing.assert_array_equal(res.area, cpu.area)
    np.testing.assert_array_equal(res.boxes, cpu.boxes)
    np.testing.assert_allclose(res.stability_score, cpu.stability_score, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- build


def test_cuda_backend_compiled_when_nvcc_exists():
    """A machine with nvcc must not end up with a CPU-only build by accident."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    if os.environ.get("SAMANTIC_CUDA", "").upper() == "OFF":
        pytest.skip("SAMANTIC_CUDA=OFF: CPU-only build requested")
    info = _C.build_info()
    assert "cuda" in info["compiled_backends"], (
        f"nvcc is at {nvcc} but samantic._C ({_C.__file__}) was built without CUDA: {info}"
    )


# --------------------------------------------------------------------------- found by fuzz/ (fuzz/README.md)


def test_offset_overflow_rejected():
    """fuzz_postprocess: offset_x + out_w overflowed int64 (UB) and passed the canvas check; the
    mask landed far outside a 1x1 canvas with counts [4294967295, 1]."""
    ones = np.ones((1, 4, 4), np.float32)
    for offset in [(2**63 - 1, 0), (0, 2**63 - 1)]:
        with pytest.raises(ValueError, match="must lie inside the canvas 1x1"):
            ops.postprocess_masks(ones, input_size=(4, 4), original_size=(1, 1), img_size=4, offset=offset,
                                  canvas_size=(1, 1))
    with pytest.raises(ValueError, match="must lie inside the canvas"):
        ops.postprocess_masks(ones, input_size=(4, 4), original_size=(1, 1), img_size=4, canvas_size=(-2**63, 1))


@pytest.mark.parametrize("kw", [{"input_size": (float("inf"), 4)}, {"original_size": (2.5, 4)},
                                {"offset": (float("nan"), 0)}, {"canvas_size": "44"}])
def test_bad_size_pairs_rejected(kw):
    """fuzz_postprocess: inf gave OverflowError and 2.5 was truncated to 2."""
    args = dict(input_size=(4, 4), original_size=(4, 4), img_size=4)
    args.update(kw)
    with pytest.raises(ValueError, match="must be a pair of ints"):
        ops.postprocess_masks(np.ones((1, 4, 4), np.float32), **args)


def test_huge_device_index_is_a_value_error():
    """fuzz_postprocess: std::stoi's out_of_range reached Python as IndexError('stoi')."""
    with pytest.raises(ValueError, match="device index out of range: 'cuda:99999999999999999999'"):
        _call(device="cuda:99999999999999999999")()
    with pytest.raises(ValueError, match="device index out of range"):
        ops.nms(np.zeros((1, 4), np.float32), np.zeros(1, np.float32), 0.5, device="cuda:12345678901")
