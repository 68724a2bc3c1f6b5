"""benchmarks/amg_missed.py: each object's miss is put down to the filter that drops its good candidates."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import amg_missed  # noqa: E402

F = np.float32


def _boxes(n: int) -> np.ndarray:
    return np.array([[40 * i, 0, 40 * i + 10, 10] for i in range(n)], F)  # disjoint: the NMS drops nothing


def test_each_cause():
    # candidates x objects; thresholds: predicted IoU > 0.8, stability >= 0.93
    iou = np.array([
        [0.9, 0.0, 0.0, 0.0, 0.0, 0.0],  # object 0: a good candidate passes both -> found
        [0.0, 0.6, 0.0, 0.0, 0.0, 0.0],  # object 1: good, passes stability only -> predicted IoU
        [0.0, 0.0, 0.7, 0.0, 0.0, 0.0],  # object 2: good, passes the predicted IoU only -> stability
        [0.0, 0.0, 0.0, 0.8, 0.0, 0.0],  # object 3: good, passes neither -> both
        [0.0, 0.0, 0.0, 0.0, 0.55, 0.0],  # object 4: one passes the predicted IoU ...
        [0.0, 0.0, 0.0, 0.0, 0.6, 0.4],  # ... the other stability -> split; object 5: nothing >= 0.5 -> none
    ])
    preds = np.array([0.9, 0.5, 0.9, 0.5, 0.9, 0.5], F)
    stab = np.array([0.95, 0.95, 0.5, 0.5, 0.5, 0.95], F)
    assert amg_missed.classify(iou, preds, stab, _boxes(6), 0.8, 0.93, 0.3) == [
        "found", "predicted IoU", "stability", "both", "split", "none"]


def test_nms_drops_a_good_candidate_for_a_better_scored_one():
    # two overlapping boxes, the better-scored mask matches nothing: the object's good one falls to the NMS
    iou = np.array([[0.2], [0.9]])
    preds = np.array([0.95, 0.85], F)
    stab = np.array([0.97, 0.97], F)
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11]], F)
    assert amg_missed.classify(iou, preds, stab, boxes, 0.8, 0.93, 0.3) == ["NMS"]
    assert amg_missed.classify(iou, preds, stab, boxes, 0.8, 0.93, 0.95) == ["found"]  # a looser NMS keeps both
