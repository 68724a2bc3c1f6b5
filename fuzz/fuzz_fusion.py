"""Fuzzes ``panoptic_fusion`` on RLEs: candidates canonical or not, overlapping, empty, full,
of zero size; scores tied, -0.0, inf, NaN, integer or bool dtypes, of the wrong length;
overlap_thresh and min_area at and beyond their bounds (NaN, inf, negative, bool, float).

Oracle: ``samantic.pipeline.panoptic.panoptic_fusion``, the dense numpy reference (map and kept
must be identical); invalid arguments must be rejected.

    .venv/bin/python fuzz/fuzz_fusion.py [corpus dir] -max_total_time=60
"""

from __future__ import annotations

import math

import numpy as np

from common import call, canonical_counts, check, main, random_masks, seed_inputs
from samantic import ops
from samantic.ops import RleBatch
from samantic.pipeline.panoptic import panoptic_fusion as reference


def TestOneInput(data: bytes) -> None:
    fdp = __import__("atheris").FuzzedDataProvider(data)
    masks = random_masks(fdp, n_max=6, side_max=10)
    n, h, w = masks.shape
    if fdp.ConsumeBool():
        rles = ops.rle_encode(masks)
    else:  # non-canonical: a zero-length run pair appended or inserted
        dicts = []
        for m in masks:
            c = canonical_counts(m)
            if fdp.ConsumeBool():
                c = c[:1] + [0, 0] + c[1:]
            dicts.append({"size": [h, w], "counts": c})
        rles = RleBatch.from_dicts(dicts) if dicts else RleBatch.pack([], (h, w))
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind == 0:
        scores = np.array([fdp.PickValueInList([0.5, 0.5, -0.0, 0.0, math.inf, -math.inf, 1e300])
                           for _ in range(n)])
    elif kind == 1:
        scores = np.array([fdp.ConsumeIntInRange(-3, 3) for _ in range(n)], np.int64)
    elif kind == 2:
        scores = np.array([fdp.ConsumeBool() for _ in range(n)], bool)
    else:
        scores = np.array([fdp.ConsumeFloatInRange(0.0, 1.0) for _ in range(n)], np.float32)
    overlap = fdp.PickValueInList([0.5, 0.0, 1.0, 0.8, 1e-9]) if fdp.ConsumeBool() else fdp.ConsumeProbability()
    min_area = fdp.ConsumeIntInRange(0, 6)
    bad = fdp.ConsumeIntInRange(0, 9)
    if bad == 1:
        overlap = fdp.PickValueInList([math.nan, -0.1, 1.5, math.inf, True, "0.5", None])
    elif bad == 2:
        min_area = fdp.PickValueInList([-1, 1.5, math.nan, True, 2**63, "3", None])
    elif bad == 3 and n:
        scores = np.concatenate([scores, scores[:1]]) if fdp.ConsumeBool() else scores[1:]
    elif bad == 4 and n:
        scores = scores.astype(np.float64)
        scores[fdp.ConsumeIntInRange(0, n - 1)] = math.nan
    elif bad == 5:
        scores = scores.reshape(1, -1)
    elif bad == 6 and n:
        scores = np.array(["a"] * n)
    ok, res = call(ops.panoptic_fusion, rles, scores, overlap, min_area)
    invalid = bad in (1, 2, 5) or (bad in (3, 4, 6) and n)
    if invalid:
        check(not ok, f"invalid argument {bad} accepted: overlap {overlap!r}, min_area {min_area!r}, "
                      f"scores {scores!r:.100}; got {res!r:.200}")
        return
    check(ok, f"valid panoptic_fusion call rejected: {res}")
    fused, kept = res
    check(fused.shape == (h, w) and fused.dtype == np.int32, f"map {fused.shape} {fused.dtype}")
    check(kept.shape == (n,) and kept.dtype == bool, f"kept {kept.shape} {kept.dtype}")
    ref_map, ref_kept = reference(masks, scores, overlap, min_area)
    check(np.array_equal(kept, ref_kept), f"kept {kept.tolist()} vs reference {ref_kept.tolist()}; scores "
                                          f"{scores.tolist()} overlap {overlap} min_area {min_area}")
    check(np.array_equal(fused, ref_map), f"map differs from the reference; scores {scores.tolist()}")


def seeds():
    return seed_inputs(seed=6)


if __name__ == "__main__":
    main(TestOneInput, seeds)
