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


def test_centre_point_of_a_region_cut_by_the_image_edge():
    """A floor along the image's bottom: its centre counting the image edge as a boundary, else its widest part."""
    m = np.zeros((40, 60), bool)
    m[30:, :] = True  # 10 rows at the bottom, all the width
    x, y = centre_point(m)
    assert 33 <= y <= 37 and m[int(y), int(x)]  # the band's middle row (any column at distance 5 ties)
    x, y = centre_point(m, image_edge_is_boundary=False)
    assert m[int(y), int(x)] and y >= 38  # the rows farthest from its only inside edge (row 30)


def test_single_point_ious_prompts_each_mask_once_at_its_centre():
    """The predictor is asked once per mask, at centre_point; top is the highest-scoring of 3, best the best IoU."""
    from samantic.train.metrics import single_point_ious

    a = np.zeros((20, 20), bool)
    a[2:8, 2:8] = True
    b = np.zeros((20, 20), bool)
    b[10:18, 10:18] = True

    class Predictor:
        asked = []

        def set_image(self, image):
            self.image = image

        def predict(self, point_coords, point_labels, multimask_output):
            self.asked.append(tuple(point_coords[0]))
            gt = a if point_coords[0][0] < 10 else b
            half = gt.copy()
            half[:, :13] = False
            return np.stack([half, gt, ~gt]), np.array([0.9, 0.5, 0.1]), None

    top, best = single_point_ious(Predictor(), np.zeros((20, 20, 3), np.uint8), [a, b])
    assert Predictor.asked == [centre_point(a), centre_point(b)]
    assert top == [0.0, 5 / 8] and best == [1.0, 1.0]


def test_evaluate_sam_runs_on_held_out_seeds_only(structured_nano):
    with pytest.raises(ValueError, match="training seed"):
        evaluate_sam(structured_nano, [TRAIN_SEED_START], progress=False)
    r = evaluate_sam(structured_nano, [1], [1], progress=False, amg_kwargs={"points_per_side": 4})
    assert r.n_scenes == 1 and r.n_instances > 0
    for k in ("miou_1pt_top", "miou_1pt_oracle", "miou_3pt", "recall_50", "recall_75"):
        assert 0.0 <= r.metrics[k] <= 1.0
    assert r.metrics["miou_1pt_oracle"] >= r.metrics["miou_1pt_top"]
    assert "3-point mIoU" in r.markdown()
    # masks per image: what the generator keeps on the scene, at the same settings
    from samantic.pipeline import AutomaticMaskGenerator
    from samantic.train.data.shapes import render_scene

    kept = len(AutomaticMaskGenerator(structured_nano, points_per_side=4).generate_masks(render_scene(1).image))
    assert r.metrics["masks_per_image"] == kept
    assert "masks per image" in r.markdown()


def test_calibration_grids_of_the_cli_are_the_library_defaults():
    import inspect

    from samantic.cli.eval import eval_thresholds
    from samantic.train.metrics import BOX_NMS_GRID, PRED_IOU_GRID, SAM_BOX_NMS, STABILITY_GRID, calibrate_thresholds

    params = inspect.signature(eval_thresholds).parameters
    assert [float(v) for v in params["pred_iou"].default.split(",")] == list(PRED_IOU_GRID)
    assert [float(v) for v in params["stability"].default.split(",")] == list(STABILITY_GRID)
    assert [float(v) for v in params["box_nms"].default.split(",")] == list(BOX_NMS_GRID)
    assert inspect.signature(calibrate_thresholds).parameters["box_nms_grid"].default == BOX_NMS_GRID
    assert SAM_BOX_NMS in BOX_NMS_GRID  # segment-anything's own stays a candidate
    assert {0.92, 0.93, 0.94} <= set(STABILITY_GRID)  # fine steps under 0.95 for fine-tuned models


def test_evaluate_sam_prompts_a_task_table_as_unspecified():
    """A SUM model is measured as samantic's APIs run it: with the "unspecified" row added (a zero
    table measures as no table; a changed "unspecified" row changes the point metrics, the other rows do not)."""
    import copy

    import torch

    from samantic.models import attach_task_prompt, create_model

    def points(model):  # the point metrics (no segment-everything scenes: its recall is nan)
        m = evaluate_sam(model, [1, 2], [], progress=False).metrics
        return {k: m[k] for k in ("miou_1pt_top", "miou_1pt_oracle", "miou_3pt")}

    base = create_model("sam_nano").eval()
    plain = points(base)
    zero = copy.deepcopy(base)
    attach_task_prompt(zero)
    assert points(zero) == plain
    other_rows = copy.deepcopy(zero)
    with torch.no_grad():
        other_rows.task_prompt.embed.weight[1:].normal_(0, 1.0)
    assert points(other_rows) == plain
    unspecified = copy.deepcopy(zero)
    with torch.no_grad():
        unspecified.task_prompt.embed.weight[0].normal_(0, 1.0)
    assert points(unspecified)["miou_1pt_top"] != plain["miou_1pt_top"]


def test_ideal_logits_reproduce_a_large_disk():
    import cv2

    from samantic.train.metrics import ideal_low_res_logits

    gt = np.zeros((300, 400), np.uint8)
    cv2.circle(gt, (200, 150), 100, 1, -1)
    logits = ideal_low_res_logits(gt.astype(bool), (288, 384), 384, 96)
    assert logits.shape == (96, 96)
    assert logits[36, 48] > 0 and logits[2, 2] < 0 and logits[90, 48] < 0  # inside, outside, padding
    import torch
    import torch.nn.functional as F

    up = F.interpolate(torch.from_numpy(logits)[None, None], (384, 384), mode="bilinear", align_corners=False)
    up = F.interpolate(up[..., :288, :384], (300, 400), mode="bilinear", align_corners=False)[0, 0].numpy()
    assert mask_iou(up > 0, gt.astype(bool)) > 0.98


def test_resolution_ceiling_grows_with_the_low_res_size():
    from samantic.models import build_sam, get_config
    from samantic.train.metrics import resolution_ceiling

    nano = build_sam(get_config("sam_nano"))
    finer = build_sam(get_config("sam_nano", img_size=768))  # 48x48 tokens, 192x192 low-res masks
    c_nano, n = resolution_ceiling(nano, [0, 1])
    c_finer, n2 = resolution_ceiling(finer, [0, 1])
    assert n == n2 > 0
    assert 0.6 < c_nano < c_finer < 1.0


def test_eval_sam_cli_reports_the_ceiling(tmp_path):
    import json

    from typer.testing import CliRunner

    from samantic.cli.main import app

    import torch

    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(app, ["eval", "sam", "--seeds", "0:1", "--amg-seeds", "0:1", "--out", str(tmp_path),
                                     "--pred-iou-thresh", "0.5", "--stability-score-thresh", "0.8", "--threads", "1",
                                     "--no-progress"])
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1  # --threads caps torch's CPU threads (every eval command has it)
    finally:
        torch.set_num_threads(before)
    data = json.loads((tmp_path / "eval_sam.json").read_text())
    m = data["metrics"]
    assert 0.0 < m["miou_1pt_top"] <= m["ceiling"] < 1.0  # the shipped sam_nano stays under its resolution ceiling
    from samantic.models.registry import BOX_NMS_NANO

    # the flags given, and the model's own box NMS (not given): the command reproduces the run
    assert data["command"].endswith(f"--pred-iou-thresh 0.5 --stability-score-thresh 0.8 --box-nms-thresh {BOX_NMS_NANO}")
    assert data["segment_everything"]["box_nms_thresh"] == BOX_NMS_NANO
    assert "resolution ceiling" in (tmp_path / "eval_sam.md").read_text()
    r = CliRunner().invoke(app, ["eval", "sam", "--seeds", "5:2"])
    assert r.exit_code != 0 and "START < STOP" in r.output


def test_cli_eval_sam_at_another_input_side(tmp_path):
    import json

    from typer.testing import CliRunner

    from samantic.cli.main import app

    runs = {}
    for side in (None, 448):
        out = tmp_path / str(side)
        args = ["eval", "sam", "--seeds", "0:1", "--amg-seeds", "0:1", "--no-ceiling", "--out", str(out), "--no-progress"]
        r = CliRunner().invoke(app, args + (["--input-size", str(side)] if side else []))
        assert r.exit_code == 0, r.output
        runs[side] = json.loads((out / "eval_sam.json").read_text())
    assert runs[None]["input_size"] == 384 and "--input-size" not in runs[None]["command"]
    assert runs[448]["input_size"] == 448 and "--input-size 448 " in runs[448]["command"]
    assert runs[448]["metrics"]["miou_1pt_top"] != runs[None]["metrics"]["miou_1pt_top"]  # another input, other masks
    for args, msg in ((["--input-size", "100"], "multiple of 32"), (["--model", "sam_nano_vit", "--input-size", "448"],
                                                                   "convolutional encoder")):
        r = CliRunner().invoke(app, ["eval", "sam", "--seeds", "0:1", "--amg-seeds", "0:1", "--out", str(tmp_path / "x")] + args)
        assert r.exit_code == 1 and msg in r.output, r.output
