"""benchmarks/sum_task_ceiling.py: the part task split into composites' parts and simple things."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sum_task_ceiling  # noqa: E402


def test_the_part_rows_split_the_part_task_by_the_scene_s_own_parts():
    from samantic.models import TASKS
    from samantic.train.data.panoptic import render_panoptic
    from samantic.train.sum import scene_task_masks

    seen_composite = seen_simple = 0
    for seed in range(6):
        scene = render_panoptic(seed)
        masks, tasks = scene_task_masks(scene)
        rows = dict(sum_task_ceiling.rows(masks, tasks))
        assert list(rows)[: len(TASKS)] == list(TASKS)
        composite, simple = rows[sum_task_ceiling.COMPOSITE], rows[sum_task_ceiling.SIMPLE]
        part = rows["part"]
        # a partition of the part task
        assert not np.any(composite & simple) and np.array_equal(composite | simple, part)
        # composites' parts are the scene's part masks; simple things are the things without parts
        with_parts = set(scene.part_of.tolist())
        assert composite.sum() == len(scene.part_masks)
        assert simple.sum() == len(scene.masks) - len(with_parts)
        for m in masks[composite]:
            assert any(np.array_equal(m, p) for p in scene.part_masks)
            assert not any(np.array_equal(m, t) for t in scene.masks)
        seen_composite += int(composite.sum())
        seen_simple += int(simple.sum())
    assert seen_composite > 0 and seen_simple > 0


def test_training_seeds_are_refused_unless_asked_and_then_labelled_as_a_fit(tmp_path):
    with pytest.raises(SystemExit, match="reaches the training seeds"):
        sum_task_ceiling.main(["--column", "base=sam_nano", "--seeds", "2999999:3000001", "--out", str(tmp_path / "a")])
    assert not (tmp_path / "a.md").exists()
    sum_task_ceiling.main(["--column", "base=sam_nano", "--seeds", "3000000:3000001", "--training-seeds",
                           "--threads", "1", "--out", str(tmp_path / "b")])
    text = (tmp_path / "b.md").read_text()
    assert "--training-seeds" in text and "TRAINING-RANGE (fit, not held-out accuracy)" in text
    assert "Held-out" not in text


def test_one_click_scores_the_three_outputs_as_the_predictor_thresholds_them_and_their_mean():
    import torch
    from samantic.cli.eval import load_column
    from samantic.pipeline.predictor import Predictor
    from samantic.train.data.panoptic import render_panoptic
    from samantic.train.metrics import mask_iou
    from samantic.train.sum import scene_task_masks

    scene = render_panoptic(0)
    masks, tasks = scene_task_masks(scene)
    masks, tasks = masks[:4], tasks[:4]
    model = load_column("base=sam_nano")[2].eval()
    pr = Predictor(model)
    pr.set_image(scene.image)
    with torch.no_grad():
        iou, score, mean_iou = sum_task_ceiling.one_click(pr, scene.image, masks, np.zeros(len(masks), np.int64))
        # the same clicks through the predictor's own thresholding (return_logits=False)
        c = sum_task_ceiling.prompt_coords(pr, np.array([[sum_task_ceiling.centre_point(m)] for m in masks],
                                                        np.float64), scene.image.shape[:2])
        pred, scores, _ = pr.predict_torch(c, torch.ones(len(masks), 1, dtype=torch.int), multimask_output=True)
    assert np.allclose(score, scores.numpy())
    assert np.allclose(iou, [[mask_iou(p, g) for p in ps] for ps, g in zip(pred.numpy(), masks)])
    assert iou.shape == (4, 3) and mean_iou.shape == (4,)
    # three outputs made one (every output's token and hypernetwork copied from the first): the mean is that mask
    dec = model.mask_decoder
    with torch.no_grad():
        for k in (2, 3):
            dec.mask_tokens.weight[k] = dec.mask_tokens.weight[1]
            dec.output_hypernetworks_mlps[k].load_state_dict(dec.output_hypernetworks_mlps[1].state_dict())
        iou2, _, mean2 = sum_task_ceiling.one_click(pr, scene.image, masks, np.zeros(len(masks), np.int64))
    assert np.allclose(iou2, iou2[:, :1]) and np.allclose(mean2, iou2[:, 0])
    assert not np.allclose(iou, iou[:, :1])  # the trained model's three outputs differ
