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
