"""COCO panoptic PNG + JSON and palette semantic PNGs: round trips, format checks, pycocotools, invalid input."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samantic.io.panoptic import (
    MAX_SEGMENT_ID,
    id_to_rgb,
    panoptic_to_semantic,
    read_panoptic,
    rgb_to_id,
    write_panoptic,
    write_semantic_png,
)
from samantic.io.writers import voc_palette
from samantic.train.data import panoptic as shapes_v2
from samantic.train.data.panoptic import CATEGORIES, render_panoptic

IMAGE = {"id": 7, "file_name": "000007.jpg"}


def random_panoptic(rng, h=40, w=56):
    """Random blocky segments with large ids (all three channels in use), some void, and their segments_info."""
    ids = np.array([0, 1, 255, 256, 70_000, MAX_SEGMENT_ID, 12_345_678])
    pan = ids[rng.integers(0, len(ids), (h // 4, w // 8))].repeat(4, 0).repeat(8, 1)
    info = [{"id": int(i), "category_id": int(rng.choice([c["id"] for c in CATEGORIES])), "score": float(rng.random())}
            for i in np.unique(pan) if i]
    return pan, info


def test_id_rgb_encoding_is_cocos():
    ids = np.array([0, 1, 255, 256, 65_536, 65_536 + 2 * 256 + 3, MAX_SEGMENT_ID])
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (7, 3)
    assert rgb.tolist() == [[0, 0, 0], [1, 0, 0], [255, 0, 0], [0, 1, 0], [0, 0, 1], [3, 2, 1], [255, 255, 255]]
    assert np.array_equal(rgb_to_id(rgb), ids)
    grid = np.random.default_rng(0).integers(0, MAX_SEGMENT_ID + 1, (9, 11))
    assert np.array_equal(rgb_to_id(id_to_rgb(grid)), grid)
    with pytest.raises(ValueError, match="does not fit"):
        id_to_rgb(np.array([MAX_SEGMENT_ID + 1]))
    with pytest.raises(ValueError, match="does not fit"):
        id_to_rgb(np.array([-1]))
    with pytest.raises(ValueError, match=r"uint8 \[\.\.\., 3\]"):
        rgb_to_id(np.zeros((2, 2, 4), np.uint8))


def test_round_trip(tmp_path):
    pan, info = random_panoptic(np.random.default_rng(1))
    info[0]["category_name"] = "extra keys survive"
    png, js = write_panoptic(tmp_path / "p.png", tmp_path / "p.json", pan, info, IMAGE, list(CATEGORIES))
    assert (png, js) == (tmp_path / "p.png", tmp_path / "p.json")
    ids, segments = read_panoptic(png, js)
    assert ids.dtype == np.int32 and np.array_equal(ids, pan)
    assert [s["id"] for s in segments] == [s["id"] for s in info], "the given order is kept"
    for s, given in zip(segments, info):
        assert {k: s[k] for k in given} == given
        assert s["iscrowd"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.png"], "no temporary files left"


def test_every_segment_rebuilt_from_the_png_matches_the_json(tmp_path):
    pan, info = random_panoptic(np.random.default_rng(2))
    info[1]["area"], info[1]["bbox"] = 1, [0, 0, 1, 1]  # wrong values given: measured values are written
    png, js = write_panoptic(tmp_path / "seg" / "a.png", tmp_path / "a.json", pan, info, IMAGE, list(CATEGORIES))
    rgb = np.asarray(Image.open(png))  # Pillow and the formula, not read_panoptic
    assert Image.open(png).mode == "RGB" and rgb.shape == (*pan.shape, 3)
    rgb = rgb.astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    data = json.loads(js.read_text())
    segments = data["annotations"][0]["segments_info"]
    assert sorted(s["id"] for s in segments) == sorted(set(np.unique(ids).tolist()) - {0})
    for s in segments:
        mask = ids == s["id"]
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert s["area"] == int(mask_utils.area(rle)) == int(mask.sum())
        assert s["bbox"] == [int(v) for v in mask_utils.toBbox(rle)]
        assert all(type(v) is int for v in s["bbox"]), "integer XYWH like panopticapi"
        assert list(s)[:5] == ["id", "category_id", "iscrowd", "area", "bbox"]


def test_json_follows_coco_panoptic(tmp_path):
    pan, info = random_panoptic(np.random.default_rng(3))
    info[0]["iscrowd"] = 1
    _, js = write_panoptic(tmp_path / "b.png", tmp_path / "b.json", pan, info, IMAGE, list(CATEGORIES))
    data = json.loads(js.read_text())
    assert set(data) == {"images", "annotations", "categories"}
    assert data["images"] == [{**IMAGE, "height": pan.shape[0], "width": pan.shape[1]}]
    (ann,) = data["annotations"]
    assert set(ann) == {"image_id", "file_name", "segments_info"}
    assert ann["image_id"] == 7 and ann["file_name"] == "b.png"
    assert ann["segments_info"][0]["iscrowd"] == 1
    assert data["categories"] == [dict(c) for c in CATEGORIES]
    assert all(set(c) >= {"id", "name", "isthing"} and c["isthing"] in (0, 1) for c in data["categories"])
    # the image record loads in pycocotools, and the segments give masks that pycocotools can measure
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": data["images"], "annotations": [], "categories": data["categories"]}
    coco.createIndex()
    assert coco.imgs[7]["height"] == pan.shape[0]
    assert sorted(coco.getCatIds()) == list(range(1, 15))


def test_same_files_as_the_shapes_v2_dataset_writer(tmp_path):
    scene = render_panoptic(5, size=(96, 128))
    dataset = tmp_path / "ds"
    shapes_v2.write_panoptic(dataset, [scene], progress=False)
    reference = json.loads((dataset / "panoptic.json").read_text())
    info = [{"id": i, "category_id": c} for i, c in scene.segments]
    image = reference["images"][0]
    png, js = write_panoptic(tmp_path / "000001.png", tmp_path / "mine.json", scene.panoptic, info, image, CATEGORIES)
    assert png.read_bytes() == (dataset / "panoptic" / "000001.png").read_bytes()
    mine = json.loads(js.read_text())
    assert mine["annotations"] == reference["annotations"]
    assert mine["images"] == reference["images"] and mine["categories"] == reference["categories"]
    # read_panoptic picks the right annotation out of a whole dataset
    ids, segments = read_panoptic(dataset / "panoptic" / "000001.png", dataset / "panoptic.json")
    assert np.array_equal(ids, scene.panoptic) and segments == reference["annotations"][0]["segments_info"]


def test_panoptic_to_semantic():
    pan = np.array([[0, 3, 3], [5, 5, 0]])
    assert panoptic_to_semantic(pan, [{"id": 3, "category_id": 11}, {"id": 5, "category_id": 2}]).tolist() == [
        [0, 11, 11], [2, 2, 0]]
    with pytest.raises(ValueError, match=r"\[5\] missing"):
        panoptic_to_semantic(pan, [{"id": 3, "category_id": 11}])


def test_write_panoptic_rejects_bad_input_and_writes_nothing(tmp_path):
    pan, info = random_panoptic(np.random.default_rng(4))
    cats = list(CATEGORIES)

    def write(p=pan, i=info, image=IMAGE, c=cats):
        return write_panoptic(tmp_path / "x.png", tmp_path / "x.json", p, i, image, c)

    with pytest.raises(ValueError, match="missing from segments_info"):
        write(i=info[1:])
    with pytest.raises(ValueError, match="no pixels"):
        write(i=info + [{"id": 4, "category_id": 1}])
    with pytest.raises(ValueError, match="twice"):
        write(i=info + info[:1])
    with pytest.raises(ValueError, match="unknown category_id 99"):
        write(i=[{**info[0], "category_id": 99}] + info[1:])
    with pytest.raises(ValueError, match="isthing"):
        write(c=[{"id": c["id"], "name": c["name"]} for c in cats])
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        write(p=pan[None])
    with pytest.raises(ValueError, match="integer"):
        write(p=pan.astype(float))
    with pytest.raises(ValueError, match="does not fit"):
        write(p=np.where(pan == 1, MAX_SEGMENT_ID + 1, pan))
    with pytest.raises(ValueError, match="'id'"):
        write(image={"file_name": "a.jpg"})
    with pytest.raises(ValueError, match="height"):
        write(image={**IMAGE, "height": 3})
    assert list(tmp_path.iterdir()) == []


def test_read_panoptic_rejects_a_png_the_json_does_not_know(tmp_path):
    pan, info = random_panoptic(np.random.default_rng(5))
    png, js = write_panoptic(tmp_path / "a.png", tmp_path / "a.json", pan, info, IMAGE, list(CATEGORIES))
    other = tmp_path / "b.png"
    other.write_bytes(png.read_bytes())
    with pytest.raises(ValueError, match="0 annotations for 'b.png'"):
        read_panoptic(other, js)
    write_semantic_png(tmp_path / "l.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="'P' image"):
        read_panoptic(tmp_path / "l.png", js)


def test_semantic_png_is_a_voc_palette_image(tmp_path):
    labels = np.arange(256, dtype=np.int64).reshape(16, 16)
    labels[0, :4] = 0
    path = write_semantic_png(tmp_path / "sem" / "a.png", labels)
    with Image.open(path) as img:
        assert img.mode == "P" and img.format == "PNG"
        assert np.array_equal(np.asarray(img), labels)
        palette = np.array(img.getpalette()[: 256 * 3], np.uint8).reshape(256, 3)
        assert np.array_equal(palette, voc_palette(256))
        rgb = np.asarray(img.convert("RGB"))
    assert rgb[0, 0].tolist() == [0, 0, 0], "unlabelled is black"
    assert rgb[0, 5].tolist() == voc_palette(256)[5].tolist() == [128, 0, 128]
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]


def test_semantic_png_of_more_than_255_classes_is_16_bit(tmp_path):
    labels = np.array([[0, 3], [255, 300]], np.int64)
    path = write_semantic_png(tmp_path / "a.png", labels)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # 16-bit grayscale, the labels themselves
        assert np.array_equal(np.asarray(img), labels)


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.full((2, 2), 65536), "label 65536"),
        (np.full((2, 2), -1), "label -1"),
        (np.zeros((2, 2, 3), np.uint8), r"\[H, W\]"),
        (np.zeros((2, 2), np.float32), "integer"),
    ],
)
def test_semantic_png_rejects_bad_labels(tmp_path, labels, message):
    with pytest.raises(ValueError, match=message):
        write_semantic_png(tmp_path / "a.png", labels)
    assert not (tmp_path / "a.png").exists()


def assert_panopticapi_files(png, js):
    """What panopticapi's pq_compute relies on, checked from the files alone: the PNG's ids
    (R + 256 G + 256^2 B, Pillow and the formula) are exactly the JSON's, each segment's area and
    XYWH bbox are its pixels', its category exists and carries ``isthing``, and the annotation
    names the PNG. Returns (ids, segments_info, categories by id)."""
    data = json.loads(js.read_text())
    (ann,) = data["annotations"]
    assert ann["file_name"] == png.name
    (image,) = data["images"]
    with Image.open(png) as img:
        assert img.mode == "RGB" and img.format == "PNG"
        rgb = np.asarray(img).astype(np.int64)
    assert rgb.shape[:2] == (image["height"], image["width"])
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    cats = {c["id"]: c for c in data["categories"]}
    assert all(c["isthing"] in (0, 1) and c["name"] for c in cats.values())
    segments = ann["segments_info"]
    assert len({s["id"] for s in segments}) == len(segments)
    assert {s["id"] for s in segments} == set(np.unique(ids).tolist()) - {0}
    for s in segments:
        mask = ids == s["id"]
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert s["area"] == int(mask.sum()) > 0
        assert s["bbox"] == [int(v) for v in mask_utils.toBbox(rle)]
        assert s["category_id"] in cats and s["iscrowd"] in (0, 1)
    return ids, segments, cats


def test_segment_samcp_outputs_follow_panopticapi(tmp_path):
    """``samantic segment --samcp`` (a small random head on sam_nano's patches of one v2 scene)."""
    import torch
    from typer.testing import CliRunner

    from samantic.cli.main import app
    from samantic.heads.samcp import SamcpHead, SamcpInfo, save_samcp
    from samantic.train.data.panoptic import STUFF_CLASSES, THING_CLASSES

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        head = SamcpHead(SamcpInfo(classes=THING_CLASSES, stuff=STUFF_CLASSES, model="sam_nano", d_model=32, heads=2,
                                   layers=1, encoder_layers=1, ffn_dim=64, roi_channels=8,
                                   backbone_channels=(8, 16, 16, 32), input_size=128))
        path = save_samcp(head, tmp_path / "samcp.safetensors", {"patches": json.dumps(
            {"points_per_side": 8, "pred_iou_thresh": 0.3, "stability_score_thresh": 0.5})})
        Image.fromarray(render_panoptic(11, size=(96, 128)).image).save(tmp_path / "a.png")
        r = CliRunner().invoke(app, ["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--samcp",
                                     str(path), "--score-thresh", "0", "--no-progress"])
    finally:
        torch.set_num_threads(n)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    ids, segments, cats = assert_panopticapi_files(out / "a.png.panoptic.png", out / "a.png.panoptic.json")
    assert segments
    names = THING_CLASSES + STUFF_CLASSES
    assert [cats[i]["name"] for i in sorted(cats)] == list(names)
    assert [cats[i]["isthing"] for i in sorted(cats)] == [1] * len(THING_CLASSES) + [0] * len(STUFF_CLASSES)
    stuff = [s["category_id"] for s in segments if not cats[s["category_id"]]["isthing"]]
    assert len(stuff) == len(set(stuff)), "one segment per stuff class"
    # the semantic PNG is the same map by category
    sem = np.asarray(Image.open(out / "a.png.semantic.png"))
    for s in segments:
        assert (sem[ids == s["id"]] == s["category_id"]).all()
    assert (sem[ids == 0] == 0).all()


def test_written_files_follow_panopticapi(tmp_path):
    pan, info = random_panoptic(np.random.default_rng(6))
    png, js = write_panoptic(tmp_path / "c.png", tmp_path / "c.json", pan, info, IMAGE, list(CATEGORIES))
    ids, segments, cats = assert_panopticapi_files(png, js)
    assert np.array_equal(ids, pan) and len(segments) == len(info)
    assert cats == {c["id"]: dict(c) for c in CATEGORIES}
