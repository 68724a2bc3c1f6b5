"""benchmarks/nano_by_size.py: single-point IoU by object size, consistent with `samantic eval sam`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import nano_by_size  # noqa: E402

SEEDS = range(0, 3)


def test_per_object_matches_eval_sam_and_the_bins_cover_every_object(tmp_path):
    from samantic.models import create_model
    from samantic.train.metrics import evaluate_sam

    rows = nano_by_size.per_object("sam_nano", "pkg:assets/sam_nano.safetensors", SEEDS)
    ref = evaluate_sam(create_model("sam_nano"), SEEDS, [], progress=False)
    assert len(rows) == ref.n_instances > 0
    assert np.all((rows[:, 0] > 0) & (rows[:, 0] < 1)) and np.all(rows[:, 2] >= rows[:, 1] - 1e-12)
    # the same prompts and the same choice of mask as the evaluation the model card reports
    assert rows[:, 1].mean() == pytest.approx(ref.metrics["miou_1pt_top"], abs=1e-9)
    assert rows[:, 2].mean() == pytest.approx(ref.metrics["miou_1pt_oracle"], abs=1e-9)
    counts = [((rows[:, 0] >= lo) & (rows[:, 0] < hi)).sum() for lo, hi in zip(nano_by_size.BINS[:-1], nano_by_size.BINS[1:])]
    assert sum(counts) == len(rows)


def test_cli_writes_the_report_and_rejects_a_malformed_column(tmp_path):
    script = str(ROOT / "benchmarks" / "nano_by_size.py")
    r = subprocess.run([sys.executable, script, "--column", "v=pkg:assets/sam_nano.safetensors", "--seeds", "0:1",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "by_size.json").read_text())
    total = next(row for row in report["rows"] if row["area"] == "all")
    assert total["n"] == sum(row["n"] for row in report["rows"] if row["area"] != "all") > 0
    assert "| all |" in (tmp_path / "by_size.md").read_text()
    bad = subprocess.run([sys.executable, script, "--column", "no-weights", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "expected NAME=WEIGHTS" in bad.stderr
