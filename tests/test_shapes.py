"""The procedural shapes world: vocabulary, determinism, per-class geometry, ground truth, COCO output, CLI."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from typer.testing import CliRunner

from samantic.cli.data import app as data_app
from samantic.train.data import shapes
from samantic.train.data.shapes import CLASSES, SUPERCLASS_NAMES, SUPERCLASSES

KNOWN = "known classes: circle, ring, crescent, triangle, square, star, cross"
runner = CliRunner()


# ---------------------------------------------------------------------------
# vocabulary


def test_vocabulary_is_fixed():
    assert CLASSES == ("circle", "ring", "crescent", "triangle", "square", "star", "cross")
    assert SUPERCLASS_NAMES == ("round", "angular")
    assert set(SUPERCLASSES) == set(CLASSES)
    assert [SUPERCLASSES[c] for c in CLASSES] == ["round"] * 3 + ["angular"] * 4


def test_check_classes_keeps_order_and_normalises():
    assert shapes.check_classes(["star", "circle"]) == ("star", "circle")
    assert shapes.check_classes(" Ring, cross ") == ("ring", "cross")


@pytest.mark.parametrize(
    "names, says",
    [
        ([], "no class names"),
        ("", "no class names"),
        (["circle", "ring", "circle"], "duplicate class name(s): circle"),
        (["hexagon"], "'hexagon'"),
        (["circle", "sqare"], "did you mean square"),
    ],
)
def test_check_classes_rejects(names, says):
    with pytest.raises(ValueError) as e:
        shapes.check_classes(names)
    assert says in str(e.value)
    if names and len(set(names)) == len(names):
        assert KNOWN in str(e.value)


def test_renderers_reject_bad_input():
    with pytest.raises(ValueError, match=KNOWN):
        shapes.render_single("hexagon", 0)
    with pytest.raises(ValueError, match=KNOWN):
        shapes.render_scene(0, classes=["circle", "oval"])
    with pytest.raises(ValueError, match="seed"):
        shapes.render_scene(-1)
    with pytest.raises(ValueError, match="n_objects"):
        shapes.render_scene(0, n_objects=9)
    for size in [(10, 256), (256,), (256.5, 256), "big"]:
        with pytest.raises(ValueError, match="size"):
            shapes.render_scene(0, size=size)


# ---------------------------------------------------------------------------
# determinism and sizes


def _same(a: shapes.Scene, b: shapes.Scene) -> bool:
    fields = ("image", "masks", "labels", "semantic", "superclass")
    pairs = [(getattr(a, f), getattr(b, f)) for f in fields]
    return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in pairs)


def test_same_seed_same_bytes_other_seed_differs():
    a, b = shapes.render_scene(11, n_objects=5), shapes.render_scene(11, n_objects=5)
    assert _same(a, b)
    c = shapes.render_scene(12, n_objects=5)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    s1, s2 = shapes.render_single("star", 3, size=(256, 256)), shapes.render_single("star", 3, size=(256, 256))
    assert _same(s1, s2)
    assert not np.array_equal(s1.image, shapes.render_single("star", 4, size=(256, 256)).image)


def test_dtypes_and_shapes():
    s = shapes.render_scene(2, n_objects=4, size=(256, 320))
    n = len(s.labels)
    assert s.image.dtype == np.uint8 and s.image.shape == (256, 320, 3)
    assert s.masks.dtype == bool and s.masks.shape == (n, 256, 320)
    assert s.labels.dtype == np.int64
    assert s.semantic.dtype == np.uint8 and s.semantic.shape == (256, 320)
    assert s.superclass.dtype == np.uint8 and s.superclass.shape == (256, 320)
    assert s.seed == 2 and s.classes == CLASSES and s.size == (256, 320)
    empty = shapes.render_scene(2, n_objects=0, size=(128, 128))
    assert empty.masks.shape == (0, 128, 128) and not empty.semantic.any()


def test_random_sizes_and_aspect_ratios():
    ratios = [w / h for w, h in shapes.ASPECT_RATIOS]
    seen = set()
    for seed in range(10):
        for scene, top in ((shapes.render_scene(seed, n_objects=0), 1024), (shapes.render_single("circle", seed), 512)):
            h, w = scene.size
            assert 256 <= h <= top and 256 <= w <= top
            nearest = min(range(len(ratios)), key=lambda i: abs(w / h - ratios[i]))
            assert abs(w / h - ratios[nearest]) < 0.01
            seen.add(nearest)
    assert len(seen) >= 3


# ---------------------------------------------------------------------------
# geometry: a measurement that tells the seven shapes apart


def _measure(mask: np.ndarray) -> dict:
    m = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    assert len(contours) == 1, "one object, one piece"
    c = contours[0]
    area = cv2.contourArea(c)
    filled = np.zeros_like(m)
    cv2.drawContours(filled, contours, -1, 1, -1)
    hull_area = cv2.contourArea(cv2.convexHull(c))
    poly = cv2.approxPolyDP(c, 1.0, True)  # defects need a contour without pixel staircase self-touching
    defects = cv2.convexityDefects(poly, cv2.convexHull(poly, returnPoints=False))
    depths = np.zeros(0) if defects is None else defects.reshape(-1, 4)[:, 3] / 256.0
    (_, _), radius = cv2.minEnclosingCircle(c)
    (_, _), (rw, rh), _ = cv2.minAreaRect(c)
    return {
        "holes": filled.sum() / m.sum(),  # > 1 when the mask has a hole
        "solidity": area / hull_area,
        "defects": int((depths > 0.15 * math.sqrt(hull_area / math.pi)).sum()),
        "circularity": area / (math.pi * radius * radius),
        "corners": cv2.approxPolyDP(c, 0.04 * cv2.arcLength(c, True), True).reshape(-1, 2),
        "rect_fill": rw * rh / area,
        "rect_aspect": min(rw, rh) / max(rw, rh),
    }


def _classify(mask: np.ndarray) -> str:
    f = _measure(mask)
    if f["holes"] > 1.1:
        return "ring" if f["circularity"] > 0.9 else "?"
    if f["defects"] == 5 and f["solidity"] < 0.75:
        return "star"
    if f["defects"] == 4 and f["solidity"] < 0.8 and f["rect_aspect"] > 0.95:
        return "cross"
    if f["defects"] == 1 and f["solidity"] < 0.8:
        return "crescent"
    if f["circularity"] > 0.9 and f["solidity"] > 0.97:
        return "circle"
    if len(f["corners"]) == 3 and f["solidity"] > 0.93:
        return "triangle"
    if len(f["corners"]) == 4 and f["rect_fill"] < 1.08 and f["rect_aspect"] > 0.95:
        return "square"
    return "?"


def _angles(corners: np.ndarray) -> list:
    out = []
    for i in range(3):
        a, b, c = corners[i - 1], corners[i], corners[(i + 1) % 3]
        u, v = a - b, c - b
        out.append(math.degrees(math.acos(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))))
    return out


@pytest.mark.parametrize("name", CLASSES)
def test_single_object_has_the_shape_of_its_class(name):
    for seed in range(4):
        s = shapes.render_single(name, seed, size=(256, 288))
        assert s.labels.tolist() == [CLASSES.index(name)] and s.classes == (name,)
        mask = s.masks[0]
        assert _classify(mask) == name, (seed, _measure(mask))
        ys, xs = np.nonzero(mask)
        extent = max(np.ptp(ys), np.ptp(xs)) + 1
        assert 0.12 * 256 <= extent <= 0.72 * 256
        f = _measure(mask)
        if name == "triangle":
            assert min(_angles(f["corners"].astype(float))) > 26  # >= 30 degrees, less pixel error
        if name == "ring":
            assert 0.35 < math.sqrt(1 - 1 / f["holes"]) < 0.75  # inner / outer radius


# ---------------------------------------------------------------------------
# ground truth consistency


def test_masks_semantic_and_superclass_agree():
    placed = 0
    for seed in range(6):
        s = shapes.render_scene(seed, n_objects=8, size=(256, 320))
        placed += len(s.labels)
        assert s.masks.sum(axis=0).max() <= 1, "visible parts are disjoint"
        union = s.masks.any(axis=0)
        assert np.array_equal(union, s.semantic > 0)
        assert np.array_equal(union, s.superclass > 0)
        for mask, label in zip(s.masks, s.labels):
            assert mask.sum() >= shapes.MIN_VISIBLE_AREA
            assert np.all(s.semantic[mask] == label + 1)
            assert np.all(s.superclass[mask] == SUPERCLASS_NAMES.index(SUPERCLASSES[CLASSES[label]]) + 1)
    assert placed >= 40, "nearly every requested object finds room"


def test_only_allowed_classes():
    for seed in range(4):
        s = shapes.render_scene(seed, classes=("ring", "star"), n_objects=6, size=(256, 256))
        assert s.classes == ("ring", "star")
        assert set(s.labels.tolist()) <= {1, 5}
        assert set(np.unique(s.semantic).tolist()) <= {0, 2, 6}


def test_overlaps_resolve_in_z_order_and_occlusion_is_capped():
    canvas = shapes._Canvas(np.zeros((64, 64, 3), np.float32))
    box = np.zeros((20, 20), np.uint8)
    box[2:18, 2:18] = 1  # 256 px
    paint = np.full((20, 20, 3), 200, np.float32)
    canvas.paint(box, 10, 10, paint, CLASSES.index("square"))
    assert canvas.fits(box, 20, 20)  # would hide 36 of 256 px
    canvas.paint(box, 20, 20, paint, CLASSES.index("circle"))
    assert not canvas.fits(box, 14, 14)  # would hide 144 px of the square
    assert canvas.fits(box, 40, 40)
    s = canvas.scene(0, CLASSES)
    assert s.masks.sum(axis=(1, 2)).tolist() == [256 - 36, 256]
    assert s.semantic[25, 25] == CLASSES.index("circle") + 1  # the later one is on top
    assert s.superclass[25, 25] == 1 and s.superclass[14, 14] == 2


# ---------------------------------------------------------------------------
# COCO output


def test_write_coco_round_trips_through_pycocotools(tmp_path):
    scenes = [shapes.render_scene(seed, n_objects=5, size=(256, 320)) for seed in (3, 4)]
    path = shapes.write_coco(tmp_path, iter(scenes), CLASSES, progress=False)
    assert path == tmp_path / "instances.json"
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [1, 2]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert all(c["supercategory"] == SUPERCLASSES[c["name"]] for c in coco.loadCats(coco.getCatIds()))
    for image_id, scene in zip((1, 2), scenes):
        info = coco.loadImgs(image_id)[0]
        assert (info["height"], info["width"], info["seed"]) == (256, 320, scene.seed)
        image = cv2.cvtColor(cv2.imread(str(tmp_path / "images" / info["file_name"])), cv2.COLOR_BGR2RGB)
        assert np.array_equal(image, scene.image)
        semantic = cv2.imread(str(tmp_path / info["semantic_file_name"]), cv2.IMREAD_UNCHANGED)
        superclass = cv2.imread(str(tmp_path / info["superclass_file_name"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(semantic, scene.semantic) and np.array_equal(superclass, scene.superclass)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(scene.labels) > 0
        for ann, mask, label in zip(anns, scene.masks, scene.labels):
            assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
            assert ann["category_id"] == label + 1
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            assert ann["area"] == mask.sum()
            rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            assert ann["bbox"] == coco_mask.toBbox(rle).tolist()


def test_write_coco_rejects_undeclared_classes(tmp_path):
    scene = shapes.render_single("cross", 0, size=(128, 128))
    with pytest.raises(ValueError, match="cross"):
        shapes.write_coco(tmp_path, [scene], ["circle"], progress=False)


def test_make_dataset_single_cycles_classes_and_seeds(tmp_path):
    path = shapes.make_dataset(tmp_path, "single", ["ring", "cross", "star"], n=5, seed=40, progress=False)
    data = json.loads(path.read_text())
    assert [im["seed"] for im in data["images"]] == [40, 41, 42, 43, 44]
    assert [a["category_id"] for a in data["annotations"]] == [2, 7, 6, 2, 7]
    assert [c["id"] for c in data["categories"]] == [2, 6, 7]
    again = shapes.render_single("star", 42)  # image i is render_single(classes[i % k], seed + i)
    stored = cv2.imread(str(tmp_path / "images" / data["images"][2]["file_name"]))
    assert np.array_equal(stored, cv2.cvtColor(again.image, cv2.COLOR_RGB2BGR))
    with pytest.raises(ValueError, match="kind"):
        shapes.make_dataset(tmp_path, "video", n=1)
    with pytest.raises(ValueError, match="n must be"):
        shapes.make_dataset(tmp_path, "scenes", n=0)


def test_supervision_loads_the_dataset(tmp_path):
    sv = pytest.importorskip("supervision")
    scenes = [shapes.render_scene(seed, n_objects=3, size=(256, 256)) for seed in range(2)]
    path = shapes.write_coco(tmp_path, scenes, CLASSES, progress=False)
    ds = sv.DetectionDataset.from_coco(images_directory_path=str(tmp_path / "images"), annotations_path=str(path))
    assert len(ds) == 2
    assert list(ds.classes) == list(CLASSES)
    assert sum(len(d) for _, _, d in ds) == sum(len(s.labels) for s in scenes)


# ---------------------------------------------------------------------------
# CLI


def test_cli_writes_a_dataset(tmp_path):
    out = tmp_path / "ds"
    args = ["shapes", "--kind", "single", "--classes", "circle,ring", "--n", "4", "--seed", "3", "--out", str(out)]
    r = runner.invoke(data_app, args + ["--no-progress"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "instances.json").read_text())
    assert len(data["images"]) == 4 and len(data["annotations"]) == 4
    assert str(out / "instances.json") in r.output and "total" in r.output


def test_cli_rejects_bad_input(tmp_path):
    r = runner.invoke(data_app, ["shapes", "--classes", "circle,hexagon", "--out", str(tmp_path), "--no-progress"])
    assert r.exit_code == 1
    assert "hexagon" in r.output and KNOWN in r.output
    assert not (tmp_path / "instances.json").exists()
    r = runner.invoke(data_app, ["shapes", "--n", "0", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--n" in r.output


def test_installed_command_runs_data_shapes(tmp_path):
    exe = Path(sys.executable).parent / "samantic"
    exe = str(exe) if exe.exists() else shutil.which("samantic")
    if not exe:
        pytest.skip("the samantic console script is not installed")
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120).stdout
    if " data " not in help_text:
        pytest.skip("`samantic data` is not wired into cli/main.py yet")
    args = ["data", "shapes", "--n", "2", "--seed", "1", "--out", str(tmp_path), "--no-progress"]
    out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(json.loads((tmp_path / "instances.json").read_text())["images"]) == 2
