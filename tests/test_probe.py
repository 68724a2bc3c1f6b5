"""The supervised feature probe: ground-truth labelling of low-res masks, the features, the fit, the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from samantic.cli.main import app
from samantic.train.probe import (SHAPE_SIDE, ProbeData, label_masks, mask_features, parse_feature_sets,
                                  run_probe)


def test_feature_set_parsing():
    assert parse_feature_sets("token,shape,token+pooled") == [("token",), ("shape",), ("token", "pooled")]
    with pytest.raises(ValueError, match="colour"):
        parse_feature_sets("token,colour")
    with pytest.raises(ValueError, match="token, pooled, shape"):
        parse_feature_sets("token,,shape")


def test_label_masks_matches_ground_truth_in_the_low_res_frame():
    # a 300 x 200 image resized to a 64 frame is 64 x 43 (long side 64), low-res 16 frame: 16 x 11
    h, w, img_size, side = 300, 200, 64, 16
    gt = np.zeros((2, h, w), bool)
    gt[0, 0:150, 0:100] = True  # top-left quarter
    gt[1, 150:300, 100:200] = True  # bottom-right quarter
    resized = (64, 43)
    low = np.full((4, side, side), -10.0, np.float32)
    for i, m in enumerate(gt):
        small = cv2.resize(m.astype(np.uint8), (11, 16), interpolation=cv2.INTER_NEAREST) > 0
        low[i, :16, :11][small] = 10.0
    low[2, :16, :11] = 10.0  # the whole image: IoU about 0.25 with each instance, so "none"
    labels, best = label_masks(low, gt, np.array([3, 5]), resized, img_size, none=7)
    assert labels.tolist() == [3, 5, 7, 7]  # the empty mask (index 3) matches nothing
    assert best[0] > 0.9 and best[1] > 0.9 and best[2] < 0.5 and best[3] == 0.0


def test_mask_features_pool_the_embedding_and_describe_the_shape_independent_of_position():
    c, e, side = 4, 8, 32
    emb = torch.zeros(1, c, e, e)
    emb[0, 0, :, : e // 2] = 1.0  # channel 0 is 1 on the left half, 0 on the right
    emb[0, 1] = 2.0
    engine = SimpleNamespace(features=emb)
    low = torch.full((3, side, side), -20.0)
    low[0, 4:12, 2:10] = 20.0  # an 8 x 8 square on the left
    low[1, 20:28, 20:28] = 20.0  # the same square on the right
    low[2, 4:8, 2:14] = 20.0  # a 4 x 12 bar
    f = mask_features(engine, low, torch.randn(3, 5))
    assert f["token"].shape == (3, 5) and f["pooled"].shape == (3, c) and f["shape"].shape == (3, SHAPE_SIDE ** 2)
    np.testing.assert_allclose(f["pooled"][0, :2], [1.0, 2.0], atol=1e-3)
    np.testing.assert_allclose(f["pooled"][1, :2], [0.0, 2.0], atol=1e-3)
    np.testing.assert_allclose(f["shape"][0], f["shape"][1], atol=1e-4)
    assert np.abs(f["shape"][0] - f["shape"][2]).max() > 0.5
    assert f["shape"][0].max() > 0.99


def _data(rng, n, informative):
    labels = rng.integers(0, 4, n)  # 3 classes + none (3)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    if informative:
        x[np.arange(n), labels] += 4.0
    return ProbeData({"token": x, "pooled": x[:, :2], "shape": x[:, 2:]}, labels, 1)


def test_probe_finds_class_information_only_where_there_is_some():
    rng = np.random.default_rng(0)
    res = run_probe(_data(rng, 3000, True), _data(rng, 600, True), [("token",)], n_classes=3, epochs=10)
    assert res.rows[0].class_accuracy > 0.9 and res.rows[0].none_accuracy > 0.8
    res = run_probe(_data(rng, 3000, False), _data(rng, 600, False), [("token",)], n_classes=3, epochs=10)
    assert res.rows[0].class_accuracy < res.chance + 0.12
    with pytest.raises(ValueError, match="no grid mask matches"):
        empty = ProbeData({k: np.zeros((5, 2), np.float32) for k in ("token", "pooled", "shape")}, np.full(5, 3), 1)
        run_probe(empty, empty, [("token",)], n_classes=3)


def test_eval_probe_cli_writes_a_table(tmp_path):
    r = CliRunner().invoke(app, ["eval", "probe", "--train-seeds", "500000:500003", "--seeds", "0:2",
                                 "--points-per-side", "4", "--epochs", "2", "--features", "token,shape",
                                 "--out", str(tmp_path), "--no-progress"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "eval_probe.json").read_text())
    assert [row["features"] for row in data["rows"]] == ["token", "shape"]
    assert data["train_masks"] == 3 * 16 * 3 and data["test_masks"] == 2 * 16 * 3
    assert "| shape |" in (tmp_path / "eval_probe.md").read_text()
    r = CliRunner().invoke(app, ["eval", "probe", "--train-seeds", "0:3", "--seeds", "0:2"])
    assert r.exit_code != 0 and "overlap" in r.output
