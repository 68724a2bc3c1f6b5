"""`samantic segment` as a new user runs it: the installed command in a subprocess, bad files included."""

import json

import cv2
import numpy as np
import pytest
from cli_helpers import run_segment

from samantic.cli.segment import collect_inputs

FAST = ["--points-per-side", "4", "--no-progress"]






@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image

    from samantic.train.data.shapes import render_scene

    root = tmp_path_factory.mktemp("in")
    img = render_scene(3, size=(160, 200)).image
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    (root / "sub").mkdir()
    cv2.imwrite(str(root / "good.png"), bgr)
    cv2.imwrite(str(root / "sub" / "good.jpg"), bgr)
    cv2.imwrite(str(root / "gray.png"), bgr[..., 0])
    cv2.imwrite(str(root / "rgba.png"), np.dstack([bgr, np.full(bgr.shape[:2], 255, np.uint8)]))
    Image.fromarray(img).convert("CMYK").save(root / "cmyk.jpg")
    cv2.imwrite(str(root / "deep.png"), bgr[..., 0].astype(np.uint16) * 257)
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("not an image")
    data = (root / "good.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("L", (12000, 10000)).save(root / "huge.png")
    return root


BAD = {"empty.jpg": "0 bytes", "notes.png": "not a readable image",
       "truncated.png": "truncated", "huge.png": "more than the limit"}
CONVERTED = {"deep.png": "16-bit", "gray.png": "grayscale", "rgba.png": "alpha", "cmyk.jpg": "CMYK"}


def test_folder_run_reports_bad_files_and_continues(inputs, tmp_path):
    out = tmp_path / "out"
    r = run_segment([str(inputs), "--out", str(out), *FAST])
    assert r.returncode == 1, r.stdout + r.stderr  # some files failed
    for name, reason in BAD.items():
        line = [l for l in r.stderr.splitlines() if name in l]
        assert line and reason in line[0], (name, r.stderr)
        assert not (out / f"{name}.json").exists()
    for name, what in CONVERTED.items():
        assert any(name in l and what in l for l in r.stderr.splitlines()), (name, r.stderr)
        assert (out / f"{name}.json").exists()
    from pycocotools import mask as mask_utils

    for name in ("good.png", "sub/good.jpg"):
        res = json.loads((out / f"{name}.json").read_text())
        assert res["image"]["height"] == 160 and res["image"]["width"] == 200
        for ann in res["annotations"]:
            m = mask_utils.decode(ann["segmentation"])
            assert m.shape == (160, 200) and int(m.sum()) == ann["area"]
        assert (out / f"{name}.overlay.png").exists()
    assert "failed" in r.stdout or "failed" in r.stderr


def test_resume_skips_done_images_and_overwrite_redoes_them(inputs, tmp_path):
    out = tmp_path / "out"
    good = str(inputs / "good.png")
    first = run_segment([good, "--out", str(out), *FAST])
    assert first.returncode == 0, first.stderr
    stamp = (out / "good.png.json").stat().st_mtime_ns
    again = run_segment([good, "--out", str(out), *FAST])
    assert again.returncode == 0 and (out / "good.png.json").stat().st_mtime_ns == stamp
    assert "1" in again.stdout  # the summary counts one skipped image
    redo = run_segment([good, "--out", str(out), "--overwrite", "--mask-pngs", *FAST])
    assert redo.returncode == 0 and (out / "good.png.json").stat().st_mtime_ns != stamp
    res = json.loads((out / "good.png.json").read_text())
    if res["annotations"]:
        assert (out / "good.png.masks" / "metadata.csv").exists()
        assert (out / "good.png.masks" / "0.png").exists()


def test_a_damaged_results_json_is_redone_not_skipped(inputs, tmp_path):
    out = tmp_path / "out"
    good = str(inputs / "good.png")
    assert run_segment([good, "--out", str(out), *FAST]).returncode == 0
    (out / "good.png.json").write_text("{not json")
    again = run_segment([good, "--out", str(out), *FAST])
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "good.png.json").read_text())["run"]["settings"]["points_per_side"] == 4
    # settings that change the masks make it another run's result; where it ran does not
    other = run_segment([good, "--out", str(out), "--points-per-side", "5", "--no-progress"])
    assert other.returncode == 1 and "another run (settings points_per_side 4 -> 5)" in other.stderr, other.stderr
    batch = run_segment([good, "--out", str(out), "--points-per-batch", "7", *FAST])
    assert batch.returncode == 0 and "another run" not in batch.stderr


def test_missing_inputs_and_globs(inputs, tmp_path):
    r = run_segment([str(tmp_path / "nope.png"), "--out", str(tmp_path / "o"), *FAST])
    assert r.returncode == 1 and "nope.png" in r.stderr and "no images to segment" in r.stderr
    jobs, missing = collect_inputs([str(inputs / "*.png"), str(inputs / "missing*.jpg")])
    names = sorted(j.name for j in jobs)
    assert "good.png" in names and "gray.png" in names and "good.jpg" not in names
    assert missing and "matches no image" in missing[0][1]


def test_unknown_model_is_one_clear_error(tmp_path, inputs):
    r = run_segment([str(inputs / "good.png"), "--out", str(tmp_path / "o"), "--model", "sam_vit_bb", *FAST])
    assert r.returncode == 1
    assert "sam_vit_b" in r.stderr and "Traceback" not in r.stderr


def test_adaptive_run_says_so_and_matches_the_exactrun_segment(inputs, tmp_path):
    common = ["--points-per-side", "16", "--pred-iou-thresh", "0.5", "--stability-score-thresh", "0.8", "--no-progress"]
    exact = run_segment([str(inputs / "good.png"), "--out", str(tmp_path / "exact"), *common])
    adaptive = run_segment([str(inputs / "good.png"), "--out", str(tmp_path / "adaptive"), "--adaptive", *common])
    assert exact.returncode == 0 and adaptive.returncode == 0, adaptive.stderr
    assert "no masks kept" not in exact.stderr
    said = " ".join(adaptive.stdout.split())  # rich wraps long lines
    assert "adaptive prompting (margin 0.15)" in said and "adaptive prompting" not in " ".join(exact.stdout.split())
    ex = json.loads((tmp_path / "exact" / "good.png.json").read_text())["annotations"]
    ad = json.loads((tmp_path / "adaptive" / "good.png.json").read_text())["annotations"]
    assert ex, "the shipped nano keeps masks on this scene at these thresholds"
    from pycocotools import mask as mask_utils

    iou = np.atleast_2d(mask_utils.iou([a["segmentation"] for a in ad], [e["segmentation"] for e in ex], [0] * len(ex)))
    # not exact: on this small scene with a coarse 16 x 16 grid it finds 15 of the 16 exact masks again
    # (recall at the default 32 x 32 grid: tests/test_pipeline.py and benchmarks/amg_vs_reference.py)
    assert (iou.max(0) >= 0.9).mean() >= 0.85
    bad = run_segment([str(inputs / "good.png"), "--out", str(tmp_path / "bad"), "--adaptive", "--adaptive-margin", "-1",
                "--no-progress"])
    assert bad.returncode == 2 and "adaptive-margin" in bad.stderr
    alone = run_segment([str(inputs / "good.png"), "--out", str(tmp_path / "bad"), "--adaptive-margin", "0.2", "--no-progress"])
    assert alone.returncode == 2 and "only means something with --adaptive" in " ".join(alone.stderr.split())


def test_an_empty_result_says_which_filters_to_loosen(inputs, tmp_path):
    r = run_segment([str(inputs / "good.png"), "--out", str(tmp_path / "o"), *FAST, "--pred-iou-thresh", "0.999"])
    assert r.returncode == 0
    assert json.loads((tmp_path / "o" / "good.png.json").read_text())["annotations"] == []
    assert "note: no masks kept in 1 image(s)" in r.stderr and "--pred-iou-thresh 0.999" in r.stderr
    from samantic.models.registry import STABILITY_NANO

    assert f"--stability-score-thresh {STABILITY_NANO}" in r.stderr  # sam_nano's own, since the flag was not given


def test_shipped_nano_segments_with_its_own_thresholds(tmp_path):
    """No threshold flags: sam_nano's calibrated defaults, and masks on a held-out scene."""
    from samantic.io import atomic_write_image
    from samantic.models import get_model_entry
    from samantic.train.data.shapes import render_scene

    scene = render_scene(900002, size=(240, 320))
    atomic_write_image(tmp_path / "scene.png", scene.image)
    r = run_segment([str(tmp_path / "scene.png"), "--out", str(tmp_path / "o"), "--points-per-side", "16", "--no-progress"])
    assert r.returncode == 0, r.stderr
    t = get_model_entry("sam_nano").thresholds
    assert f"pred_iou_thresh {t['pred_iou_thresh']}, stability_score_thresh {t['stability_score_thresh']}" in \
        " ".join(r.stdout.split())
    anns = json.loads((tmp_path / "o" / "scene.png.json").read_text())["annotations"]
    assert len(anns) >= 1 and "no masks kept" not in r.stderr


def test_weights_trained_at_another_side_run_there_and_say_so(inputs, tmp_path):
    """A conv model's weights fine-tuned at another input side (`train sum --input-size`): segment runs them at the
    side their header records and says so."""
    from samantic.models import create_model, save_checkpoint

    weights = save_checkpoint(create_model("sam_nano", img_size=256), tmp_path / "at256.safetensors")
    r = run_segment([str(inputs / "good.png"), "--out", str(tmp_path / "o"), "--checkpoint", str(weights), *FAST])
    assert r.returncode == 0, r.stderr
    assert f"note: {weights} was trained at input side 256 px; sam_nano runs there (its config's side: 384 px)" in \
        " ".join(r.stderr.split())
    assert (tmp_path / "o" / "good.png.json").exists()
    r = run_segment([str(inputs / "good.png"), "--out", str(tmp_path / "o2"), *FAST])
    assert r.returncode == 0 and "trained at input side" not in r.stderr


def test_samcp_head_brings_its_sam_when_no_model_is_named(tmp_path):
    """--samcp without --model runs the SAM whose patches the head learned from; another named SAM is refused, and
    without a head the default is sam_nano."""
    from samantic.batch import SegmentOptions, prepare
    from samantic.heads.samcp import SamcpHead, SamcpInfo, save_samcp

    head = SamcpHead(SamcpInfo(classes=("circle", "star"), stuff=("wall",), d_model=32, layers=1, encoder_layers=1,
                               ffn_dim=32, model="sam_nano_panoptic"))
    path = save_samcp(head, tmp_path / "h.safetensors")
    prepared = prepare(SegmentOptions(samcp=str(path)))
    assert prepared.model == "sam_nano_panoptic" and prepared.run_record["model"] == "sam_nano_panoptic"
    with pytest.raises(ValueError, match="trained on patches of sam_nano_panoptic, not sam_nano"):
        prepare(SegmentOptions(samcp=str(path), model="sam_nano"))
    assert prepare(SegmentOptions()).model == "sam_nano"


def test_samcp_patches_run_at_the_thresholds_and_box_nms_the_head_was_trained_with(tmp_path):
    """A SAM-CP head's patches: its recorded grid, thresholds and box NMS (segment-anything's 0.7 when it records
    none, whatever the SAM's own recommendation); flags win."""
    import json

    from samantic.batch import SegmentOptions, prepare
    from samantic.heads.samcp import SamcpHead, SamcpInfo, save_samcp

    def head(patches):
        info = SamcpInfo(classes=("circle",), stuff=("wall",), d_model=32, layers=1, encoder_layers=1, ffn_dim=32,
                         model="sam_nano_panoptic", extra={"patches": json.dumps(patches)})
        return str(save_samcp(SamcpHead(info), tmp_path / f"h{len(patches)}.safetensors"))

    old = head({"points_per_side": 16, "pred_iou_thresh": 0.6, "stability_score_thresh": 0.9})
    cfg = prepare(SegmentOptions(samcp=old)).config
    assert (cfg.points_per_side, cfg.pred_iou_thresh, cfg.stability_score_thresh, cfg.box_nms_thresh) == (
        16, 0.6, 0.9, 0.7)
    new = head({"points_per_side": 16, "pred_iou_thresh": 0.6, "stability_score_thresh": 0.9, "box_nms_thresh": 0.5})
    assert prepare(SegmentOptions(samcp=new)).config.box_nms_thresh == 0.5
    assert prepare(SegmentOptions(samcp=new, box_nms_thresh=0.6)).config.box_nms_thresh == 0.6
