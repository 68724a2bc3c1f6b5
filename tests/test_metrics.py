"""Held-out evaluation helpers of samantic.train.metrics."""

import numpy as np
import pytest

from samantic.train.metrics import TRAIN_SEED_START, centre_point, evaluate_sam, mask_iou, recall_at


def test_mask_iou_and_recall():
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True
    b = np.zeros((10, 10), bool)
    b[4:8, 4:8] = True
    assert mask_iou(a, b) == pytest.approx(4 / 28)
    assert mask_iou(a, a) == 1.0 and mask_iou(a & False, b & False) == 0.0
    gt = np.stack([a, b])
    assert recall_at(gt, np.stack([a]), (0.5, 0.99)) == {0.5: 1, 0.99: 1}
    assert recall_at(gt, np.zeros((0, 10, 10), bool), (0.5,)) == {0.5: 0}


def test_centre_point_is_inside_the_largest_component():
    m = np.zeros((40, 40), bool)
    m[5:8, 5:8] = True  # small component
    m[15:35, 10:30] = True  # large component, centre near (20, 25)
    x, y = centre_point(m)
    assert m[int(y), int(x)] and 15 <= x <= 25 and 20 <= y <= 30


def test_evaluate_sam_runs_on_held_out_seeds_only(structured_nano):
    with pytest.raises(ValueError, match="training seed"):
        evaluate_sam(structured_nano, [TRAIN_SEED_START], progress=False)
    r = evaluate_sam(structured_nano, [1], [1], progress=False, amg_kwargs={"points_per_side": 4})
    assert r.n_scenes == 1 and r.n_instances > 0
    for k in ("miou_1pt_top", "miou_1pt_oracle", "miou_3pt", "recall_50", "recall_75"):
        assert 0.0 <= r.metrics[k] <= 1.0
    assert r.metrics["miou_1pt_oracle"] >= r.metrics["miou_1pt_top"]
    assert "3-point mIoU" in r.markdown()
