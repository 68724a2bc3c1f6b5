"""Tuning a SAM-CP head's inference options on validation scenes (samantic.train.samcp_tune,
``samantic samcp tune``) and the predictor, Segmenter and bundles taking them as defaults."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from samantic.heads.samcp import SamcpHead, SamcpInfo, load_samcp, save_samcp
from samantic.pipeline.panoptic import INFERENCE_DEFAULTS, SamcpPredictor
from samantic.train.data.panoptic import STUFF_CLASSES, THING_CLASSES
from samantic.train.samcp_tune import MemoScorer, score_of, tune_samcp, write_inference

PATCHES = {"points_per_side": 6, "pred_iou_thresh": 0.3, "stability_score_thresh": 0.5}
SMALL = dict(d_model=32, heads=2, layers=1, encoder_layers=1, ffn_dim=64, roi_channels=8,
             backbone_channels=(8, 16, 16, 32), input_size=128)


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    torch.manual_seed(0)
    info = SamcpInfo(classes=THING_CLASSES, stuff=STUFF_CLASSES, model="sam_nano",
                     extra={"patches": json.dumps(PATCHES)}, **SMALL)
    head = SamcpHead(info).eval()
    with torch.no_grad():  # zero-initialised last layers would score every patch alike
        for aff in head.affinity:
            aff.head_mlp[-1].weight.normal_(0, 2.0)
        head.logit_scale.fill_(np.log(30.0))
        head.presence.weight.normal_(0, 1.0)
    return save_samcp(head, tmp_path_factory.mktemp("tune") / "samcp.safetensors")


@pytest.fixture(scope="module")
def nano():
    from samantic.models import create_model

    return create_model("sam_nano")


class _Counting:
    names, things, model = ("a", "b"), 1, ""

    def __init__(self):
        self.calls = 0

    def scores(self, image, rles, boxes):
        self.calls += 1
        return np.zeros((2 + len(boxes), len(boxes))), np.zeros((len(boxes), 2)), np.zeros(2)


def test_memo_scorer_runs_the_head_once_per_scene():
    inner = _Counting()
    memo = MemoScorer(inner)
    a = np.zeros((4, 5, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    for _ in range(3):
        memo.scores(a, [], np.zeros((0, 4)))
        memo.scores(b, [], np.zeros((0, 4)))
    assert inner.calls == 2


def test_tune_scores_every_combination_and_records_the_best(nano, head_file, tmp_path):
    head = load_samcp(head_file)
    grid = {"score_thresh": (0.05, 0.9), "affinity_thresh": (0.5,)}
    res = tune_samcp(head, nano, [100, 101], tmp_path / "cache", grid=grid, metric="mean", progress=False)
    assert len(res.rows) == 2 and {r["score_thresh"] for r in res.rows} == {0.05, 0.9}
    best = max(res.rows, key=lambda r: score_of(r, "mean"))
    assert res.best == {k: best[k] for k in INFERENCE_DEFAULTS}
    for r in res.rows:
        assert all(0.0 <= r[m] <= 1.0 for m in ("pq", "miou", "ap50") if r[m] == r[m])
    written = write_inference(head_file, {**res.best, "score_thresh": 0.123}, out=tmp_path / "tuned.safetensors",
                              note={"seeds": "100:102"})
    pred = SamcpPredictor(load_samcp(written))
    assert pred.score_thresh == 0.123 and pred.options["affinity_thresh"] == res.best["affinity_thresh"]
    assert SamcpPredictor(load_samcp(written), score_thresh=0.4).score_thresh == 0.4  # arguments win
    assert SamcpPredictor(load_samcp(head_file)).score_thresh == INFERENCE_DEFAULTS["score_thresh"]
    # the tensors are unchanged
    a, b = load_samcp(head_file).state_dict(), load_samcp(written).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="unknown inference options"):
        write_inference(head_file, {"score": 0.1}, out=tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="metric"):
        tune_samcp(head, nano, [100], tmp_path / "cache", metric="f1")


def test_bundles_carry_the_tuned_options(nano, head_file, tmp_path):
    from samantic.export.bundle import export_bundle
    from samantic.runtime import Bundle, Segmenter

    tuned = write_inference(head_file, {"score_thresh": 0.07, "nms_thresh": 0.6, "flip": True},
                            out=tmp_path / "t.safetensors")
    bundle = export_bundle(nano, tmp_path / "b", samcp=tuned, int8=False)
    assert Bundle.load(bundle).samcp["inference"] == {"score_thresh": 0.07, "nms_thresh": 0.6, "flip": True}
    seg = Segmenter.from_bundle(bundle, backend="onnxruntime")
    assert seg.samcp.score_thresh == 0.07 and seg.samcp.nms_thresh == 0.6 and seg.samcp.flip is True
    # the mirrored pass runs on onnxruntime as on torch
    image, rles, boxes = _scene_with_patches()
    got = seg.samcp.scores(image, rles, boxes)
    want = SamcpPredictor(load_samcp(tuned)).scores(image, rles, boxes)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-3)
    assert Segmenter.from_bundle(bundle, backend="onnxruntime", score_thresh=0.5).samcp.score_thresh == 0.5


def _scene_with_patches():
    """A v2 scene and a few made-up patches (boxes XYXY inclusive, from the masks)."""
    from samantic.ops import rle_encode
    from samantic.train.data.panoptic import render_panoptic

    scene = render_panoptic(7, size=(96, 128))
    ids = np.unique(scene.panoptic)
    masks = np.stack([scene.panoptic == i for i in ids[:6]])
    masks[0, 10:30, 5:50] = True  # not symmetric, not a segment
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    return scene.image, rle_encode(masks), np.array(boxes, np.float32)


def test_flip_averages_the_image_and_its_mirror(head_file):
    from samantic.ops import rle_decode
    from samantic.pipeline.panoptic import flip_patches

    image, rles, boxes = _scene_with_patches()
    masks = rle_decode(rles)
    fr, fb = flip_patches(rles, boxes)
    np.testing.assert_array_equal(rle_decode(fr), masks[:, :, ::-1])
    for m, b in zip(rle_decode(fr), fb):
        ys, xs = np.nonzero(m)
        assert b.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
    back_r, back_b = flip_patches(fr, fb)
    np.testing.assert_array_equal(rle_decode(back_r), masks)
    np.testing.assert_array_equal(back_b, boxes)

    head = load_samcp(head_file)
    plain, flip = SamcpPredictor(head), SamcpPredictor(head, flip=True)
    assert plain.flip is False and flip.flip is True
    mirror = np.ascontiguousarray(image[:, ::-1])
    one, other = plain.scores(image, rles, boxes), plain.scores(mirror, fr, fb)
    both = flip.scores(image, rles, boxes)
    for a, b, m in zip(one, other, both):
        np.testing.assert_allclose(m, (a + b) / 2, atol=1e-5)
    assert max(np.abs(a - b).max() for a, b in zip(one, other)) > 1e-3  # the head is not mirror-invariant ...
    for a, b in zip(both, flip.scores(mirror, fr, fb)):  # ... its flip-averaged scores are
        np.testing.assert_allclose(a, b, atol=1e-5)
    out = flip(image, rles, boxes)
    assert out.panoptic.shape == image.shape[:2]
    empty = flip.scores(image, [], np.zeros((0, 4), np.float32))
    assert empty[1].shape[0] == 0
    with pytest.raises(ValueError, match="flip"):
        SamcpPredictor(head, flip="yes")


def test_tune_cli_writes_the_head_and_a_report(head_file, tmp_path):
    exe = str(Path(sys.executable).with_name("samantic"))
    out = tmp_path / "tuned.safetensors"
    proc = subprocess.run([exe, "samcp", "tune", str(head_file), "--seeds", "100:101", "--score-thresh", "0.1,0.5",
                           "--affinity-thresh", "0.5", "--overlap-thresh", "0.5", "--cache", str(tmp_path / "cache"),
                           "--out", str(out), "--report", str(tmp_path / "rep"), "--try-flip", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((tmp_path / "rep" / "samcp_tune.json").read_text())
    assert len(rep["rows"]) == 4 and "samantic samcp tune" in rep["command"] and "--try-flip" in rep["command"]
    # the recorded command reproduces the sweep: its grid and where it read and wrote
    assert "--score-thresh 0.1,0.5 --affinity-thresh 0.5 --overlap-thresh 0.5" in rep["command"]
    assert f"--cache {tmp_path / 'cache'}" in rep["command"] and f"--out {out}" in rep["command"]
    assert {r["flip"] for r in rep["rows"]} == {False, True}
    md = (tmp_path / "rep" / "samcp_tune.md").read_text()
    assert "| flip |" in md and "| on |" in md and "| off |" in md
    assert SamcpPredictor(load_samcp(out)).flip == rep["best"]["flip"]
    assert SamcpPredictor(load_samcp(out)).score_thresh == rep["best"]["score_thresh"]
    bad = subprocess.run([exe, "samcp", "tune", str(head_file), "--seeds", "5:2"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "START:STOP" in bad.stderr
    bad = subprocess.run([exe, "samcp", "tune", str(head_file), "--score-thresh", "0.2,x"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "comma-separated" in bad.stderr


def test_grid_edges_note_a_best_value_at_the_end_of_three_or_more():
    from samantic.train.samcp_tune import grid_edges

    grid = {"score_thresh": (0.15, 0.25, 0.5), "affinity_thresh": (0.3, 0.5, 0.7), "overlap_thresh": (0.3, 0.5),
            "flip": (False, True)}
    notes = grid_edges({"score_thresh": 0.5, "affinity_thresh": 0.3, "overlap_thresh": 0.5, "flip": True}, grid)
    assert len(notes) == 2  # two values tried (overlap) and booleans (flip) say nothing
    assert "score_thresh 0.5 is the largest" in notes[0] and "larger" in notes[0]
    assert "affinity_thresh 0.3 is the smallest" in notes[1] and "smaller" in notes[1]
    assert grid_edges({"score_thresh": 0.25, "affinity_thresh": 0.5}, grid) == []


def test_tune_and_eval_default_to_the_sam_the_head_was_trained_on(tmp_path):
    """Without --model, `samcp tune` and `eval samcp` use the head's recorded SAM; naming another is refused."""
    head = SamcpHead(SamcpInfo(classes=("circle", "star"), stuff=("wall",), d_model=32, layers=1, encoder_layers=1,
                               ffn_dim=32, model="sam_nano_panoptic",
                               extra={"patches": json.dumps({"points_per_side": 4})}))
    path = save_samcp(head, tmp_path / "h.safetensors")
    exe = str(Path(sys.executable).with_name("samantic"))
    common = ["--cache", str(tmp_path / "cache"), "--no-progress"]
    ev = subprocess.run([exe, "eval", "samcp", "--samcp", str(path), "--seeds", "0:1", "--v1-seeds", "",
                         "--out", str(tmp_path / "ev"), *common], capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stdout + ev.stderr
    assert json.loads((tmp_path / "ev" / "eval_samcp.json").read_text())["model"] == "sam_nano_panoptic"
    tu = subprocess.run([exe, "samcp", "tune", str(path), "--seeds", "100:101", "--score-thresh", "0.5",
                         "--affinity-thresh", "0.5", "--overlap-thresh", "0.5", "--out", str(tmp_path / "t.safetensors"),
                         "--report", str(tmp_path / "rep"), *common], capture_output=True, text=True, timeout=600)
    assert tu.returncode == 0, tu.stdout + tu.stderr
    assert "--model sam_nano_panoptic" in json.loads((tmp_path / "rep" / "samcp_tune.json").read_text())["command"]
    assert json.loads(load_samcp(tmp_path / "t.safetensors").info.extra["inference_tuning"])["model"] == "sam_nano_panoptic"
    for cmd in (["eval", "samcp", "--samcp", str(path), "--seeds", "0:1", "--v1-seeds", ""], ["samcp", "tune", str(path)]):
        bad = subprocess.run([exe, *cmd, "--model", "sam_nano", *common], capture_output=True, text=True, timeout=300)
        assert bad.returncode != 0 and "trained on patches of sam_nano_panoptic, not sam_nano" in bad.stderr
