"""Every CUDA kernel against its CPU twin: same inputs, byte-identical outputs.

The CUDA backend shares the per-element math with the CPU loop
(``csrc/ops/*_utils.h``), so nothing may differ: RLE counts and offsets, areas,
boxes and stability scores (bit for bit, NaN where NaN) of
``postprocess_masks``, kept indices of ``nms``, RLEs, areas and boxes of
``merge_patches``. The tests marked ``gpu`` run
only where a CUDA device is visible (``make gpu-check``); the build and doctor
checks at the end run everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest

from samantic import _C, ops
from samantic.doctor import cuda_archs, format_cuda_archs

CUDA = _C.cuda_status()
gpu = [pytest.mark.gpu, pytest.mark.skipif(CUDA["device_count"] == 0, reason="no CUDA device")]


def _field(rng, n, h, w, kind):
    """Logits with what stresses the kernels: smooth fields, noise, plateaus and exact ties at the thresholds."""
    if kind == "smooth":
        base = rng.standard_normal((n, max(2, h // 16), max(2, w // 16))).astype(np.float32)
        out = np.stack([np.kron(b, np.ones((16, 16), np.float32))[:h, :w] for b in base]) * 6
        return np.pad(out, ((0, 0), (0, h - out.shape[1]), (0, w - out.shape[2])), mode="edge").astype(np.float32)
    if kind == "noise":
        return (rng.standard_normal((n, h, w)) * 3).astype(np.float32)
    if kind == "ties":  # values on the lattice {t - offset, t, t + offset} with t = 0, offset = 1
        return rng.integers(-1, 2, size=(n, h, w)).astype(np.float32)
    if kind == "constant":
        return np.stack([np.full((h, w), v, np.float32) for v in (5.0, -5.0, 0.0, 1.0, -1.0)][:n])
    raise ValueError(kind)


def _postprocess(logits, original_size, device, img_size=1024, **kw):
    from segment_anything.utils.transforms import ResizeLongestSide

    input_size = ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], img_size)
    return ops.postprocess_masks(logits, input_size=input_size, original_size=original_size, img_size=img_size,
                                 device=device, **kw)


def _assert_identical(cuda, cpu):
    assert len(cuda) == len(cpu)
    for name in ("counts", "offsets"):
        a, b = getattr(cuda.rles, name), getattr(cpu.rles, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, a.shape, b.dtype, b.shape)
        assert a.tobytes() == b.tobytes(), f"RLE {name} differ"
    assert cuda.rles.size == cpu.rles.size
    np.testing.assert_array_equal(cuda.area, cpu.area)
    np.testing.assert_array_equal(cuda.boxes, cpu.boxes)
    assert cuda.stability_score.tobytes() == cpu.stability_score.tobytes(), (cuda.stability_score, cpu.stability_score)
    assert cuda.to_dicts(compressed=True) == cpu.to_dicts(compressed=True)


# (kind, masks, low-res h, w, original size, img_size, extra keyword arguments)
POSTPROCESS_CASES = [
    ("smooth", 8, 256, 256, (37, 53), 1024, {}),
    ("smooth", 8, 256, 256, (768, 1024), 1024, {}),
    ("smooth", 8, 256, 256, (1500, 1500), 1024, {}),
    ("noise", 6, 256, 256, (600, 800), 1024, {}),
    ("noise", 4, 256, 256, (1, 1), 1024, {}),
    ("noise", 4, 256, 256, (2, 999), 1024, {}),
    ("ties", 6, 256, 256, (480, 640), 1024, {}),
    ("ties", 6, 256, 256, (1000, 301), 1024, {"mask_threshold": 0.0, "stability_score_offset": 1.0}),
    ("ties", 4, 256, 256, (333, 517), 1024, {"stability_score_offset": 0.0}),
    ("smooth", 5, 256, 256, (333, 517), 1024, {"mask_threshold": 0.5, "stability_score_offset": 2.5}),
    ("smooth", 5, 256, 256, (1200, 901), 1024, {"mask_threshold": -2.0, "stability_score_offset": 0.1}),
    ("constant", 5, 256, 256, (301, 203), 1024, {}),
    ("noise", 4, 128, 128, (300, 500), 512, {}),
    ("smooth", 3, 64, 100, (40, 1000), 1024, {}),  # non-square low-res masks
    # a crop placed in a larger canvas (the crop-layer path): offsets shift every run
    ("smooth", 6, 256, 256, (300, 300), 1024, {"canvas_size": (700, 900), "offset": (100, 50)}),
    ("noise", 4, 256, 256, (500, 300), 1024, {"canvas_size": (500, 600), "offset": (120, 0)}),  # full height
    ("ties", 3, 256, 256, (1, 1), 1024, {"canvas_size": (20, 20), "offset": (5, 7)}),
    ("smooth", 3, 256, 256, (3000, 4000), 1024, {}),  # a 12 Mpx photo
    ("noise", 192, 256, 256, (768, 1024), 1024, {}),  # one batch of segment-anything's generator
]


@pytest.mark.parametrize("kind, n, h, w, original_size, img_size, kw", POSTPROCESS_CASES,
                         ids=[f"{c[0]}-{c[1]}x{c[2]}x{c[3]}-{c[4][0]}x{c[4][1]}-{c[5]}" + ("-canvas" if "canvas_size" in c[6]
                                                                                          else "") for c in POSTPROCESS_CASES])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_postprocess_cuda_byte_identical_to_cpu(device, kind, n, h, w, original_size, img_size, kw):
    rng = np.random.default_rng(n * 1000 + h + original_size[0])
    logits = _field(rng, n, h, w, kind)
    cuda = _postprocess(logits, original_size, device, img_size=img_size, **kw)
    cpu = _postprocess(logits, original_size, "cpu", img_size=img_size, **kw)
    _assert_identical(cuda, cpu)
    if kind != "constant" and original_size[0] * original_size[1] >= 10_000:
        assert cpu.area.sum() > 0  # the case is not trivially empty


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu), pytest.param("cuda:0", marks=gpu)])
def test_postprocess_cuda_empty_batch_and_repeated_calls(device):
    empty = _postprocess(np.zeros((0, 256, 256), np.float32), (480, 640), device)
    assert len(empty) == 0 and empty.rles.offsets.tolist() == [0]
    logits = _field(np.random.default_rng(3), 4, 256, 256, "noise")
    first = _postprocess(logits, (480, 640), device)
    for _ in range(3):  # streams and buffers are per call: nothing leaks from one call into the next
        _assert_identical(_postprocess(logits, (480, 640), device), first)
    _assert_identical(first, _postprocess(logits, (480, 640), "cpu"))


def _boxes(n, seed, span=200.0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, span, size=(n, 2))
    wh = rng.uniform(1, span / 4, size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    dup = rng.random(n) < 0.3
    boxes[dup] = boxes[rng.integers(0, n, dup.sum())] + rng.normal(0, 1.0, (dup.sum(), 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    return boxes.astype(np.float32), rng.permutation(n).astype(np.float32) / n


@pytest.mark.parametrize("n, n_cat, seed", [(1, 0, 0), (63, 0, 1), (64, 0, 2), (65, 3, 3), (3000, 0, 4), (5000, 12, 5)])
@pytest.mark.parametrize("thr", [0.0, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_nms_cuda_identical_to_cpu(device, thr, n, n_cat, seed):
    """Word boundaries of the suppression bitmask (63/64/65 boxes) and big batches."""
    boxes, scores = _boxes(n, seed)
    idxs = np.random.default_rng(seed).integers(0, n_cat, n).astype(np.int64) if n_cat else None
    cuda = ops.nms(boxes, scores, thr, idxs=idxs, device=device)
    cpu = ops.nms(boxes, scores, thr, idxs=idxs, device="cpu")
    assert cuda.dtype == cpu.dtype == np.int64
    assert cuda.tobytes() == cpu.tobytes()


def _patches(n, h, w, seed):
    """Rectangles, discs and noise: runs that overlap, touch, nest and wrap across columns."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            out[i, y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = True
        elif kind == 1:
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(2.0, max(h, w) / 3))
            out[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        elif kind == 2:
            out[i] = rng.random((h, w)) < 0.1
        # kind 3: empty
    out[-1] = True  # one full mask
    return ops.rle_encode(out)


# (patches, h, w, queries, seed)
MERGE_CASES = [(24, 120, 97, 50, 0), (300, 480, 640, 400, 1), (8, 1, 97, 30, 2), (8, 83, 1, 30, 3),
               (4, 1, 1, 10, 4), (64, 37, 53, 2000, 5)]


@pytest.mark.parametrize("n, h, w, n_queries, seed", MERGE_CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}-q{c[3]}" for c in MERGE_CASES])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_merge_patches_cuda_byte_identical_to_cpu(device, n, h, w, n_queries, seed):
    patches = _patches(n, h, w, seed)
    rng = np.random.default_rng(seed)
    groups = [[], list(range(n)), [n - 1, 0, n - 1]] + [
        rng.choice(n, size=int(rng.integers(1, min(n, 40) + 1)), replace=bool(rng.random() < 0.3)).tolist()
        for _ in range(n_queries)]
    cuda = ops.merge_patches(patches, groups, device=device)
    cpu = ops.merge_patches(patches, groups, device="cpu")
    for name in ("counts", "offsets"):
        a, b = getattr(cuda.rles, name), getattr(cpu.rles, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, a.shape, b.dtype, b.shape)
        assert a.tobytes() == b.tobytes(), f"RLE {name} differ"
    assert cuda.area.tobytes() == cpu.area.tobytes() and cuda.boxes.tobytes() == cpu.boxes.tobytes()
    assert cpu.area.sum() > 0
    empty = ops.merge_patches(patches, [], device=device)
    assert len(empty.rles) == 0 and empty.boxes.shape == (0, 4)


@pytest.mark.parametrize("device", [pytest.param("cuda:99", marks=gpu)])
def test_cuda_bad_device_index_is_a_runtime_error(device):
    boxes, scores = _boxes(10, 0)
    with pytest.raises(RuntimeError):
        ops.nms(boxes, scores, 0.5, device=device)
    with pytest.raises(RuntimeError):
        ops.merge_patches(_patches(4, 10, 10, 0), [[0, 1]], device=device)
    with pytest.raises(RuntimeError):
        _postprocess(_field(np.random.default_rng(0), 2, 256, 256, "noise"), (48, 64), device)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_cuda_probe_kernels_load_on_every_device(device):
    """The build embeds code this GPU runs (SASS for it, or PTX the driver JIT-compiles)."""
    probes = _C.cuda_probe()
    assert len(probes) == CUDA["device_count"]
    archs = cuda_archs(_C.build_info()["cuda_architectures"])
    for p in probes:
        cc = p["capability"][0] * 10 + p["capability"][1]
        assert p["kernels_load"], f"device {p['index']} {p['name']} (sm_{cc}): {p['error']}; build has {archs}"
        assert any(a <= cc and a // 10 == cc // 10 for a in archs["sass"]) or any(a <= cc for a in archs["ptx"]), (
            cc, archs)


# --------------------------------------------------------------------------- everywhere


def test_cuda_archs_parsing():
    assert cuda_archs("75-real,86-real,87-real,89-real,90") == {"sass": [75, 86, 87, 89, 90], "ptx": [90]}
    assert cuda_archs("75;86") == {"sass": [75, 86], "ptx": [75, 86]}
    assert cuda_archs("90-virtual") == {"sass": [], "ptx": [90]}
    assert cuda_archs("") == {"sass": [], "ptx": []}
    assert format_cuda_archs(cuda_archs("86-real,90")) == "SASS sm_86, sm_90; PTX compute_90"


def test_build_reports_cuda_archs():
    info = _C.build_info()
    probes = _C.cuda_probe()
    assert isinstance(probes, list)
    if "cuda" not in info["compiled_backends"]:
        assert probes == []
        pytest.skip("built without CUDA")
    archs = cuda_archs(info["cuda_architectures"])
    assert archs["sass"] or archs["ptx"], info
    if CUDA["device_count"] == 0:
        assert probes == []
