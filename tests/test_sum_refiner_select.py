"""benchmarks/sum_refiner_select.py: refiners scored on labelled scenes beside their held-out reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sum_refiner_select  # noqa: E402


def test_refiners_are_scored_on_labelled_scenes_and_ranked_against_their_reports(tmp_path):
    from samantic.train.sum_refine import MaskRefiner, RefinerConfig, save_refiner

    specs = []
    for i, heldout in enumerate((0.7, 0.8, 0.9)):
        torch.manual_seed(i)
        refiner = MaskRefiner(RefinerConfig(embed_dim=128)).eval()
        if i:  # the untrained refiner returns SAM's logits; the others change them
            torch.nn.init.normal_(refiner.head.weight, std=0.05 * i)
        path = save_refiner(refiner, tmp_path / f"r{i}.safetensors", {"model": "sam_nano"})
        report = tmp_path / f"report{i}"
        report.mkdir()
        auroc = {"uncertainty": heldout}
        (report / "sum_uncertainty.json").write_text(json.dumps({"evaluation": {"auroc": {"image": auroc,
                                                                                          "near": auroc}}}))
        specs += ["--refiner", f"{path}={report}"]
    out = tmp_path / "out"
    assert sum_refiner_select.main([*specs, "--val-seeds", "3000120:3000122", "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "sum_refiner_select.json").read_text())
    rows = result["rows"]
    assert [r["heldout_auroc"] for r in rows] == [0.7, 0.8, 0.9]
    assert all(0 <= r["val_auroc"] <= 1 and r["val_loss"] > 0 for r in rows)
    assert len({round(r["val_loss"], 6) for r in rows}) == 3  # three different refiners, three scores
    assert set(result["spearman"]) == {"val_auroc", "val_loss"}
    assert all(-1 <= v <= 1 for v in result["spearman"].values())
    md = (out / "sum_refiner_select.md").read_text()
    assert "3000120:3000122" in md and md.count("| ") >= 3 * 4


def test_validation_scenes_must_be_labelled_scenes(tmp_path):
    with pytest.raises(SystemExit, match="labelled scenes"):
        sum_refiner_select.main(["--refiner", str(tmp_path / "r.safetensors"), "--val-seeds", "0:3"])
    with pytest.raises(SystemExit, match="--val-seeds"):
        sum_refiner_select.main(["--refiner", str(tmp_path / "r.safetensors"), "--val-seeds", "3000120"])
