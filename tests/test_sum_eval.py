"""`samantic eval sum`: boundary IoU, the click protocol per task mask, the ablation table and the CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from samantic.train.sum_eval import boundary_iou, evaluate_scene, evaluate_sum, mask_boundary, sum_table


@pytest.fixture(scope="module")
def nano():
    from samantic.models import create_model

    return create_model("sam_nano").eval()


def _band_brute_force(mask: np.ndarray, d: int) -> np.ndarray:
    """Pixels of ``mask`` whose chessboard distance to a pixel outside it (the border counts) is at most d."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), bool)
    padded[1:-1, 1:-1] = mask
    outside = np.argwhere(~padded)
    band = np.zeros_like(mask)
    for y, x in np.argwhere(mask):
        dist = np.abs(outside - (y + 1, x + 1)).max(1).min()
        band[y, x] = dist <= d
    return band


def test_mask_boundary_is_the_band_within_d_of_the_contour():
    rng = np.random.default_rng(0)
    for trial in range(6):
        m = np.zeros((30, 40), bool)
        for _ in range(3):
            y, x = rng.integers(0, 30), rng.integers(0, 40)
            m[max(0, y - rng.integers(2, 9)) : y + rng.integers(2, 9), max(0, x - rng.integers(2, 12)) : x + rng.integers(2, 12)] = True
        for d in (1, 2, 4):
            assert np.array_equal(mask_boundary(m, d), _band_brute_force(m, d)), (trial, d)


def test_boundary_iou_values():
    a = np.zeros((100, 100), bool)
    a[20:60, 20:60] = True
    assert boundary_iou(a, a) == 1.0
    b = np.zeros_like(a)
    b[70:90, 70:90] = True
    assert boundary_iou(a, b) == 0.0
    assert boundary_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert boundary_iou(a, np.zeros_like(a)) == 0.0
    # a one-pixel shift: the region IoU stays high, the boundary IoU drops more
    s = np.roll(a, 1, axis=1)
    d = max(1, round(0.02 * np.hypot(100, 100)))  # 3
    g, p = mask_boundary(a, d), mask_boundary(s, d)
    assert boundary_iou(a, s) == pytest.approx((g & p).sum() / (g | p).sum())
    region = (a & s).sum() / (a | s).sum()
    assert boundary_iou(a, s) < region


def test_first_click_is_segment_anythings_predictor(nano):
    """Round one of the protocol equals segment-anything's SamPredictor at the mask's centre point."""
    from segment_anything import SamPredictor

    from samantic.pipeline.predictor import Predictor
    from samantic.train.data.panoptic import render_panoptic
    from samantic.train.metrics import centre_point, mask_iou
    from samantic.train.sum import scene_task_masks

    scene = render_panoptic(3)
    masks, tasks = scene_task_masks(scene)
    res = evaluate_scene(Predictor(nano), scene.image, masks, tasks, points=(1, 3))
    ref = SamPredictor(nano)
    ref.set_image(scene.image)
    expected = []
    for gt in masks:
        m, s, _ = ref.predict(np.array([centre_point(gt)]), np.array([1]), multimask_output=True)
        expected.append(mask_iou(m[int(np.argmax(s))], gt))
    np.testing.assert_allclose(res[1][0], expected, atol=2e-3)
    assert res[3][0].shape == (len(masks),) and ((0 <= res[3][1]) & (res[3][1] <= 1)).all()
    # on average, two corrective clicks do not make masks worse
    assert res[3][0].mean() >= res[1][0].mean() - 0.01


def test_task_prompt_is_used_only_when_asked(nano):
    import copy

    from samantic.models.task_prompt import attach_task_prompt
    from samantic.pipeline.predictor import Predictor
    from samantic.train.data.panoptic import render_panoptic
    from samantic.train.sum import PART, scene_task_masks

    scene = render_panoptic(5)
    masks, tasks = scene_task_masks(scene)
    model = copy.deepcopy(nano)
    table = attach_task_prompt(model)
    with torch.no_grad():
        table.embed.weight[PART] = torch.randn(table.embed.weight.shape[1]) * 2.0
    base = evaluate_scene(Predictor(nano), scene.image, masks, tasks, points=(1,))
    asked = evaluate_scene(Predictor(model), scene.image, masks, tasks, points=(1,))
    unasked = evaluate_scene(Predictor(model), scene.image, masks, tasks, points=(1,), ask_task=False)
    np.testing.assert_allclose(unasked[1][0], base[1][0], atol=1e-6)
    part = tasks == PART
    np.testing.assert_allclose(asked[1][0][~part], base[1][0][~part], atol=1e-6)
    assert not np.allclose(asked[1][0][part], base[1][0][part])


def test_evaluate_sum_table_and_errors(nano):
    r = evaluate_sum({"base": (nano, True), "again": (nano, False)}, range(0, 2), points=(1, 2), progress=False)
    m = r.metrics
    for task in ("unspecified", "salient", "entity", "part"):
        assert m["base"][task][1]["masks"] > 0
        assert m["base"][task][1]["miou"] == pytest.approx(m["again"][task][1]["miou"])  # no table: same model
    avg = np.mean([m["base"][t][2]["miou"] for t in ("unspecified", "salient", "entity", "part")])
    assert m["base"]["average"][2]["miou"] == pytest.approx(avg)
    table = sum_table(r)
    assert table.splitlines()[0] == "| points | task | base | again |"
    assert len(table.splitlines()) == 2 + 2 * 5
    with pytest.raises(ValueError, match="training seed"):
        evaluate_sum({"base": (nano, True)}, [1_000_000], progress=False)


def test_cli_eval_sum(tmp_path, nano):
    from samantic.cli.main import app
    from samantic.models import save_checkpoint
    from samantic.models.task_prompt import attach_task_prompt

    import copy

    model = copy.deepcopy(nano)
    attach_task_prompt(model)
    ckpt = save_checkpoint(model, tmp_path / "with_table.safetensors")
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "sum", "--column", f"tuned={ckpt}", "--column", "base=sam_nano",
                            "--seeds", "0:1", "--points", "1", "--forgetting-seeds", "0:1", "--amg-seeds", "",
                            "--out", str(tmp_path / "ev"), "--no-progress"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "ev" / "eval_sum.json").read_text())
    assert list(data["metrics"]) == ["tuned", "tuned, unspecified prompt", "base"]
    # segment-everything at the architecture's thresholds for every column, even when the first is a file
    from samantic.models import get_model_entry

    assert data["segment_everything"] == dict(get_model_entry("sam_nano").thresholds)
    # a zero table: every column is the base model
    for col in data["metrics"]:
        assert data["metrics"][col]["part"]["1"]["miou"] == pytest.approx(data["metrics"]["base"]["part"]["1"]["miou"])
    assert set(data["forgetting"]) == {"base", "tuned"}
    assert data["forgetting"]["base"]["miou_1pt_top"] == pytest.approx(data["forgetting"]["tuned"]["miou_1pt_top"])
    assert "### mean boundary IoU" in (tmp_path / "ev" / "eval_sum.md").read_text()
    for grid, msg in (("0.9,x", "--calibration-stability"), ("1.5", "--calibration-stability"),
                      (",", "--calibration-stability")):  # a grid with no value is refused, not taken as the default
        bad = runner.invoke(app, ["eval", "sum", "--column", "base=sam_nano", "--seeds", "0:1", "--amg-seeds", "0:1",
                                  "--calibration-seeds", "500:501", "--calibration-stability", grid,
                                  "--out", str(tmp_path / "x")])
        assert bad.exit_code == 1 and msg in bad.output, bad.output
    bad = runner.invoke(app, ["eval", "sum", "--column", "base=sam_nano", "--seeds", "0:1",
                              "--calibration-stability", "0.96", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "needs --calibration-seeds" in bad.output
    bad = runner.invoke(app, ["eval", "sum", "--column", "base=sam_nano", "--seeds", "0:1", "--amg-seeds", "0:2",
                              "--calibration-seeds", "1:3", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "overlaps --amg-seeds" in bad.output
    bad = runner.invoke(app, ["eval", "sum", "--seeds", "0:1"])
    assert bad.exit_code == 1 and "--column NAME=WEIGHTS" in bad.output
    bad = runner.invoke(app, ["eval", "sum", "--column", "base", "--seeds", "0:1", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "NAME=WEIGHTS" in bad.output
    bad = runner.invoke(app, ["eval", "sum", "--column", "a=nowhere.safetensors", "--seeds", "0:1"])
    assert bad.exit_code == 1 and "neither a registered model nor a file" in bad.output
    bad = runner.invoke(app, ["eval", "sum", "--column", "a=sam_nano", "--points", "0", "--seeds", "0:1"])
    assert bad.exit_code == 1 and "--points" in bad.output


@pytest.mark.slow  # about 3 minutes: four threshold calibrations with segment-everything at 32 x 32 points
def test_cli_eval_sum_calibrates_each_columns_own_thresholds(tmp_path):
    from samantic.cli.main import app

    runner = CliRunner()
    # each column's own thresholds, chosen on calibration scenes disjoint from the recall scenes
    r = runner.invoke(app, ["eval", "sum", "--column", "base=sam_nano", "--seeds", "0:1", "--points", "1",
                            "--forgetting-seeds", "", "--amg-seeds", "0:1", "--calibration-seeds", "500:501",
                            "--out", str(tmp_path / "own"), "--no-progress"])
    assert r.exit_code == 0, r.output
    f = json.loads((tmp_path / "own" / "eval_sum.json").read_text())["forgetting"]["base"]
    from samantic.models import create_model
    from samantic.train.metrics import calibrate_thresholds, evaluate_sam

    cal = calibrate_thresholds(create_model("sam_nano"), range(500, 501), progress=False)
    assert f["own_thresholds"] == {k: cal.best[k] for k in ("pred_iou_thresh", "stability_score_thresh")}
    again = evaluate_sam(create_model("sam_nano"), [], [0], progress=False, amg_kwargs=f["own_thresholds"])
    assert f["recall_50_own"] == pytest.approx(again.metrics["recall_50"])
    assert f["masks_per_image_own"] == again.metrics["masks_per_image"]
    assert "own thresholds" in (tmp_path / "own" / "eval_sum.md").read_text()
    # a stability grid of the user's: the own pair is searched on it (fine-tunes trained for stability need > 0.95)
    r = runner.invoke(app, ["eval", "sum", "--column", "base=sam_nano", "--seeds", "0:1", "--points", "1",
                            "--forgetting-seeds", "", "--amg-seeds", "0:1", "--calibration-seeds", "500:501",
                            "--calibration-stability", "0.96,0.9812345", "--out", str(tmp_path / "grid"), "--no-progress"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "grid" / "eval_sum.json").read_text())
    cal = calibrate_thresholds(create_model("sam_nano"), range(500, 501), stability_grid=(0.96, 0.9812345), progress=False)
    assert data["forgetting"]["base"]["own_thresholds"]["stability_score_thresh"] in (0.96, 0.9812345)
    assert data["forgetting"]["base"]["own_thresholds"] == {k: cal.best[k] for k in ("pred_iou_thresh",
                                                                                       "stability_score_thresh")}
    assert "--calibration-stability 0.96,0.9812345 " in data["command"] + " "  # as given, to the last digit


def test_a_column_at_another_input_side(tmp_path):
    """``NAME=WEIGHTS@SIDE``: the same weights at another input side (conv encoders), registered model or file."""
    import numpy as np
    import torch

    from samantic.cli.eval import load_column
    from samantic.models import create_model, save_checkpoint

    name, weights, sam = load_column("big=sam_nano@768")
    assert (name, weights) == ("big", "sam_nano@768")
    assert sam.image_encoder.img_size == 768 and tuple(sam.prompt_encoder.image_embedding_size) == (96, 96)
    base = create_model("sam_nano")
    for k, v in base.state_dict().items():  # the same weights
        assert torch.equal(sam.state_dict()[k], v), k
    x = torch.rand(1, 3, 768, 768)
    with torch.no_grad():
        assert sam.image_encoder(x).shape[-2:] == (96, 96)
    path = tmp_path / "w@64.safetensors"  # a file, then a file with a suffix of its own
    save_checkpoint(base, path)
    assert load_column(f"f={path}@512")[2].image_encoder.img_size == 512
    ckpt = tmp_path / "w@64"
    ckpt.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="w@64"):  # an existing file is read as a file (not w at side 64)
        load_column(f"f={ckpt}")
    for spec, msg in (("a=sam_nano@100", "multiple of 32"), ("a=sam_nano@0", "multiple of 32"),
                      ("a=sam_vit_b@768", "convolutional encoder"), ("a=nowhere@768", "neither a registered")):
        with pytest.raises((ValueError, FileNotFoundError), match=msg):
            load_column(spec)
    assert np.isclose(sam.mask_threshold, base.mask_threshold)
