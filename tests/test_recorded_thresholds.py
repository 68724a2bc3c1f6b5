"""Segment-everything thresholds calibrated for a weights file travel in its header (`eval thresholds --record`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from samantic.batch import SegmentOptions, prepare
from samantic.cli.main import app
from samantic.models import (
    create_model,
    default_thresholds,
    read_metadata,
    read_state_dict,
    record_thresholds,
    recorded_thresholds,
    recommended_thresholds,
    save_checkpoint,
    thresholds_source,
)
from samantic.models.registry import SAM_THRESHOLDS, get_model_entry
from samantic.runtime import Bundle, Segmenter

PART = {"pred_iou_thresh": 0.55, "stability_score_thresh": 0.85}
PLAIN = {"pred_iou_thresh": 0.65, "stability_score_thresh": 0.9}


@pytest.fixture(scope="module")
def nano():
    return create_model("sam_nano")


@pytest.fixture
def weights(nano, tmp_path):
    return save_checkpoint(nano, tmp_path / "mine.safetensors", metadata={"note": "kept"})


def test_recorded_thresholds_are_per_task_and_keep_the_tensors_and_header(nano, weights):
    before = read_state_dict(weights)
    assert recorded_thresholds(weights) == {}
    record_thresholds(weights, PART, "part", source="calibrated on seeds 500:530")
    record_thresholds(weights, PLAIN)  # "unspecified"
    record_thresholds(weights, {"pred_iou_thresh": 0.6, "stability_score_thresh": 0.8}, 3)  # by index: replaces
    assert recorded_thresholds(weights) == {"part": {"pred_iou_thresh": 0.6, "stability_score_thresh": 0.8},
                                            "unspecified": PLAIN}
    after = read_state_dict(weights)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    meta = read_metadata(weights)
    assert meta["note"] == "kept" and meta["model"] == "sam_nano" and "config" in meta
    assert json.loads(meta["thresholds_source"]) == {"part": "calibrated on seeds 500:530"}
    assert not list(weights.parent.glob(".*tmp"))  # the atomic write left nothing behind


def test_bad_thresholds_and_files_are_refused_by_name(weights, tmp_path):
    with pytest.raises(ValueError, match="each in \\[0, 1\\]"):
        record_thresholds(weights, {"pred_iou_thresh": 1.5, "stability_score_thresh": 0.9})
    with pytest.raises(ValueError, match="each in \\[0, 1\\]"):
        record_thresholds(weights, {"pred_iou_thresh": 0.5})
    with pytest.raises(ValueError, match="unknown task 'parts'. Did you mean 'part'"):
        record_thresholds(weights, PART, "parts")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        record_thresholds(tmp_path / "missing.safetensors", PART)
    pth = tmp_path / "w.pth"
    torch.save({}, pth)
    with pytest.raises(ValueError, match="w.pth.*safetensors header"):
        record_thresholds(pth, PART)
    assert recorded_thresholds(pth) == {}
    # a damaged entry is named with its file, not silently ignored
    broken = save_checkpoint(read_state_dict(weights), tmp_path / "broken.safetensors",
                             metadata={"thresholds": json.dumps({"everything": PART})})
    with pytest.raises(ValueError, match="broken.safetensors.*unknown task 'everything'"):
        recorded_thresholds(broken)
    bad = save_checkpoint(read_state_dict(weights), tmp_path / "bad.safetensors", metadata={"thresholds": "{oops"})
    with pytest.raises(ValueError, match="bad.safetensors.*not JSON"):
        create_model("sam_nano", checkpoint=str(bad))


def test_models_built_from_the_file_recommend_its_thresholds_per_task(nano, weights):
    # nothing recorded: segment-anything's, as before
    assert thresholds_source(create_model("sam_nano", checkpoint=str(weights)), "part") == (SAM_THRESHOLDS,
                                                                                            "segment-anything")
    record_thresholds(weights, PART, "part")
    model = create_model("sam_nano", checkpoint=str(weights))
    assert thresholds_source(model, "part") == (PART, "recorded for part")
    assert thresholds_source(model, "salient") == (SAM_THRESHOLDS, "segment-anything")  # no "unspecified" entry
    record_thresholds(weights, PLAIN)
    model = create_model("sam_nano", checkpoint=str(weights))
    assert recommended_thresholds(model) == PLAIN and recommended_thresholds(model, "part") == PART
    assert thresholds_source(model, "entity") == (PLAIN, "recorded")  # a task without its own: the file's plain ones
    assert default_thresholds("sam_nano", str(weights), "part") == (PART, "recorded for part")
    shipped = get_model_entry("sam_nano").thresholds
    assert default_thresholds("sam_nano") == (shipped, "registry")
    assert thresholds_source(nano, "part") == (shipped, "registry")
    with pytest.raises(ValueError, match="unknown task"):
        recommended_thresholds(model, "parts")
    # Segmenter: the task it is built for picks its thresholds; the user's word wins
    assert _thresholds(Segmenter(model, task="part").config) == PART
    assert _thresholds(Segmenter(model).config) == PLAIN
    assert Segmenter(model, task="part", pred_iou_thresh=0.7).config.pred_iou_thresh == 0.7


def _thresholds(config):
    return {"pred_iou_thresh": config.pred_iou_thresh, "stability_score_thresh": config.stability_score_thresh}


def test_segment_uses_the_recorded_thresholds_and_says_when_there_are_none(weights, nano, tmp_path):
    prepared = prepare(SegmentOptions(checkpoint=str(weights), task="part"))
    assert _thresholds(prepared.config) == SAM_THRESHOLDS
    assert any("records no calibrated thresholds" in n and "--record" in n for n in prepared.notes)
    pth = tmp_path / "official_style.pth"  # a .pth (the official checkpoints' format): SAM's own, no note
    torch.save(nano.state_dict(), pth)
    prepared = prepare(SegmentOptions(checkpoint=str(pth)))
    assert _thresholds(prepared.config) == SAM_THRESHOLDS and not prepared.notes
    record_thresholds(weights, PART, "part")
    prepared = prepare(SegmentOptions(checkpoint=str(weights), task="part"))
    assert _thresholds(prepared.config) == PART and not any("calibrated" in n for n in prepared.notes)
    assert prepared.segmenter.config.pred_iou_thresh == PART["pred_iou_thresh"]
    # other tasks: the file has no "unspecified" entry, so segment-anything's, said
    prepared = prepare(SegmentOptions(checkpoint=str(weights)))
    assert _thresholds(prepared.config) == SAM_THRESHOLDS and prepared.notes
    record_thresholds(weights, PLAIN)
    prepared = prepare(SegmentOptions(checkpoint=str(weights), task="entity"))
    assert _thresholds(prepared.config) == PLAIN
    assert any("none for --task entity" in n for n in prepared.notes)
    # flags win, and silence the note
    prepared = prepare(SegmentOptions(checkpoint=str(weights), task="part", pred_iou_thresh=0.3,
                                      stability_score_thresh=0.7))
    assert _thresholds(prepared.config) == {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.7}
    assert not any("calibrated" in n or "--task unspecified," in n for n in prepared.notes)


def test_a_bundle_carries_the_recorded_thresholds_per_task(weights, tmp_path):
    from samantic.export.bundle import export_bundle

    record_thresholds(weights, PLAIN)
    record_thresholds(weights, PART, "part")
    model = create_model("sam_nano", checkpoint=str(weights))
    out = export_bundle(model, tmp_path / "b", int8=False)
    bundle = Bundle.load(out)
    assert {k: bundle.thresholds[k] for k in PLAIN} == PLAIN and bundle.task_thresholds == {"part": PART}
    assert {k: bundle.thresholds_for("part")[k] for k in PART} == PART
    assert _thresholds(Segmenter.from_bundle(out, backend="onnxruntime", task="part").config) == PART
    assert _thresholds(Segmenter.from_bundle(out, backend="onnxruntime").config) == PLAIN
    assert _thresholds(prepare(SegmentOptions(bundle=str(out), task="part")).config) == PART
    # explicit thresholds at export replace the file's, every task
    plain = Bundle.load(export_bundle(model, tmp_path / "c", int8=False,
                                      thresholds={"pred_iou_thresh": 0.4, "stability_score_thresh": 0.7}))
    assert plain.task_thresholds == {} and plain.thresholds_for("part")["pred_iou_thresh"] == 0.4


def test_a_calibrated_box_nms_travels_with_the_pair_and_a_file_without_one_keeps_segment_anythings(weights, tmp_path):
    from samantic.export.bundle import export_bundle

    nms = dict(PLAIN, box_nms_thresh=0.5)
    record_thresholds(weights, nms)
    record_thresholds(weights, PART, "part")  # recorded before box NMS was calibrated: a pair alone
    assert recorded_thresholds(weights) == {"unspecified": nms, "part": PART}
    model = create_model("sam_nano", checkpoint=str(weights))
    assert recommended_thresholds(model) == nms
    assert Segmenter(model).config.box_nms_thresh == 0.5
    assert Segmenter(model, task="part").config.box_nms_thresh == 0.7  # segment-anything's, as calibrated
    assert Segmenter(model, box_nms_thresh=0.6).config.box_nms_thresh == 0.6
    assert prepare(SegmentOptions(checkpoint=str(weights))).config.box_nms_thresh == 0.5
    assert prepare(SegmentOptions(checkpoint=str(weights), task="part")).config.box_nms_thresh == 0.7
    assert prepare(SegmentOptions(checkpoint=str(weights), box_nms_thresh=0.3)).config.box_nms_thresh == 0.3
    bundle = Bundle.load(export_bundle(model, tmp_path / "b", int8=False, torch_weights=True))
    assert bundle.thresholds["box_nms_thresh"] == 0.5 and bundle.thresholds_for("part")["box_nms_thresh"] == 0.5
    # the bundle's torch weights carry the calibration too: `--checkpoint` on them runs as the bundle does
    inside = str(tmp_path / "b" / bundle.manifest["torch_weights"]["file"])
    assert recorded_thresholds(inside) == {"unspecified": nms, "part": PART}
    assert prepare(SegmentOptions(checkpoint=inside)).config.box_nms_thresh == 0.5
    bundle.verify()  # recorded before the files were hashed
    assert Segmenter.from_bundle(bundle, backend="onnxruntime").config.box_nms_thresh == 0.5
    assert prepare(SegmentOptions(bundle=str(tmp_path / "b"))).config.box_nms_thresh == 0.5
    assert prepare(SegmentOptions(bundle=str(tmp_path / "b"), box_nms_thresh=0.6)).config.box_nms_thresh == 0.6
    with pytest.raises(ValueError, match="optionally box_nms_thresh"):
        record_thresholds(weights, dict(PLAIN, box_nms=0.5))
    with pytest.raises(ValueError, match="each in \\[0, 1\\]"):
        record_thresholds(weights, dict(PLAIN, box_nms_thresh=1.5))
    # `eval sam` measures segment-everything at the recommended box NMS, or the one given
    args = ["eval", "sam", "--checkpoint", str(weights), "--seeds", "0:1", "--amg-seeds", "0:1", "--no-ceiling",
            "--out", str(tmp_path / "e"), "--no-progress"]
    for flag, want in (([], nms), (["--box-nms-thresh", "0.6"], dict(nms, box_nms_thresh=0.6))):
        res = CliRunner().invoke(app, [*args, *flag])
        assert res.exit_code == 0, res.output
        saved = json.loads((tmp_path / "e" / "eval_sam.json").read_text())
        assert saved["segment_everything"] == want and f"--box-nms-thresh {want['box_nms_thresh']}" in saved["command"]


def test_eval_thresholds_record_writes_the_chosen_pair_for_the_task(weights, tmp_path):
    runner = CliRunner()
    args = ["eval", "thresholds", "--checkpoint", str(weights), "--seeds", "500:501", "--pred-iou", "0.3,0.6",
            "--stability", "0.8", "--points-per-side", "4", "--out", str(tmp_path / "e"), "--no-progress"]
    res = runner.invoke(app, [*args, "--task", "part", "--record"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "e" / "eval_thresholds.json").read_text())
    assert saved["task"] == "part" and saved["scenes"] == "v2-part" and "--task part" in saved["command"]
    best = {k: saved["best"][k] for k in (*PART, "box_nms_thresh")}  # the box NMS calibrated with the pair
    assert recorded_thresholds(weights) == {"part": best}
    assert "--box-nms 0.7,0.6,0.5,0.4,0.3" in saved["command"] and {r["box_nms_thresh"] for r in saved["rows"]} == {
        0.7, 0.6, 0.5, 0.4, 0.3}
    assert f"recorded in {weights} for --task part" in " ".join(res.output.split())
    # refused: no file to record in, an unknown task
    res = runner.invoke(app, ["eval", "thresholds", "--record", "--seeds", "500:501", "--out", str(tmp_path / "f")])
    assert res.exit_code == 1 and "registry entry" in res.output
    res = runner.invoke(app, [*args, "--task", "parts"])
    assert res.exit_code == 1 and "Did you mean 'part'" in res.output


def test_part_calibration_counts_the_part_masks():
    from samantic.train.data.panoptic import render_panoptic
    from samantic.train.metrics import calibrate_thresholds
    from samantic.train.sum import PART, scene_task_masks

    masks, tasks = scene_task_masks(render_panoptic(500))
    r = calibrate_thresholds(create_model("sam_nano"), [500], (0.3,), (0.8,), points_per_side=4, scenes="v2-part",
                             task="part", progress=False)
    assert r.n_objects == int((tasks == PART).sum()) and r.task == "part"
    assert "part-task masks" in r.markdown() and "task prompt 'part'" in r.markdown()
    assert np.isfinite(r.rows[0]["recall_50"])
