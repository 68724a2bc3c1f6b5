"""Fuzzes compressed COCO RLE strings: parsing (``rle_from_string``, every wrapper that takes
``str``/``bytes`` counts), writing (``rle_compress`` / ``RleBatch.to_dicts(compressed=True)`` /
``rle_to_strings`` with arbitrary CSR offsets) and the round trips between them.

Oracles: a string that parses must re-encode to counts that parse back to the same counts,
must decode like pycocotools (area, box, dense mask) and decompress to those counts; a counts
list must compress byte-identically to pycocotools' ``frPyObjects``; a batch with invalid
offsets must be rejected.

    .venv/bin/python fuzz/fuzz_rle_string.py [corpus dir] -max_total_time=60
"""

from __future__ import annotations

import numpy as np

from common import (U32_MAX, _C, bits, call, check, coco, coco_encode, is_canonical, main, must_reject,
                    seed_inputs, wild_int, xywh_box)
from samantic import ops
from samantic.ops import RleBatch

DENSE_MAX = 4096  # compare dense masks up to this many pixels


def _size_for(total: int, fdp) -> tuple:
    """(h, w) with h * w == total (a divisor of total when a small one exists)."""
    if total == 0:
        return (0, fdp.ConsumeIntInRange(0, 5)) if fdp.ConsumeBool() else (fdp.ConsumeIntInRange(0, 5), 0)
    for d in (2, 3, 4, 5, 7, 8):
        if total % d == 0 and fdp.ConsumeBool():
            return (total // d, d) if fdp.ConsumeBool() else (d, total // d)
    return (total, 1) if fdp.ConsumeBool() else (1, total)


def check_parsed(s: bytes, fdp) -> None:
    """``s`` as a compressed RLE: either rejected cleanly, or consistent with pycocotools."""
    as_str = fdp.ConsumeBool()
    ok, counts = call(_C.rle_from_string, s)
    if not ok:
        # the wrappers must reject it too (str is ASCII-encoded first)
        if as_str:
            must_reject("bad compressed string", ops.rle_decompress,
                        {"size": [1, 1], "counts": s.decode("latin-1")})
        else:
            must_reject("bad compressed string", ops.rle_decompress, {"size": [1, 1], "counts": s})
        return
    check(counts.dtype == np.uint32 and counts.ndim == 1, f"rle_from_string gave {counts.dtype} {counts.shape}")
    c = counts.tolist()
    # round trip: counts -> string -> counts
    again = _C.rle_to_strings(counts, np.array([0, len(c)], np.int64))
    check(len(again) == 1, "rle_to_strings: one string per RLE")
    check(_C.rle_from_string(again[0]).tolist() == c, f"string round trip changed {c} (from {s!r})")
    # a canonical re-encoding is a fixed point
    check(_C.rle_to_strings(_C.rle_from_string(again[0]), np.array([0, len(c)], np.int64))[0] == again[0],
          "compressed string not a fixed point of parse + write")
    total = sum(c)
    h, w = _size_for(total, fdp)
    rle = {"size": [h, w], "counts": s.decode("ascii") if as_str else s}
    ok, dec = call(ops.rle_decompress, [rle])
    check(ok, f"rle_decompress rejected a string rle_from_string accepts: {dec!r}")
    check(dec[0]["counts"] == c and dec[0]["size"] == [h, w], f"rle_decompress: {dec[0]} vs {c}")
    # pycocotools parses the same string (no NUL bytes: accepted strings have none)
    mc = coco()
    crle = {"size": [h, w], "counts": s}
    area = ops.rle_area(rle)
    check(int(area[0]) == sum(c[1::2]), f"rle_area {area} vs {sum(c[1::2])}")
    check(int(mc.area(crle)) == sum(c[1::2]) % 2**32, f"pycocotools area {mc.area(crle)} vs {sum(c[1::2])}")
    if total <= DENSE_MAX:
        ours = ops.rle_decode(rle)[0]
        ref = mc.decode(crle)
        check(np.array_equal(ours, ref), f"rle_decode differs from pycocotools for {s!r} size {[h, w]}")
        box = ops.rle_to_bbox(rle)[0].tolist()
        check(box == xywh_box(ours), f"rle_to_bbox {box} vs {xywh_box(ours)} for {c} size {[h, w]}")
        if is_canonical(c):
            check(box == mc.toBbox(crle).tolist(), f"rle_to_bbox {box} vs pycocotools {mc.toBbox(crle)}")
        # re-compressing the decoded mask gives pycocotools' canonical string
        enc = ops.rle_compress(ops.rle_encode(ours[None].astype(bool)))[0]["counts"]
        check(enc == coco_encode(ours[None].astype(bool))[0]["counts"].decode(), "compress != pycocotools encode")


def valid_counts(fdp) -> None:
    """A counts list (any uint32 values) compresses like pycocotools and parses back."""
    n = fdp.ConsumeIntInRange(0, 24)
    big = fdp.ConsumeBool()
    counts = [fdp.ConsumeIntInRange(0, U32_MAX if big and fdp.ConsumeBool() else 40) for _ in range(n)]
    total = sum(counts)
    h, w = (total, 1) if total else (0, 0)
    ours = ops.rle_compress({"size": [h, w], "counts": counts})[0]["counts"]
    # pycocotools' rleToString writes into a malloc(6 * m) buffer: its closing NUL overflows it
    # when every count takes 6 characters (|delta| >= 2^24), 7-character counts (>= 2^29) more
    # (heap-buffer-overflows found by this harness under ASan); compare with it only below 2^24
    if counts and max(counts) < 2**24:
        ref = coco().frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"]
        check(ours.encode() == ref, f"rle_compress {ours!r} != pycocotools {ref!r} for {counts}")
    back = ops.rle_decompress({"size": [h, w], "counts": ours})[0]["counts"]
    check(back == counts, f"compress/decompress round trip: {counts} -> {ours!r} -> {back}")


def mutated_string(fdp) -> None:
    """A pycocotools string of a real mask with a few bytes replaced, cut or repeated."""
    h, w = fdp.ConsumeIntInRange(1, 16), fdp.ConsumeIntInRange(1, 16)
    m = bits(fdp, h * w).reshape(1, h, w)
    s = bytearray(coco_encode(m)[0]["counts"])
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        if not s:
            break
        op = fdp.ConsumeIntInRange(0, 3)
        i = fdp.ConsumeIntInRange(0, len(s) - 1)
        if op == 0:
            s[i] = fdp.ConsumeIntInRange(0, 255)
        elif op == 1:
            s[i] = fdp.ConsumeIntInRange(48, 48 + 63)  # stays a valid character
        elif op == 2:
            del s[i:]
        else:
            s[i:i] = s[i:i + fdp.ConsumeIntInRange(1, 4)]
    check_parsed(bytes(s), fdp)


def batch_offsets(fdp) -> None:
    """RleBatch with arbitrary CSR offsets: to_dicts(compressed=True) must validate them."""
    m = fdp.ConsumeIntInRange(0, 12)
    counts = np.array([fdp.ConsumeIntInRange(0, 50) for _ in range(m)], np.uint32)
    if fdp.ConsumeBool():  # a valid CSR, then maybe one entry changed
        cuts = sorted(fdp.ConsumeIntInRange(0, m) for _ in range(fdp.ConsumeIntInRange(0, 4)))
        offsets = [0, *cuts, m]
        if fdp.ConsumeBool() and offsets:
            offsets[fdp.ConsumeIntInRange(0, len(offsets) - 1)] = wild_int(fdp, -3, m + 3)
    else:
        offsets = [wild_int(fdp, -3, m + 3) for _ in range(fdp.ConsumeIntInRange(0, 5))]
    valid = (len(offsets) >= 1 and offsets[0] == 0 and offsets[-1] == m
             and all(a <= b for a, b in zip(offsets, offsets[1:])))
    if any(not -(2**63) <= o < 2**63 for o in offsets):
        return  # not an int64 array; numpy rejects it before samantic sees it
    off = np.array(offsets, np.int64)
    b = RleBatch(counts, off, (1, 1))
    ok, res = call(b.to_dicts, compressed=True)
    if not valid:
        check(not ok, f"rle_to_strings accepted offsets {offsets} for {m} counts")
        return
    check(ok, f"valid batch rejected: {res}")
    check(len(res) == len(offsets) - 1, "one string per RLE")
    for i, d in enumerate(res):
        part = counts[offsets[i]:offsets[i + 1]].tolist()
        if part:
            ref = coco().frPyObjects({"size": [1, 1], "counts": part}, 1, 1)["counts"].decode()
            check(d["counts"] == ref, f"string {i}: {d['counts']!r} vs pycocotools {ref!r}")
        check(_C.rle_from_string(d["counts"].encode()).tolist() == part, f"string {i} round trip")


def TestOneInput(data: bytes) -> None:
    fdp = __import__("atheris").FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0:
        check_parsed(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)), fdp)
    elif mode == 1:
        valid_counts(fdp)
    elif mode == 2:
        mutated_string(fdp)
    else:
        batch_offsets(fdp)


def seeds():
    out = seed_inputs(seed=1)
    # mode 0 with real pycocotools strings and a few classic bad ones. FuzzedDataProvider takes
    # bytes from the front and integers from the back: mode 0 and the length are the last bytes.
    for s in [b"", b"0", b"1", b"52203", b"PPYo0", b"0\x00", b"o", b"\x7f", b"oooooooooooooo0", b"0000000000001",
              b"?" * 13 + b"0", b"OOOOOOO7", b"P6", b"P" * 12 + b"N", b"ooooooO"]:
        out.append(s + bytes([1, len(s), 0]))
    return out


if __name__ == "__main__":
    main(TestOneInput, seeds)
