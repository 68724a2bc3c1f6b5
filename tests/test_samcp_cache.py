"""SAM-CP's patch cache (samantic.train.samcp_cache) and ``samantic data patches``.

Segment-everything with sam_nano costs seconds per image on a CPU whatever the
image size, so the tests share one small build (two 96x128 scenes, a 6x6 grid)
and count generator calls instead of timing anything.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from samantic.cli.data import app as data_app
from samantic.pipeline.generator import MaskGenerator
from samantic.models.registry import PRED_IOU_NANO, STABILITY_NANO
from samantic.train import samcp_cache
from samantic.train.data.panoptic import CATEGORIES, render_panoptic, write_panoptic
from samantic.train.samcp_cache import (
    PanopticFolder,
    PanopticStream,
    PatchCache,
    build_patch_cache,
    image_sha256,
    load_patches,
    open_panoptic,
    patch_overlaps,
)

runner = CliRunner()
SIZE = (96, 128)
SEEDS = (3, 4)
GRID = 6
LOW = {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.5}  # many patches on tiny scenes


@pytest.fixture(scope="module")
def nano():
    from samantic.models import create_model

    return create_model("sam_nano")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("panoptic")
    write_panoptic(out, [render_panoptic(s, size=SIZE) for s in SEEDS], progress=False)
    return out


@pytest.fixture(scope="module")
def built(nano, dataset_dir, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    report = build_patch_cache(nano, dataset_dir, cache_dir, points_per_side=GRID, progress=False, **LOW)
    return cache_dir, report


@pytest.fixture
def count_generator(monkeypatch):
    calls = []
    original = MaskGenerator.generate_masks

    def counted(self, image, *args, **kwargs):
        calls.append(image.shape)
        return original(self, image, *args, **kwargs)

    monkeypatch.setattr(MaskGenerator, "generate_masks", counted)
    return calls


@pytest.fixture
def no_generator(monkeypatch):
    def refuse(self, image, *args, **kwargs):
        raise AssertionError("the generator ran on a cached image")

    monkeypatch.setattr(MaskGenerator, "generate_masks", refuse)


def _pycocotools_overlaps(patch_rles, gt_rles):
    """Intersection over patch and over GT and IoU, from pycocotools alone (merge + area, and iou)."""
    enc = [{"size": r["size"], "counts": r["counts"].encode()} for r in patch_rles]
    gts = [{"size": r["size"], "counts": r["counts"].encode()} for r in gt_rles]
    pa = mask_utils.area(enc).astype(np.float64)
    ga = mask_utils.area(gts).astype(np.float64)
    inter = np.array([[mask_utils.area(mask_utils.merge([p, g], intersect=True)) for g in gts] for p in enc],
                     np.float64)
    iou = mask_utils.iou(enc, gts, [0] * len(gts))
    return inter / pa[:, None], inter / ga[None, :], iou, pa, ga


# ---------------------------------------------------------------- overlaps


def test_patch_overlaps_match_pycocotools_on_random_masks():
    rng = np.random.default_rng(0)
    h, w = 37, 53
    patches = np.zeros((9, h, w), np.uint8)
    for m in patches[:-1]:
        y0, x0 = rng.integers(0, h - 5), rng.integers(0, w - 5)
        m[y0 : y0 + rng.integers(3, 20), x0 : x0 + rng.integers(3, 30)] = 1
        m[rng.random((h, w)) < 0.05] = 1  # scattered pixels: boxes and masks disagree
    patches[-1, 5, 7] = 1  # a one-pixel patch
    gt = (rng.random((4, h, w)) < 0.3).astype(np.uint8)
    gt[0] = 0
    gt[0, 10:30, 20:50] = 1
    p_rles = mask_utils.encode(np.asfortranarray(patches.transpose(1, 2, 0)))
    g_rles = mask_utils.encode(np.asfortranarray(gt.transpose(1, 2, 0)))
    as_str = lambda rles: [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]  # noqa: E731
    boxes_xywh = mask_utils.toBbox(p_rles).astype(np.int64)
    boxes = np.concatenate([boxes_xywh[:, :2], boxes_xywh[:, :2] + boxes_xywh[:, 2:] - 1], axis=1)
    out = patch_overlaps(as_str(p_rles), boxes, as_str(g_rles))
    iop, iog, iou, pa, ga = _pycocotools_overlaps(as_str(p_rles), as_str(g_rles))
    for name, ref in (("iop", iop), ("iog", iog), ("iou", iou)):
        assert out[name].dtype == np.float32 and out[name].shape == (9, 4)
        np.testing.assert_allclose(out[name], ref.astype(np.float32), rtol=1e-6, atol=0, err_msg=name)
    np.testing.assert_array_equal(out["patch_areas"], pa)
    np.testing.assert_array_equal(out["gt_areas"], ga)
    # box intersection over the patch's box, counted in pixels on the grid
    for i in range(9):
        for j in range(4):
            gy, gx = np.nonzero(gt[j])
            gbox = np.zeros((h, w), bool)
            gbox[gy.min() : gy.max() + 1, gx.min() : gx.max() + 1] = True
            pbox = np.zeros((h, w), bool)
            x0, y0, x1, y1 = boxes[i]
            pbox[y0 : y1 + 1, x0 : x1 + 1] = True
            assert out["box_iop"][i, j] == pytest.approx((pbox & gbox).sum() / pbox.sum(), rel=1e-6)
    assert out["iop"][-1].sum() == pytest.approx(gt[:, 5, 7].sum())  # one pixel: 1 in each GT that has it


def test_patch_overlaps_of_no_patches():
    gt = mask_utils.encode(np.asfortranarray(np.ones((8, 9, 2), np.uint8)))
    out = patch_overlaps([], np.zeros((0, 4)), [{"size": r["size"], "counts": r["counts"].decode()} for r in gt])
    assert out["iop"].shape == (0, 2) and out["gt_areas"].tolist() == [72, 72]
    with pytest.raises(ValueError, match="one row per patch"):
        patch_overlaps(gt, np.zeros((1, 4)), gt)


# ---------------------------------------------------------------- the cache


def test_build_caches_patches_and_overlaps_equal_to_pycocotools(built, dataset_dir):
    cache_dir, report = built
    assert report.computed == 2 and report.reused == 0 and not report.failed
    assert [Path(s).name for s, _ in report.entries] == ["000001.png", "000002.png"]
    panoptic = json.loads((dataset_dir / "panoptic.json").read_text())
    things = {c["id"] for c in CATEGORIES if c["isthing"]}
    total = 0
    for (source, path), ann in zip(report.entries, panoptic["annotations"]):
        assert path.parent == cache_dir / report.key and path.suffix == ".npz"
        e = load_patches(path)
        total += len(e)
        assert len(e) > 3, "too few patches to test anything"
        p, g = len(e), len(ann["segments_info"])
        # the ground truth: every segment of the panoptic annotation, things and stuff
        assert e.gt_ids.tolist() == [s["id"] for s in ann["segments_info"]]
        assert e.gt_categories.tolist() == [s["category_id"] for s in ann["segments_info"]]
        assert e.gt_isthing.tolist() == [s["category_id"] in things for s in ann["segments_info"]]
        assert e.gt_isthing.any() and not e.gt_isthing.all()
        assert e.gt_areas.tolist() == [s["area"] for s in ann["segments_info"]]
        assert [[x, y, x1 - x + 1, y1 - y + 1] for x, y, x1, y1 in e.gt_boxes.tolist()] == \
            [s["bbox"] for s in ann["segments_info"]]
        # patches: compressed RLEs, boxes of their masks, scores above the thresholds
        assert all(isinstance(r["counts"], str) and r["size"] == list(SIZE) for r in e.patch_rles)
        boxes_xywh = mask_utils.toBbox([{"size": r["size"], "counts": r["counts"].encode()} for r in e.patch_rles])
        np.testing.assert_array_equal(e.patch_boxes[:, :2], boxes_xywh[:, :2])
        np.testing.assert_array_equal(e.patch_boxes[:, 2:] - e.patch_boxes[:, :2] + 1, boxes_xywh[:, 2:])
        assert (e.patch_iou >= LOW["pred_iou_thresh"]).all()
        assert (e.patch_stability >= LOW["stability_score_thresh"]).all()
        assert e.patch_points.shape == (p, 2)
        # overlaps: dense float32 [P, G], equal to pycocotools on the same RLEs
        iop, iog, iou, pa, ga = _pycocotools_overlaps(e.patch_rles, e.gt_rles)
        for name, ref in (("iop", iop), ("iog", iog), ("iou", iou)):
            got = getattr(e, name)
            assert got.dtype == np.float32 and got.shape == (p, g)
            np.testing.assert_allclose(got, ref.astype(np.float32), rtol=1e-6, atol=0, err_msg=name)
        np.testing.assert_array_equal(e.patch_areas, pa)
        np.testing.assert_array_equal(e.gt_areas, ga)
        # the segments tile the image, so every patch lies wholly in them
        np.testing.assert_allclose(e.iop.sum(axis=1), 1.0, rtol=1e-5)
        # a mask lies inside its box, so the boxes overlap in at least as many pixels as the masks
        box_area = (e.patch_boxes[:, 2:] - e.patch_boxes[:, :2] + 1).prod(1)
        assert e.box_iop.shape == (p, g)
        assert (e.box_iop * box_area[:, None] >= e.iop * e.patch_areas[:, None] - 1e-3).all()
        assert e.meta["source"] == source and e.meta["image_sha256"] == path.stem
    assert report.patches == total


def test_second_run_reuses_every_entry(built, dataset_dir, nano, no_generator):
    cache_dir, first = built
    again = build_patch_cache(nano, dataset_dir, cache_dir, points_per_side=GRID, progress=False, **LOW)
    assert (again.computed, again.reused, again.key) == (0, 2, first.key)
    assert again.entries == first.entries and again.patches == first.patches
    # the same scene rendered on the fly has the same pixels, so the same entry
    stream = build_patch_cache(nano, PanopticStream(SEEDS[0], 1, size=SIZE), cache_dir, points_per_side=GRID,
                               progress=False, **LOW)
    assert stream.reused == 1 and stream.entries[0] == (f"shapes-panoptic:{SEEDS[0]}", first.entries[0][1])


def test_new_thresholds_invalidate_the_cache(built, nano, count_generator):
    cache_dir, first = built
    before = sorted(p.name for p in (cache_dir / first.key).iterdir())
    stream = PanopticStream(SEEDS[0], 1, size=SIZE)
    other = build_patch_cache(nano, stream, cache_dir, points_per_side=GRID, progress=False,
                              pred_iou_thresh=0.3, stability_score_thresh=0.6)
    assert other.key != first.key and other.computed == 1 and len(count_generator) == 1
    entry = load_patches(other.entries[0][1])
    assert entry.meta["stability_score_thresh"] == 0.6 and (entry.patch_stability >= 0.6).all()
    assert len(entry) <= len(load_patches(first.entries[0][1]))  # a stricter filter keeps a subset
    assert sorted(p.name for p in (cache_dir / first.key).iterdir()) == before  # the old cache is left alone
    # another grid is another key too, without computing anything to find out
    assert PatchCache(cache_dir, nano, points_per_side=GRID + 1, **LOW).key not in (first.key, other.key)


def test_metadata_is_recorded(built, nano):
    from samantic import __version__
    from samantic.models import resolve_checkpoint
    from samantic.models.weights import file_sha256

    cache_dir, report = built
    meta = json.loads((report.dir / "meta.json").read_text())
    shipped = file_sha256(resolve_checkpoint("pkg:assets/sam_nano.safetensors"))
    assert meta == report.metadata
    assert meta["model"] == "sam_nano" and meta["model_key"] == report.key and report.key.startswith("sam_nano-")
    assert (meta["points_per_side"], meta["grid"]) == (GRID, f"{GRID}x{GRID}")
    assert (meta["pred_iou_thresh"], meta["stability_score_thresh"]) == (0.3, 0.5)
    assert meta["thresholds_source"] == {"pred_iou_thresh": "given", "stability_score_thresh": "given"}
    assert meta["weights_sha256"] == shipped and meta["samantic_version"] == __version__
    assert meta["box_nms_thresh"] == 0.7 and meta["format"] == samcp_cache.CACHE_FORMAT
    entry = load_patches(report.entries[0][1])
    assert {k: entry.meta[k] for k in meta} == meta and (entry.meta["height"], entry.meta["width"]) == SIZE


def test_thresholds_default_to_the_models_recommended_ones(nano, tmp_path):
    from samantic.models import create_model, recommended_thresholds

    cache = PatchCache(tmp_path, nano, points_per_side=GRID)
    rec = {k: v for k, v in recommended_thresholds(nano).items() if k != "box_nms_thresh"}
    assert rec == {"pred_iou_thresh": PRED_IOU_NANO, "stability_score_thresh": STABILITY_NANO}  # the shipped calibration
    assert {k: cache.metadata[k] for k in rec} == rec
    # the model's box NMS is not the patches': SAM-CP merges over-segmented patches (segment-anything's 0.7)
    assert recommended_thresholds(nano)["box_nms_thresh"] < 0.7 and cache.metadata["box_nms_thresh"] == 0.7
    assert cache.metadata["thresholds_source"] == {"pred_iou_thresh": "model", "stability_score_thresh": "model"}
    assert PatchCache(tmp_path, nano, points_per_side=GRID, pred_iou_thresh=PRED_IOU_NANO).key == cache.key
    # other weights: another key, and no file to name
    random = PatchCache(tmp_path, create_model("sam_nano", pretrained=False), points_per_side=GRID)
    assert random.key != cache.key and random.metadata["weights_sha256"] == "random"
    for bad in ({"pred_iou_thresh": 1.5}, {"stability_score_thresh": -0.1}, {"points_per_side": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PatchCache(tmp_path, nano, **{"points_per_side": GRID, **bad})


def test_damaged_or_foreign_entries_are_not_trusted(built, nano, tmp_path):
    cache_dir, report = built
    image = render_panoptic(SEEDS[0], size=SIZE).image
    cache = PatchCache(tmp_path, nano, points_per_side=GRID, **LOW)
    assert cache.get(image) is None
    path = cache.path(image)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz")
    assert cache.get(image) is None
    shutil.copyfile(report.entries[1][1], path)  # another image's entry under this image's name
    assert cache.get(image) is None
    shutil.copyfile(report.entries[0][1], path)
    assert len(cache.get(image)) == len(load_patches(report.entries[0][1]))


def test_load_patches_by_image(built):
    _, report = built
    image = render_panoptic(SEEDS[1], size=SIZE).image
    entry = load_patches(report.dir, image)
    assert report.entries[1][1].stem == image_sha256(image) == entry.meta["image_sha256"]
    assert len(entry.patch_batch()) == len(entry)
    with pytest.raises(ValueError, match="pass the image"):
        load_patches(report.dir)
    with pytest.raises(FileNotFoundError, match="no such cache entry"):
        load_patches(report.dir, image[::-1].copy())


def test_open_panoptic_specs(tmp_path, dataset_dir):
    assert isinstance(open_panoptic(dataset_dir), PanopticFolder) and len(open_panoptic(dataset_dir)) == 2
    s = open_panoptic("shapes-panoptic:7:3")
    assert isinstance(s, PanopticStream) and (s.seed, s.n, s.key(2)) == (7, 3, "shapes-panoptic:9")
    assert len(open_panoptic("shapes-panoptic:7")) == samcp_cache.DEFAULT_STREAM_N
    for bad in ("shapes-panoptic:", "shapes-panoptic:x", "shapes-panoptic:1:0", "shapes-panoptic:1:2:3",
                "shapes-panoptic:-1"):
        with pytest.raises(ValueError, match="shapes-panoptic:SEED"):
            open_panoptic(bad)
    with pytest.raises(FileNotFoundError, match="no panoptic.json"):
        open_panoptic(tmp_path)
    # the folder's ground truth is the renderer's
    sample = open_panoptic(dataset_dir).load(0)
    scene = render_panoptic(SEEDS[0], size=SIZE)
    np.testing.assert_array_equal(sample.image, scene.image)
    assert list(zip(sample.gt.segment_ids.tolist(), sample.gt.category_ids.tolist())) == list(scene.segments)


def test_v1_scenes_and_mixed_specs(dataset_dir):
    """``shapes:SEED:N`` gives v1 scenes as panoptic samples in the v2 vocabulary; commas join datasets."""
    from samantic.train.data.shapes import CLASSES, render_scene
    from samantic.train.samcp_cache import ConcatPanoptic, ShapesStream

    v1 = open_panoptic("shapes:11:2")
    assert isinstance(v1, ShapesStream) and (len(v1), v1.key(1)) == (2, "shapes:12")
    v2_ids = {c["name"]: c["id"] for c in CATEGORIES}
    sample, scene = v1.load(1), render_scene(12)
    np.testing.assert_array_equal(sample.image, scene.image)
    assert len(scene.labels) > 0 and len(sample.gt) == len(scene.labels)
    assert sample.gt.category_ids.tolist() == [v2_ids[CLASSES[k]] for k in scene.labels]
    assert sample.gt.isthing.all()
    decoded = mask_utils.decode(sample.gt.rles.to_dicts(compressed=True)).transpose(2, 0, 1).astype(bool)
    np.testing.assert_array_equal(decoded, np.asarray(scene.masks, bool))
    # mixed: a folder, a v2 stream and a v1 stream, in that order, one vocabulary
    mix = open_panoptic(f"{dataset_dir},shapes-panoptic:7:2,shapes:11:2")
    assert isinstance(mix, ConcatPanoptic) and len(mix) == 6
    assert [mix.key(i) for i in range(2, 6)] == ["shapes-panoptic:7", "shapes-panoptic:8", "shapes:11", "shapes:12"]
    assert mix.key(0) == open_panoptic(dataset_dir).key(0)
    assert [c["name"] for c in mix.categories] == [c["name"] for c in CATEGORIES]
    np.testing.assert_array_equal(mix.load(5).image, sample.image)
    with pytest.raises(IndexError):
        mix.key(6)
    for bad in ("shapes:", "shapes:x", "shapes:1:0", "shapes:-2", "shapes:1,,shapes:2"):
        with pytest.raises(ValueError, match="SEED|empty item"):
            open_panoptic(bad)
    # datasets whose categories disagree are not mixed silently
    other = type("Other", (), {"categories": [{"id": 99, "name": "circle", "isthing": 1}], "__len__": lambda self: 1})()
    with pytest.raises(ValueError, match="'circle' is id 1 .*another dataset has id 99"):
        ConcatPanoptic([other, v1])


# ---------------------------------------------------------------- CLI


def test_cli_writes_the_cache_and_reports_a_corrupt_image(dataset_dir, tmp_path, count_generator):
    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    (data / "images" / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "cache"
    r = runner.invoke(data_app, ["patches", "--data", str(data), "--out", str(out), "--points-per-side", "4",
                                 "--no-progress"])
    assert r.exit_code == 1, r.output
    assert "000002.png" in r.output and "1 of 2 images failed" in r.output
    assert "--model sam_nano" in r.output and f"--pred-iou-thresh {PRED_IOU_NANO} (the model's)" in r.output
    (key_dir,) = out.iterdir()
    assert str(key_dir) in r.output
    entries = sorted(p.name for p in key_dir.glob("*.npz"))
    assert entries == [image_sha256(render_panoptic(SEEDS[0], size=SIZE).image) + ".npz"]
    meta = json.loads((key_dir / "meta.json").read_text())
    assert (meta["pred_iou_thresh"], meta["stability_score_thresh"], meta["grid"]) == (PRED_IOU_NANO, STABILITY_NANO, "4x4")
    assert len(count_generator) == 1
    # the good image is cached: a rerun computes nothing and still fails on the bad one
    r = runner.invoke(data_app, ["patches", "--data", str(data), "--out", str(out), "--points-per-side", "4",
                                 "--no-progress"])
    assert r.exit_code == 1 and len(count_generator) == 1 and "000002.png" in r.output


def test_cli_rejects_bad_options(tmp_path):
    out = tmp_path / "cache"
    args = ["patches", "--data", "shapes-panoptic:1", "--out", str(out)]
    r = runner.invoke(data_app, args + ["--pred-iou-thresh", "1.5"])
    assert r.exit_code == 2 and "--pred-iou-thresh" in r.output
    r = runner.invoke(data_app, args + ["--points-per-side", "0"])
    assert r.exit_code == 2 and "--points-per-side" in r.output
    r = runner.invoke(data_app, ["patches", "--data", "shapes-panoptic:one", "--out", str(out)])
    assert r.exit_code == 1 and "shapes-panoptic:SEED" in r.output
    r = runner.invoke(data_app, ["patches", "--data", str(tmp_path), "--out", str(out)])
    assert r.exit_code == 1 and "panoptic.json" in r.output
    assert not out.exists()


def test_installed_command_help_subprocess():
    exe = Path(sys.executable).parent / "samantic"
    if not exe.exists():
        pytest.skip("the samantic console script is not installed")
    out = subprocess.run([str(exe), "data", "patches", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--points-per-side" in out.stdout and "shapes-panoptic" in out.stdout
