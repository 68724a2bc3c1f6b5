"""`samantic train iou-head`: refits the IoU head alone, on true IoUs that segment-anything's own predictor agrees with."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from samantic.cli.main import app
from samantic.models import create_model
from samantic.models.loading import read_metadata, read_state_dict, record_thresholds
from samantic.train.iou_head import (HEAD_PREFIX, IouExamples, collect_iou_examples, collect_task_examples,
                                     fit_iou_head, iou_head_quality, refit_iou_head, write_refitted)
from samantic.train.metrics import mask_iou

SEEDS = [601, 600]  # 601 first: clicked at their centres, some objects give a mask that matches another better


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return create_model("sam_nano").eval()


@pytest.fixture(scope="module")
def examples(nano):
    return collect_iou_examples(nano, SEEDS, uniform_points=3, progress=False)


def test_targets_are_the_true_iou_of_segment_anythings_own_masks(nano, examples):
    """The IoU with the object under the point (the centres' are their own objects), else with the best object."""
    from segment_anything import SamPredictor

    from samantic.train.data.shapes import render_scene

    # rebuild the first scene's prompts: the same draw, then each object's centre
    scene = render_scene(SEEDS[0])
    h, w = scene.image.shape[:2]
    rng = np.random.default_rng(0)
    pts = np.stack([rng.uniform(0, w, 3), rng.uniform(0, h, 3)], 1)
    from samantic.train.metrics import centre_point

    pts = np.concatenate([pts, np.array([centre_point(m) for m in scene.masks]).reshape(-1, 2)])
    assert len(scene.masks) > 0
    predictor = SamPredictor(nano)
    predictor.set_image(scene.image)
    n = len(pts)
    assert examples.kinds[:n].tolist() == [0] * 3 + [1] * len(scene.masks)
    branches, differs = set(), False
    for i, p in enumerate(pts):
        masks, scores, _ = predictor.predict(np.array([p], np.float32), np.array([1]), multimask_output=True)
        x, y = int(p[0]), int(p[1])
        under = [j for j, g in enumerate(scene.masks) if g[y, x]]
        want = [mask_iou(m, scene.masks[under[0]]) if under else max(mask_iou(m, g) for g in scene.masks)
                for m in masks]
        branches.add(bool(under))
        best = [max(mask_iou(m, g) for g in scene.masks) for m in masks]
        differs = differs or not np.allclose(want, best)
        np.testing.assert_allclose(examples.trues[i, 1:], want, atol=1e-5)
        np.testing.assert_allclose(examples.preds[i, 1:], scores, atol=1e-5)
    assert branches == {True, False}  # points on an object and on nothing both checked
    assert differs  # and the object under the point is not always the best-matching one
    assert examples.feats.shape == (len(examples), nano.mask_decoder.transformer_dim)
    assert examples.trues.shape == examples.preds.shape == (len(examples), 4)
    # the recorded features are what the head scores
    with torch.no_grad():
        again = nano.mask_decoder.iou_prediction_head(torch.from_numpy(examples.feats)).numpy()
    np.testing.assert_allclose(again, examples.preds, atol=1e-5)


def test_examples_round_trip_and_a_wrong_file_is_named(examples, tmp_path):
    back = IouExamples.load(examples.save(tmp_path / "ex.npz"))
    for k in ("feats", "preds", "trues", "kinds", "tasks"):
        np.testing.assert_array_equal(getattr(back, k), getattr(examples, k))
    # a cache written before prompts recorded their task: every prompt was asked as "unspecified"
    np.savez(tmp_path / "old.npz", **{k: getattr(examples, k) for k in ("feats", "preds", "trues", "kinds")})
    old = IouExamples.load(tmp_path / "old.npz")
    assert old.tasks.tolist() == [0] * len(examples)
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="other.npz.*not a file of IoU-head examples"):
        IouExamples.load(tmp_path / "other.npz")


def test_fitting_lowers_the_error_on_what_it_fits(nano, examples):
    before = float(np.mean((examples.preds - examples.trues) ** 2))
    head, history = fit_iou_head(nano.mask_decoder.iou_prediction_head, examples, examples, epochs=40, lr=3e-3)
    with torch.no_grad():
        after_pred = head(torch.from_numpy(examples.feats)).numpy()
    after = float(np.mean((after_pred - examples.trues) ** 2))
    assert after < 0.7 * before, (before, after)
    assert len(history) == 40 and history[-1]["train_mse"] < history[0]["train_mse"]
    q = iou_head_quality(after_pred, examples)
    assert q["centre_oracle"] >= q["centre_picked"]
    # the model's own head is untouched
    with torch.no_grad():
        np.testing.assert_allclose(nano.mask_decoder.iou_prediction_head(torch.from_numpy(examples.feats)).numpy(),
                                   examples.preds, atol=1e-5)


def test_centre_weight_trades_the_other_prompts_error_for_the_centres(nano, examples):
    centre = examples.kinds == 1
    err = {}
    for w in (1.0, 30.0):
        head, _ = fit_iou_head(nano.mask_decoder.iou_prediction_head, examples, epochs=40, lr=3e-3, centre_weight=w)
        with torch.no_grad():
            pred = head(torch.from_numpy(examples.feats)).numpy()
        sq = ((pred - examples.trues) ** 2).mean(1)
        err[w] = (sq[centre].mean(), sq[~centre].mean())
    assert err[30.0][0] < err[1.0][0] and err[30.0][1] > err[1.0][1], err
    with pytest.raises(ValueError, match="centre_weight must be positive"):
        fit_iou_head(nano.mask_decoder.iou_prediction_head, examples, centre_weight=0)


def test_the_written_file_changes_only_the_head_and_drops_stale_thresholds(nano, examples, tmp_path):
    from samantic.models.loading import resolve_checkpoint

    src = tmp_path / "src.safetensors"
    src.write_bytes(resolve_checkpoint("pkg:assets/sam_nano.safetensors").read_bytes())
    record_thresholds(src, {"pred_iou_thresh": 0.8, "stability_score_thresh": 0.95})
    head, _ = fit_iou_head(nano.mask_decoder.iou_prediction_head, examples, epochs=3)
    out = write_refitted(src, head, tmp_path / "out.safetensors", {"note": "test"})
    a, b = read_state_dict(src), read_state_dict(out)
    assert set(a) == set(b)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(HEAD_PREFIX) for k in changed)
    assert all(b[k].dtype == a[k].dtype for k in a)
    meta_a, meta_b = read_metadata(src), read_metadata(out)
    assert "thresholds" in meta_a and "thresholds" not in meta_b
    assert json.loads(meta_b["iou_head_refit"]) == {"note": "test"}
    assert meta_b["config"] == meta_a["config"]
    # masks are the source's, bit for bit; the scores are the new head's
    m_a = create_model("sam_nano", checkpoint=str(src)).eval()
    m_b = create_model("sam_nano", checkpoint=str(out)).eval()
    x = torch.rand(1, 3, 384, 384) * 255
    with torch.no_grad():
        emb = m_a.image_encoder(m_a.preprocess(x))
        sparse, dense = m_a.prompt_encoder(points=(torch.tensor([[[100.0, 120.0]]]), torch.ones(1, 1, dtype=torch.int)),
                                           boxes=None, masks=None)
        pe = m_a.prompt_encoder.get_dense_pe()
        low_a, iou_a = m_a.mask_decoder.predict_masks(emb, pe, sparse, dense)
        low_b, iou_b = m_b.mask_decoder.predict_masks(emb, pe, sparse, dense)
    assert torch.equal(low_a, low_b) and not torch.equal(iou_a, iou_b)


def test_panoptic_scenes_score_against_their_entities(nano):
    ex = collect_iou_examples(nano, [600], scenes="v2", uniform_points=2, progress=False)
    from samantic.train.data.panoptic import render_panoptic

    n_entities = len(render_panoptic(600).entity_masks)
    assert ex.kinds.tolist() == [0, 0] + [1] * n_entities
    assert ex.trues.min() >= 0 and ex.trues.max() <= 1 and ex.trues[2:, 1:].max(1).mean() > 0.3


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="below 1,000,000"):
        refit_iou_head("sam_nano", tmp_path / "x.safetensors", first_seed=5, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="validation seed 2000000 is a training seed"):
        refit_iou_head("sam_nano", tmp_path / "x.safetensors", val_seeds=[2_000_000], progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="scenes must be one of v1, v2"):
        refit_iou_head("sam_nano", tmp_path / "x.safetensors", scenes="v3", progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="x.pt: the refitted weights are written as .safetensors"):
        refit_iou_head("sam_nano", tmp_path / "x.pt", progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="sam_nano_vit ships no weights"):
        refit_iou_head("sam_nano_vit", tmp_path / "x.safetensors", progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="scenes must be one of v1, v2, tasks"):
        refit_iou_head("sam_nano", tmp_path / "x.safetensors", scenes="v3", progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="replayed plain scenes go with scenes='tasks'"):
        refit_iou_head("sam_nano", tmp_path / "x.safetensors", replay=2, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="replayed plain scenes start at seed 7"):
        refit_iou_head("sam_nano", tmp_path / "x.safetensors", scenes="tasks", replay=2, replay_seed=7,
                       progress=False, log=lambda s: None)
    # a SUM model's one head serves every task: refitting it on plain scenes alone is refused, naming the file
    with pytest.raises(ValueError, match="sam_nano_sum.safetensors: this model has SUM's task table"):
        refit_iou_head("sam_nano_sum", tmp_path / "x.safetensors", scenes="v1", progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def tasked():
    """sam_nano with a task table whose rows differ, so that every task decodes differently."""
    from samantic.models import attach_task_prompt

    m = create_model("sam_nano").eval()
    table = attach_task_prompt(m)
    with torch.no_grad():
        table.embed.weight.copy_(torch.randn(table.embed.weight.shape, generator=torch.Generator().manual_seed(0)))
    return m


def test_task_clicks_score_the_predictor_s_own_masks_against_the_clicked_task_mask(tasked):
    """Every task mask at its centre and at random pixels inside it, asked with its task: the head's outputs and
    the targets are those of the predictor-style API asked the same (samantic's Predictor, segment-anything's
    SamPredictor plus ``task=``)."""
    from samantic.pipeline.predictor import Predictor
    from samantic.train.data.panoptic import render_panoptic
    from samantic.train.metrics import centre_point
    from samantic.train.sum import scene_task_masks

    ex = collect_task_examples(tasked, [600], clicks=2, progress=False)
    scene = render_panoptic(600)
    masks, tasks = scene_task_masks(scene)
    keep = masks.reshape(len(masks), -1).any(1)
    masks, tasks = masks[keep], tasks[keep]
    assert len(ex) == 3 * len(masks) and set(tasks.tolist()) == {0, 1, 2, 3}
    assert ex.kinds.tolist() == [1, 2, 2] * len(masks)
    assert ex.tasks.tolist() == np.repeat(tasks, 3).tolist()
    predictor = Predictor(tasked)
    predictor.set_image(scene.image)
    for j in range(len(masks)):  # each mask's centre click, asked with its task
        row = 3 * j
        pt = np.array([centre_point(masks[j])], np.float32)
        out, scores, _ = predictor.predict(pt, np.array([1]), multimask_output=True, task=int(tasks[j]))
        np.testing.assert_allclose(ex.preds[row, 1:], scores, atol=1e-5)
        np.testing.assert_allclose(ex.trues[row, 1:], [mask_iou(m, masks[j]) for m in out], atol=1e-5)
    # the inside clicks fall inside their masks and are asked with the task too: the same head output as asking
    # the predictor there, and a different one with another task
    draws = np.random.default_rng(0)  # the draws collect_task_examples makes with seed 0, mask after mask
    for j, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        pick = draws.integers(0, len(xs), 2)
        if j == 1:
            pt = np.array([[xs[pick[0]] + 0.5, ys[pick[0]] + 0.5]], np.float32)
            _, scores, _ = predictor.predict(pt, np.array([1]), multimask_output=True, task=int(tasks[j]))
            np.testing.assert_allclose(ex.preds[3 * j + 1, 1:], scores, atol=1e-5)
            _, other, _ = predictor.predict(pt, np.array([1]), multimask_output=True, task=(int(tasks[j]) + 1) % 4)
            assert not np.allclose(other, scores, atol=1e-4)
    assert ex.trues.min() >= 0 and ex.trues.max() <= 1 and ex.trues[ex.kinds == 1, 1:].max(1).mean() > 0.2


def test_plain_scenes_on_a_task_model_are_asked_as_the_generator_asks(tasked):
    from samantic.pipeline.predictor import Predictor
    from samantic.train.data.shapes import render_scene

    ex = collect_iou_examples(tasked, [600], uniform_points=1, task="part", progress=False)
    assert ex.tasks.tolist() == [3] * len(ex)
    scene = render_scene(600)
    predictor = Predictor(tasked)
    predictor.set_image(scene.image)
    from samantic.train.metrics import centre_point

    pt = np.array([centre_point(scene.masks[0])], np.float32)
    _, part, _ = predictor.predict(pt, np.array([1]), multimask_output=True, task="part")
    np.testing.assert_allclose(ex.preds[1, 1:], part, atol=1e-5)
    default = collect_iou_examples(tasked, [600], uniform_points=1, progress=False)
    assert default.tasks.tolist() == [0] * len(default) and not np.allclose(default.preds, ex.preds, atol=1e-4)


def test_task_average_weighs_each_task_alike():
    n = 5
    trues = np.zeros((n, 4), np.float32)
    trues[:, 1] = [1.0, 1.0, 1.0, 1.0, 0.0]  # output 1 right except for the last prompt
    trues[:, 2] = [0.0, 0.0, 0.0, 0.0, 0.5]
    ex = IouExamples(feats=np.zeros((n, 2), np.float32), preds=np.zeros((n, 4), np.float32), trues=trues,
                     kinds=np.array([1, 1, 1, 2, 1], np.int8), tasks=np.array([0, 0, 0, 0, 3], np.int8))
    pred = np.zeros((n, 4))
    pred[:, 1] = 1.0  # always picks output 1
    q = iou_head_quality(pred, ex)
    # centres: task 0 three prompts at 1.0, task 3 one at 0.0 (the inside click, kind 2, is not a centre)
    assert q["centre_picked"] == pytest.approx(0.75) and q["task_picked"] == pytest.approx(0.5)
    assert q["task_oracle"] == pytest.approx(0.75) and np.isnan(q["corr_uniform"])


def test_cli_refits_caches_and_says_how_to_calibrate(tmp_path):
    out, cache = tmp_path / "refit.safetensors", tmp_path / "cache"
    args = ["train", "iou-head", "--out", str(out), "--scenes", "2", "--first-seed", "46000000", "--val-seeds",
            "600:602", "--points", "4", "--epochs", "2", "--cache", str(cache), "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert out.exists() and "saved:" in r.output and f"--checkpoint {out} --record" in r.output
    assert "| plain scenes | 1 point at centres: true IoU of the output it picks |" in r.output
    assert len(list(cache.glob("*.npz"))) == 2
    with safe_open(str(out), framework="pt") as f:
        rec = json.loads(f.metadata()["iou_head_refit"])
    assert rec["train_seeds"] == "46000000:46000002" and rec["val_seeds"] == "600:602"
    r2 = CliRunner().invoke(app, args)
    assert r2.exit_code == 0 and r2.output.count("(cached)") == 2, r2.output
    bad = CliRunner().invoke(app, ["train", "iou-head", "--out", str(tmp_path / "y.safetensors"), "--first-seed", "3"])
    assert bad.exit_code == 1 and "error:" in bad.output and "held-out seeds" in bad.output


def test_cli_refits_a_sum_model_on_its_tasks_and_plain_replay(tmp_path):
    from samantic.models.loading import resolve_checkpoint
    from samantic.models.registry import get_model_entry

    out = tmp_path / "sum_refit.safetensors"
    args = ["train", "iou-head", "--model", "sam_nano_sum", "--kind", "tasks", "--out", str(out), "--scenes", "1",
            "--val-seeds", "600:601", "--clicks", "1", "--replay", "1", "--points", "2", "--epochs", "2",
            "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "averaged per task first" in r.output and "--task part" in r.output
    assert "| plain scenes, asked 'unspecified' | correlation with the true IoU, uniform points" in r.output
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    rec = json.loads(meta["iou_head_refit"])
    assert rec["scenes"] == "tasks" and rec["train_seeds"] == "3000000:3000001" and rec["replay"] == "46000000:46000001"
    assert rec["clicks"] == 1 and "thresholds" not in meta
    src = read_state_dict(resolve_checkpoint(get_model_entry("sam_nano_sum").default_weights))
    new = read_state_dict(out)
    changed = {k for k in src if not torch.equal(src[k], new[k])}
    assert changed and all(k.startswith(HEAD_PREFIX) for k in changed)  # the task table and every mask kept
