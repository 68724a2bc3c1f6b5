"""Fuzzes ``postprocess_masks``: shapes (0-d to 5-d, empty dimensions, 1 x 1, non-square),
dtypes, logit values (NaN, inf, huge, denormal, exact ties at every threshold), sizes
(img_size, input_size, original_size, canvas and offset, boundary integers) and devices.

Oracle (valid calls): a float64 numpy version of segment-anything's two bilinear resizes; every
mask pixel must agree with it except where the reference value lies within a tolerance of the
threshold; area, box and the canonical RLE must be those of the returned mask, which must lie
inside its window of the canvas; the stability score must be the reference's where no pixel is
near the stability thresholds.

    .venv/bin/python fuzz/fuzz_postprocess.py [corpus dir] -max_total_time=60
"""

from __future__ import annotations

import math

import numpy as np

from common import (EDGE_INTS, Finding, call, canonical_counts, check, main, must_reject, seed_inputs, wild_float,
                    wild_int, xyxy_box)
from samantic import ops

DEVICES_BAD = ["tpu", "", "CPU", "cuda:", "cuda:-1", "cuda:1x", "cuda:99999999999999999999", "cuda:0 ", "cuda::0"]


def _axis(n_out: int, n_in: int) -> np.ndarray:
    """PyTorch's bilinear (align_corners=False) along one axis as an [n_out, n_in] matrix."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for o in range(n_out):
        src = max(scale * (o + 0.5) - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        l1 = min(max(src - i0, 0.0), 1.0)
        m[o, i0] += 1.0 - l1
        m[o, i1] += l1
    return m


def reference(logits: np.ndarray, img_size: int, input_size, original_size) -> np.ndarray:
    """float64 ``[N, H, W]``: upscale to img_size, crop to input_size, upscale to original_size."""
    _, h, w = logits.shape
    ay = _axis(original_size[0], input_size[0]) @ _axis(img_size, h)[: input_size[0]]
    ax = _axis(original_size[1], input_size[1]) @ _axis(img_size, w)[: input_size[1]]
    return np.einsum("yi,nij,xj->nyx", ay, logits.astype(np.float64), ax)


def logit_values(fdp, shape, t: float, off: float) -> np.ndarray:
    n = int(np.prod(shape))
    kind = fdp.ConsumeIntInRange(0, 6)
    if kind == 0:  # smooth-ish random values around the threshold
        v = np.array([fdp.ConsumeFloatInRange(-6.0, 6.0) for _ in range(n)]) + t
    elif kind == 1:  # exact ties at t - off, t, t + off and a step either side
        pick = [t - off, t, t + off, t - 2 * off - 1, t + 2 * off + 1]
        v = np.array([pick[fdp.ConsumeIntInRange(0, 4)] for _ in range(n)])
    elif kind == 2:  # one constant
        v = np.full(n, fdp.PickValueInList([t, t + off, t - off, t + 1e-3, -1e30, 1e30, 3.4e38, -3.4e38]))
    elif kind == 3:  # huge magnitudes of both signs
        v = np.array([fdp.PickValueInList([-3.4e38, 3.4e38, -1e20, 1e20, 0.0, t]) for _ in range(n)])
    elif kind == 4:  # denormals and zeros
        v = np.array([fdp.PickValueInList([0.0, -0.0, 1e-45, -1e-45, 1e-39, t]) for _ in range(n)])
    elif kind == 5:  # any float32 (can be NaN or inf: must be rejected)
        raw = fdp.ConsumeBytes(4 * n)
        raw += b"\0" * (4 * n - len(raw))
        return np.frombuffer(raw, np.float32).reshape(shape).copy()
    else:
        v = np.array([wild_float(fdp) for _ in range(n)])
    with np.errstate(over="ignore", invalid="ignore"):
        return v.astype(np.float32).reshape(shape)


def check_result(res, logits, img_size, input_size, original_size, canvas, offset, t, off) -> None:
    n = logits.shape[0]
    out_h, out_w = original_size
    can_h, can_w = canvas
    x0, y0 = offset
    check(len(res) == n and res.area.shape == (n,) and res.boxes.shape == (n, 4), "result lengths")
    check(res.stability_score.dtype == np.float32, "stability dtype")
    check(res.rles.size == (can_h, can_w), f"RLE size {res.rles.size} vs canvas {canvas}")
    got = ops.rle_decode(res.rles).astype(bool)
    outside = got.copy()
    outside[:, y0:y0 + out_h, x0:x0 + out_w] = False
    check(not outside.any(), f"mask pixels outside the window {original_size} at {offset} of canvas {canvas}")
    mask = got[:, y0:y0 + out_h, x0:x0 + out_w]
    dicts = res.to_dicts()
    for i in range(n):
        check(int(res.area[i]) == int(mask[i].sum()), f"area {res.area[i]} vs {mask[i].sum()}")
        check(res.boxes[i].tolist() == xyxy_box(mask[i]), f"box {res.boxes[i]} vs {xyxy_box(mask[i])}")
        check(dicts[i]["counts"] == canonical_counts(got[i]), f"RLE of mask {i} not canonical: {dicts[i]['counts']}")
        s = float(res.stability_score[i])
        check(math.isnan(s) or 0.0 <= s <= 1.0, f"stability {s} outside [0, 1]")
    ref = reference(logits, img_size, input_size, original_size)
    t32, off32 = np.float32(t), np.float32(off)
    lo, hi = np.float32(t32 - off32), np.float32(t32 + off32)
    scale = 1.0 + float(np.abs(logits).max()) if logits.size else 1.0
    tol = 1e-4 * scale + 1e-4 * abs(float(t32))
    sure = np.abs(ref - float(t32)) > tol
    wrong = (mask != (ref > float(t32))) & sure
    if wrong.any():
        i, y, x = np.argwhere(wrong)[0]
        raise Finding(f"mask {i} pixel (y={y}, x={x}): got {mask[i, y, x]}, reference logit {ref[i, y, x]!r} "
                             f"vs threshold {float(t32)!r} (tolerance {tol}); args img_size={img_size} "
                             f"input_size={input_size} original_size={original_size}")
    for i in range(n):
        near = (np.abs(ref[i] - float(lo)) <= tol) | (np.abs(ref[i] - float(hi)) <= tol)
        if near.any() or not math.isfinite(float(lo)) or not math.isfinite(float(hi)):
            continue
        n_lo, n_hi = int((ref[i] > float(lo)).sum()), int((ref[i] > float(hi)).sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            want = np.float32(n_hi) / np.float32(n_lo)
        s = res.stability_score[i]
        check((np.isnan(want) and np.isnan(s)) or s == want,
              f"stability of mask {i}: {s} vs reference {want} ({n_hi}/{n_lo})")


def valid_call(fdp) -> None:
    n = fdp.ConsumeIntInRange(0, 3)
    h, w = fdp.ConsumeIntInRange(1, 8), fdp.ConsumeIntInRange(1, 8)
    img_size = fdp.ConsumeIntInRange(max(h, w), 48)
    input_size = (fdp.ConsumeIntInRange(1, img_size), fdp.ConsumeIntInRange(1, img_size))
    original_size = (fdp.ConsumeIntInRange(1, 40), fdp.ConsumeIntInRange(1, 40))
    if fdp.ConsumeBool():
        canvas = (original_size[0] + fdp.ConsumeIntInRange(0, 6), original_size[1] + fdp.ConsumeIntInRange(0, 6))
        offset = (fdp.ConsumeIntInRange(0, canvas[1] - original_size[1]),
                  fdp.ConsumeIntInRange(0, canvas[0] - original_size[0]))
    else:
        canvas, offset = original_size, (0, 0)
    t = fdp.PickValueInList([0.0, 0.0, 1.0, -1.0, 0.5, 1e-3, 100.0, -2.5]) if fdp.ConsumeBool() else \
        fdp.ConsumeFloatInRange(-10.0, 10.0)
    off = fdp.PickValueInList([1.0, 1.0, 0.0, 0.5, 2.0, 1e-6, 10.0])
    logits = logit_values(fdp, (n, h, w), t, off)
    as_4d = n and fdp.ConsumeBool()
    arg = logits.reshape(1, n, h, w) if as_4d else logits
    kw = dict(input_size=input_size, original_size=original_size, img_size=img_size, mask_threshold=t,
              stability_score_offset=off, canvas_size=canvas if canvas != original_size or fdp.ConsumeBool() else None,
              offset=offset)
    if fdp.ConsumeIntInRange(0, 7) == 0:  # everything valid but the placement: far out of the canvas
        big = fdp.PickValueInList([2**31, 2**32, 2**62, 2**63 - 1, 2**63 - original_size[1], 2**63 - canvas[1]])
        where = fdp.ConsumeIntInRange(0, 3)
        off_bad = (big, offset[1]) if where == 0 else (offset[0], big) if where == 1 else offset
        can_bad = canvas if where < 2 else ((canvas[0], -big) if where == 2 else (-big, canvas[1]))
        must_reject(f"mask {original_size} at {off_bad} in canvas {can_bad}", ops.postprocess_masks, arg,
                    **{**kw, "offset": off_bad, "canvas_size": can_bad})
        return
    if fdp.ConsumeIntInRange(0, 7) == 0:  # everything valid but the device
        device = fdp.PickValueInList(DEVICES_BAD)
        ok, res = call(ops.postprocess_masks, arg, device=device, **kw)
        check(not ok and isinstance(res, ValueError) and "device" in str(res), f"device {device!r}: {res!r}")
        return
    ok, res = call(ops.postprocess_masks, arg, **kw)
    finite = bool(np.isfinite(logits).all())
    if not finite:
        check(not ok, "non-finite logits accepted")
        check("non-finite" in str(res), f"non-finite logits: unclear message {res}")
        return
    check(ok, f"valid call rejected: {res}")
    check_result(res, logits, img_size, input_size, original_size, canvas, offset, t, off)


def wild_call(fdp) -> None:
    """Arbitrary shapes, dtypes, sizes, thresholds and devices: a clean error or a consistent result."""
    ndim = fdp.ConsumeIntInRange(0, 5)
    shape = tuple(fdp.ConsumeIntInRange(0, 4) for _ in range(ndim))
    dtype = fdp.PickValueInList([np.float32, np.float32, np.float32, np.float64, np.float16, np.int32, np.bool_,
                                 np.uint8, np.complex64])
    logits = np.zeros(shape, dtype)
    if logits.size:
        logits = logit_values(fdp, shape, 0.0, 1.0).astype(dtype) if dtype != np.bool_ else logits
    if fdp.ConsumeIntInRange(0, 5) == 0 and logits.ndim >= 2:
        logits = logits[..., ::2] if fdp.ConsumeBool() else np.swapaxes(logits, -1, -2)  # non-contiguous

    def size_pair():
        if fdp.ConsumeIntInRange(0, 3) == 0:
            return fdp.PickValueInList([(wild_int(fdp), wild_int(fdp)), (1.5, 2), ("a", 1), (1,), (1, 2, 3), None,
                                        (math.inf, 1), (math.nan, 1), (2**70, 1)])
        return (fdp.ConsumeIntInRange(-1, 12), fdp.ConsumeIntInRange(-1, 12))

    kw = dict(input_size=size_pair(), original_size=size_pair(),
              img_size=fdp.PickValueInList(EDGE_INTS) if fdp.ConsumeIntInRange(0, 3) == 0 else
              fdp.ConsumeIntInRange(-1, 16),
              mask_threshold=wild_float(fdp), stability_score_offset=wild_float(fdp, -1.0, 4.0))
    if fdp.ConsumeBool():
        kw["canvas_size"] = size_pair()
        kw["offset"] = size_pair()
    # calls that would pass validation but scan a huge mask are not affordable here
    try:
        oh, ow = (int(v) for v in kw["original_size"])
        if 0 < oh < 2**31 and 0 < ow < 2**31 and oh * ow > 2**16:
            return
    except (TypeError, ValueError, OverflowError):
        pass
    ok, res = call(ops.postprocess_masks, logits, **kw)
    if not ok:
        return
    # accepted: the arguments must have been valid ones
    arr = logits.reshape(-1, *logits.shape[2:]) if logits.ndim == 4 else logits
    check(logits.dtype == np.float32 and arr.ndim == 3 and arr.shape[1] > 0 and arr.shape[2] > 0,
          f"logits {logits.dtype} {logits.shape} accepted")
    check(math.isfinite(kw["mask_threshold"]) and kw["stability_score_offset"] >= 0, f"thresholds accepted: {kw}")
    pairs = {k: tuple(int(v) for v in kw[k]) for k in ("input_size", "original_size")}
    for k, p in pairs.items():
        check(all(isinstance(v, int) or float(v).is_integer() for v in kw[k]), f"{k}={kw[k]!r} accepted")
    canvas = tuple(int(v) for v in kw.get("canvas_size") or pairs["original_size"])
    offset = tuple(int(v) for v in kw.get("offset", (0, 0)))
    img = kw["img_size"]
    (ih, iw), (oh, ow) = pairs["input_size"], pairs["original_size"]
    check(0 < ih <= img and 0 < iw <= img and img >= max(arr.shape[1:]) and oh > 0 and ow > 0,
          f"sizes accepted: {kw}, logits {logits.shape}")
    check(0 <= offset[0] and 0 <= offset[1] and offset[0] + ow <= canvas[1] and offset[1] + oh <= canvas[0],
          f"window outside the canvas accepted: {kw}")
    check(canvas[0] * canvas[1] < 2**32, f"canvas {canvas} accepted")
    if img <= 4096 and canvas[0] * canvas[1] <= 2**20:
        t, off = kw["mask_threshold"], kw["stability_score_offset"]
        if abs(t) < 1e30 and off < 1e30:
            check_result(res, np.ascontiguousarray(arr), img, (ih, iw), (oh, ow), canvas, offset, t, off)


def TestOneInput(data: bytes) -> None:
    fdp = __import__("atheris").FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 2):
        valid_call(fdp)
    else:
        wild_call(fdp)


def seeds():
    return seed_inputs(seed=3)


if __name__ == "__main__":
    main(TestOneInput, seeds)
