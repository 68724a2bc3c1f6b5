"""benchmarks/point_gap.py: one click's IoU (picked and best of three) grouped by object size and class."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import point_gap  # noqa: E402


def test_summarise_groups_by_size_and_class():
    rows = [{"cls": "ring", "area": 0.001, "top": 0.2, "best": 0.6},
            {"cls": "ring", "area": 0.005, "top": 0.8, "best": 0.8},
            {"cls": "star", "area": 0.05, "top": 0.9, "best": 1.0}]
    s = point_gap.summarise(rows)
    assert s["all"]["objects"] == 3
    assert s["all"]["top"] == pytest.approx(1.9 / 3) and s["all"]["best_of_three"] == pytest.approx(0.8)
    assert [g["objects"] for g in s["by_size"].values()] == [1, 1, 1]
    assert s["by_size"]["under 0.25%"]["top"] == pytest.approx(0.2)
    assert s["by_class"]["ring"] == {"objects": 2, "top": pytest.approx(0.5), "best_of_three": pytest.approx(0.7)}
    assert math.isnan(point_gap.summarise([])["all"]["top"])


def test_measure_on_a_held_out_scene():
    import torch

    from samantic.models import create_model
    from samantic.train.data.shapes import render_scene

    model = create_model("sam_nano").eval()
    with torch.no_grad():
        rows = point_gap.measure(model, [3])
    assert len(rows) == len(render_scene(3).masks)
    for r in rows:
        assert 0.0 <= r["top"] <= r["best"] <= 1.0  # the picked output is one of the three
        assert 0.0 < r["area"] < 1.0 and r["seed"] == 3
