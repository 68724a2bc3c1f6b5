"""samantic results as supervision.Detections (samantic.io.supervision.to_supervision), with the real
supervision package: boxes checked against supervision's own mask_to_xyxy, classes against the results."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import supervision as sv
import torch

from samantic.io.supervision import to_supervision
from samantic.ops import rle_decode
from samantic.pipeline.generator import MaskSet
from samantic.runtime import PanopticResult, Result, Segmenter

from conftest import disk_image

SIZE = (96, 128)


@pytest.fixture(scope="module")
def nano():
    from samantic.models import create_model

    return create_model("sam_nano")


@pytest.fixture(scope="module")
def result(nano):
    """A Segmenter result with a (random) U-SAM head: named masks."""
    from samantic.heads.usam import HeadInfo, UsamHead

    torch.manual_seed(1)
    head = UsamHead(HeadInfo(classes=("circle", "star", "ring"), token_dim=128, score_thresh=0.0,
                             model="sam_nano")).eval()
    image = disk_image(101, size=(120, 160))
    res = Segmenter(nano, head, points_per_side=6, pred_iou_thresh=0.5, stability_score_thresh=0.6)(image)
    assert len(res) >= 2 and len(set(res.masks.fields["category_id"].tolist())) >= 1
    return res, image


@pytest.fixture(scope="module")
def panoptic(nano):
    """A PanopticResult over sam_nano's patches of a v2 scene, fused from given SAM-CP scores (each patch
    its own instance of class ``patch % things``, the largest patch a stuff region): several things and stuff."""
    from samantic.heads.samcp import SamcpHead, SamcpInfo
    from samantic.pipeline.panoptic import SamcpPredictor
    from samantic.train.data.panoptic import STUFF_CLASSES, THING_CLASSES, render_panoptic

    class FixedScores(SamcpPredictor):
        def scores(self, image, patch_rles, patch_boxes):
            p, c, t = len(patch_boxes), len(self.names), self.things
            aff = np.full((c + p, p), 0.01)
            aff[c + np.arange(p), np.arange(p)] = 0.9
            cls = np.full((p, c), 0.01)
            cls[np.arange(p), np.arange(p) % t] = 0.8
            presence = np.full(c, 0.01)
            presence[t] = 0.9
            boxes = np.asarray(patch_boxes)
            aff[t, np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))] = 0.9
            return aff, cls, presence

    head = SamcpHead(SamcpInfo(classes=THING_CLASSES, stuff=STUFF_CLASSES, d_model=32, heads=2, layers=1,
                               encoder_layers=1, ffn_dim=64, roi_channels=8, backbone_channels=(8, 16, 16, 32)))
    image = render_panoptic(11, size=SIZE).image
    patches = Segmenter(nano, points_per_side=8, pred_iou_thresh=0.3, stability_score_thresh=0.5)(image).masks
    out = FixedScores(head, score_thresh=0.0, min_area=0)(image, patches.rles, patches.boxes)
    res = PanopticResult(patches, out, image)
    kinds = {s["isthing"] for s in res.instances}
    assert len(res) >= 3 and kinds == {True, False}, res.instances
    return res


def test_result_with_a_head(result):
    res, image = result
    det = to_supervision(res)
    assert isinstance(det, sv.Detections) and len(det) == len(res)
    masks = rle_decode(res.masks.rles).astype(bool)
    assert det.mask.dtype == bool and det.mask.shape == (len(res), *image.shape[:2])
    assert np.array_equal(det.mask, masks)
    # boxes: supervision's own conversion of the same masks, both conventions; samantic's boxes are inclusive
    assert det.xyxy.dtype == np.float32 and np.array_equal(det.xyxy, sv.mask_to_xyxy(masks))
    assert np.array_equal(det.xyxy, res.masks.boxes)
    exclusive = to_supervision(res, coordinate_convention="exclusive")
    assert np.array_equal(exclusive.xyxy, sv.mask_to_xyxy(masks, coordinate_convention="exclusive"))
    # classes 0-based into names; names and scores per record
    assert det.class_id.tolist() == [r["category_id"] - 1 for r in res.instances]
    assert det.data["class_name"].tolist() == [r["category"] for r in res.instances]
    assert [res.names[k] for k in det.class_id] == det.data["class_name"].tolist()
    assert np.allclose(det.confidence, res.masks.fields["class_score"])
    assert np.allclose(det.data["predicted_iou"], res.masks.iou_preds)
    # supervision can use it as it is
    assert sv.MaskAnnotator().annotate(image.copy(), det).shape == image.shape
    first = det[det.class_id == det.class_id[0]]
    assert set(first.data["class_name"].tolist()) == {det.data["class_name"][0]}


def test_result_without_a_head_has_no_classes(nano):
    res = Segmenter(nano, points_per_side=4)(disk_image(102, size=(96, 128)))
    det = to_supervision(res)
    assert len(det) == len(res) and det.class_id is None and "class_name" not in det.data
    assert np.allclose(det.confidence, res.masks.iou_preds)


def test_panoptic_result(panoptic):
    res = panoptic
    det = to_supervision(res)
    assert len(det) == len(res.segments_info) == len(res.instances)
    assert det.mask.shape == (len(res), *SIZE) and det.mask.sum(0).max() <= 1  # segments do not overlap
    for i, s in enumerate(res.instances):
        assert np.array_equal(det.mask[i], res.panoptic_map == s["id"])
        assert det.data["segment_id"][i] == s["id"] and det.data["isthing"][i] == s["isthing"]
        assert det.class_id[i] == s["category_id"] - 1 and det.data["class_name"][i] == s["category"]
        assert res.names[det.class_id[i]] == s["category"]
        assert det.confidence[i] == pytest.approx(s["score"])
        x, y, w, h = s["bbox"]  # COCO XYWH of the segment's pixels
        assert det.xyxy[i].tolist() == [x, y, x + w - 1, y + h - 1]
    assert np.array_equal(det.xyxy, sv.mask_to_xyxy(det.mask))
    assert set(det.data["isthing"].tolist()) <= {True, False}


def test_empty_results():
    empty = Result(MaskSet.empty((7, 9), ("category_id", "class_score")), [], ("circle",))
    det = to_supervision(empty)
    assert len(det) == 0 and det.mask.shape == (0, 7, 9) and det.xyxy.shape == (0, 4)
    assert det.class_id.shape == (0,) and det.data["class_name"].shape == (0,)


def test_clear_errors(result, monkeypatch):
    res, _ = result
    with pytest.raises(ValueError, match="coordinate_convention must be one of"):
        to_supervision(res, coordinate_convention="center")
    monkeypatch.setitem(sys.modules, "supervision", None)
    with pytest.raises(ImportError, match="pip install supervision"):
        to_supervision(res)


def test_result_methods_give_the_same_detections(result, panoptic):
    for res in (result[0], panoptic):
        a, b = res.to_supervision(), to_supervision(res)
        assert len(a) == len(b) > 0
        assert (a.xyxy == b.xyxy).all() and (a.mask == b.mask).all() and (a.class_id == b.class_id).all()


def test_result_overlay_and_semantic_map_decode_one_mask_at_a_time_and_match_the_stacked_ones(result):
    """The overlay and the semantic map, drawn one decoded mask at a time, are those of all masks stacked."""
    from samantic.io import overlay_masks

    result, image = result
    stacked = rle_decode(result.masks.rles).astype(bool)
    labels = [result.names[int(c) - 1] for c in result.masks.fields["category_id"]]
    assert np.array_equal(result.overlay(), overlay_masks(image, stacked, labels))
    expected = np.zeros(result.image_size, np.uint8)
    for i in np.argsort(result.masks.fields["class_score"], kind="stable"):
        expected[stacked[i]] = result.masks.fields["category_id"][i]
    assert np.array_equal(result.semantic_map, expected)
    with pytest.raises(ValueError, match="the masks"):
        result.overlay(image[:10])


def test_a_result_keeps_its_own_frame_and_its_own_timings(nano):
    frame = disk_image(103, size=SIZE)
    seg = Segmenter(nano, points_per_side=4)
    res = seg(frame)
    before = res.overlay()
    frame[:] = 0  # the caller reuses its buffer for the next frame
    assert np.array_equal(res.overlay(), before)
    assert res.timings["encoder"] > 0 and res.timings == seg.timings and res.stats == seg.stats
    other = seg(disk_image(104, size=SIZE))
    assert other.timings is not res.timings and res.timings["encoder"] > 0
