"""benchmarks/sum_uncertainty.py: the refiner's learning rate and seed reach the run and its report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sum_uncertainty  # noqa: E402


def test_lr_and_seed_reach_the_refiner_and_the_report(tmp_path):
    out = tmp_path / "report"
    rc = sum_uncertainty.main(["--labelled", "2", "--pool", "0", "--heldout", "1", "--refiner-steps", "2",
                               "--lr", "0.0007", "--seed", "3", "--cache-dir", str(tmp_path / "cache"),
                               "--refiner-out", str(tmp_path / "refiner.safetensors"), "--out", str(out),
                               "--threads", "1", "--no-progress"])
    assert rc == 0
    result = json.loads((out / "sum_uncertainty.json").read_text())
    assert result["config"]["lr"] == 0.0007 and result["config"]["seed"] == 3
    assert result["refiner"]["steps"] == 2
    assert (tmp_path / "refiner.safetensors").is_file()
    md = (out / "sum_uncertainty.md").read_text()
    assert "(batch 8, lr 0.0007, seed 3)" in md
    assert "--lr 0.0007" in md
