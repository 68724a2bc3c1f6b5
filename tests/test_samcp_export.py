"""SAM-CP in bundles: the exported graphs, the numpy twins of the head's input steps, the torch-free
runtime and ``samantic segment --bundle`` with a SAM-CP head (same panoptic result as torch).

The head here is small and random, with its zero-initialised output layers perturbed so that
affinities and class scores differ between patches (a fresh head scores every patch alike);
what is checked (torch and onnxruntime agree) does not depend on the head being trained.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samantic.export.bundle import export_bundle
from samantic.heads.samcp import FpnBackbone, SamcpHead, SamcpInfo, load_samcp, mask_to_roi, save_samcp
from samantic.ops import rle_encode, rle_iou
from samantic.pipeline.samcp_inputs import head_boxes, resize_image, roi_align_masks
from samantic.runtime import Bundle, Segmenter
from samantic.runtime.bundle import BundleError
from samantic.train.data.panoptic import STUFF_CLASSES, THING_CLASSES, render_panoptic

from conftest import BLOCK_TORCH  # noqa: E402

onnxruntime = pytest.importorskip("onnxruntime")

SIZE = (96, 128)
PATCHES = {"points_per_side": 8, "pred_iou_thresh": 0.3, "stability_score_thresh": 0.5}
OPTIONS = {"score_thresh": 0.05, "instance_thresh": 0.05, "min_area": 0}
SMALL = dict(d_model=32, heads=2, layers=2, encoder_layers=1, ffn_dim=64, roi_channels=8,
             backbone_channels=(8, 16, 16, 32), input_size=128)


def random_head(seed: int = 0, **kw) -> SamcpHead:
    torch.manual_seed(seed)
    info = SamcpInfo(classes=THING_CLASSES, stuff=STUFF_CLASSES, extra={"patches": json.dumps(PATCHES)},
                     **{"model": "sam_nano", **SMALL, **kw})
    head = SamcpHead(info).eval()
    with torch.no_grad():
        for aff in head.affinity:  # zero-initialised last layers: every patch would score the same
            aff.head_mlp[-1].weight.normal_(0, 2.0)
            aff.patch_bias.weight.normal_(0, 0.5)
        head.logit_scale.fill_(np.log(30.0))
        head.presence.weight.normal_(0, 1.0)
        if head.roi_embed.texture_mlp is not None:  # zero-initialised too
            head.roi_embed.texture_mlp[-1].weight.normal_(0, 1.0)
    return head


@pytest.fixture(scope="module")
def head():
    return random_head()


@pytest.fixture(scope="module")
def nano():
    from samantic.models import create_model

    return create_model("sam_nano")


@pytest.fixture(scope="module")
def samcp_bundle(nano, head, tmp_path_factory):
    root = tmp_path_factory.mktemp("samcp_bundle")
    path = save_samcp(head, root / "samcp.safetensors")
    return export_bundle(nano, root / "bundle", samcp=path, int8=False, torch_weights=True), path


# -- the numpy twins of the head's input steps ---------------------------------------------------


@pytest.mark.parametrize("hw", [(480, 640), (300, 200), (128, 40), (77, 1000), (33, 20), (1, 1), (128, 128), (2, 900)])
def test_resize_image_equals_the_heads_torch_resize(hw):
    rng = np.random.default_rng(sum(hw))
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    h = random_head()
    ours, (sx, sy) = resize_image(image, h.info.input_size)
    ref, boxes = h.resize_input(torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None],
                                [torch.tensor([[2.0, 3.0, 10.0, 12.0]])])
    assert ours.shape == tuple(ref.shape)
    np.testing.assert_allclose(ours, ref.numpy(), atol=5e-5)
    np.testing.assert_allclose(np.array([2 * sx, 3 * sy, 10 * sx, 12 * sy]), boxes[0][0].numpy(), rtol=1e-5)


def test_roi_align_masks_equals_torchvision():
    rng = np.random.default_rng(3)
    for h, w in [(120, 160), (37, 53), (1, 9)]:
        masks = np.zeros((12, h, w), bool)
        for m in masks:
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            y1, x1 = rng.integers(y0, h) + 1, rng.integers(x0, w) + 1
            m[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.7
            m[y0, x0] = True
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
        b = head_boxes(np.array(boxes))
        b[0] += [-6.0, -6.0, 25.0, 25.0]  # reaching outside the image
        ours = roi_align_masks(rle_encode(masks), b, 7)
        ref = mask_to_roi(torch.from_numpy(masks.astype(np.uint8)), torch.from_numpy(b), 7).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert roi_align_masks([], np.zeros((0, 4)), 7).shape == (0, 7, 7)
    with pytest.raises(ValueError, match="boxes must be"):
        roi_align_masks(rle_encode(masks), np.zeros((2, 4)), 7)


# -- the graphs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_size,texture,smooth", [(0, 0, "conv"), (14, 0, "conv"), (14, 6, "conv"),
                                                       (14, 6, "separable")])
def test_exported_graphs_equal_the_torch_head(head, mask_size, texture, smooth, tmp_path):
    from samantic.export.samcp import export_samcp

    if mask_size:  # the patch masks at a finer grid than the 7 x 7 RoI (+ texture statistics of the finest level,
        # + the FPN's separable smoothing)
        head = random_head(mask_size=mask_size, texture_channels=texture, fpn_smooth=smooth)
    m = head.info.mask_side
    paths = export_samcp(head, tmp_path)
    sess = {g: onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            for g, p in paths.items() if g != "queries"}
    rng = np.random.default_rng(0)
    for h, w in [(96, 128), (128, 77)]:
        image = torch.from_numpy(rng.random((1, 3, h, w), dtype=np.float32))
        with torch.no_grad():
            feats = head.features(image)
        got = sess["samcp_backbone"].run(None, {"image": image.numpy()})
        for a, b in zip(got, feats):
            np.testing.assert_allclose(a, b.numpy(), atol=1e-4)
        for p in (1, 9, 60):  # one patch, a few, many; the graphs were traced with 5
            xy = rng.random((p, 2)) * [w * 0.7, h * 0.7]
            boxes = torch.from_numpy(np.concatenate([xy, xy + 2 + rng.random((p, 2)) * [w * 0.3, h * 0.3]], 1)
                                     .astype(np.float32))
            roi = torch.from_numpy(rng.random((p, m, m), dtype=np.float32))
            with torch.no_grad():
                tokens, pos, valid = head.encode_patches(feats, [boxes], [roi], (h, w))
                out = head.decode(tokens, pos, valid)
            feeds = {f"feat{i}": f for i, f in enumerate(got)}
            feeds.update(boxes=boxes.numpy(), roi_masks=roi.numpy(), image_hw=np.array([h, w], np.float32))
            t, ps = sess["samcp_patches"].run(None, feeds)
            np.testing.assert_allclose(t, tokens.numpy(), atol=1e-4)
            np.testing.assert_allclose(ps, pos.numpy(), atol=1e-4)
            q = head.class_queries().detach().numpy()
            aff, cls, pres = sess["samcp_decoder"].run(None, {"tokens": t, "pos": ps, "class_queries": q})
            c = head.info.num_classes
            np.testing.assert_allclose(aff, out.affinity[-1][0].sigmoid().numpy(), atol=1e-4)
            np.testing.assert_allclose(cls, out.class_logits[-1][0, :, :c].sigmoid().numpy(), atol=1e-4)
            np.testing.assert_allclose(pres, out.presence_logits[-1][0].sigmoid().numpy(), atol=1e-4)


def test_export_refuses_a_backbone_it_does_not_cover(tmp_path):
    from samantic.export.samcp import export_samcp_graph
    from samantic.heads.samcp import SmallCnn

    body = SmallCnn((8, 16, 16, 32))

    class ThreeLevels(torch.nn.Module):
        def forward(self, x):
            return body(x)[:3]

    info = SamcpInfo(classes=("a",), backbone="custom:three", **{k: v for k, v in SMALL.items()
                                                                if k != "backbone_channels"})
    head = SamcpHead(info, backbone=FpnBackbone(ThreeLevels(), (8, 16, 16), (4, 8, 16), 32))
    with pytest.raises(ValueError, match="4-level FPN"):
        export_samcp_graph(head, "samcp_backbone", tmp_path / "x.onnx")


# -- bundles ---------------------------------------------------------------------------------------


def test_bundle_records_the_samcp_head(samcp_bundle, head):
    bundle_dir, _ = samcp_bundle
    b = Bundle.load(bundle_dir)
    sc = b.samcp
    assert sc["classes"] == list(THING_CLASSES) and sc["stuff"] == list(STUFF_CLASSES)
    assert sc["patches"] == PATCHES and sc["model"] == "sam_nano"
    for k, v in PATCHES.items():  # segment-everything defaults to the patches the head was trained on
        assert b.thresholds[k] == v
    for rel in ("samcp_backbone.onnx", "samcp_patches.onnx", "samcp_decoder.onnx", "samcp_queries.safetensors",
                "samcp.safetensors"):
        assert rel in b.manifest["files"]
    from samantic.runtime.samcp import read_queries

    q, text = read_queries(b)
    np.testing.assert_allclose(q, head.class_queries().detach().numpy())
    assert text is None
    for dim in ("P", "C", "H", "W", "H0", "W3"):
        assert dim in b.profiles


def test_check_trt_passes_the_samcp_graphs(samcp_bundle):
    from samantic.export.tensorrt import check_trt

    findings = check_trt(samcp_bundle[0])
    samcp = [f for f in findings if f.graph.startswith("samcp")]
    assert {f.graph for f in samcp} == {"samcp_backbone", "samcp_patches", "samcp_decoder"}
    assert not [f for f in samcp if f.severity == "error"], [str(f) for f in samcp]


def test_a_tampered_query_file_is_refused(samcp_bundle, tmp_path):
    import shutil

    dst = tmp_path / "b"
    shutil.copytree(samcp_bundle[0], dst)
    with open(dst / "samcp_queries.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(BundleError, match="samcp_queries.safetensors.*corrupt"):
        Segmenter.from_bundle(dst, backend="onnxruntime")


def test_a_head_for_another_model_is_refused(head, tmp_path):
    other = random_head(model="sam_vit_b")
    with pytest.raises(ValueError, match="trained on patches of sam_vit_b"):
        export_bundle("sam_nano", tmp_path / "b", samcp=other, int8=False)


def test_a_head_trained_on_other_weights_is_exported_with_a_warning(tmp_path):
    from samantic.pipeline.panoptic import SamcpWeightsWarning

    other = random_head()
    other.info.extra["sam_state_sha256"] = "0" * 64  # trained on patches of some other sam_nano weights
    with pytest.warns(SamcpWeightsWarning, match="other weights"):
        export_bundle("sam_nano", tmp_path / "b", samcp=other, int8=False)


def _match(ref, ours) -> float:
    """Fraction of the reference's segments with a partner of the same class at IoU >= 0.99."""
    if not ref.instances:
        return 1.0 if not ours.instances else 0.0
    if not ours.instances:
        return 0.0
    iou = np.asarray(rle_iou([r["segmentation"] for r in ref.instances], [r["segmentation"] for r in ours.instances]))
    ok = 0
    for i, r in enumerate(ref.instances):
        j = int(iou[i].argmax())
        ok += iou[i, j] >= 0.99 and ours.instances[j]["category"] == r["category"]
    return ok / len(ref.instances)


def test_onnxruntime_segments_equal_torch(samcp_bundle):
    bundle_dir, _ = samcp_bundle
    ort = Segmenter.from_bundle(bundle_dir, backend="onnxruntime", threads=1, samcp_options=OPTIONS)
    ref = Segmenter.from_bundle(bundle_dir, backend="torch", samcp_options=OPTIONS)
    assert ort.samcp.scorer.backend == "onnxruntime" and ref.samcp.scorer.backend == "torch"
    total = matched = 0.0
    for seed in (0, 1, 2):
        image = render_panoptic(seed, size=SIZE).image
        a, b = ref(image), ort(image)
        assert len(b.masks) == len(a.masks)
        total += len(a.instances)
        matched += _match(a, b) * len(a.instances)
        assert {s["category_name"] for s in a.segments_info} == {s["category_name"] for s in b.segments_info}
    assert total >= 3  # the random head does name segments
    assert matched / total >= 0.99


@pytest.mark.parametrize("texture", [0, 6])
def test_a_head_with_finer_patch_masks_runs_the_same_in_its_bundle(nano, tmp_path, texture):
    """mask_size 14: the manifest records it and the torch-free runtime resamples the patches to it (a head with
    texture statistics too: they are in the patches graph)."""
    head = random_head(seed=3, mask_size=14, texture_channels=texture)
    path = save_samcp(head, tmp_path / "samcp14.safetensors")
    assert load_samcp(path).info.mask_side == 14 and load_samcp(path).info.texture_channels == texture
    bundle_dir = export_bundle(nano, tmp_path / "bundle", samcp=path, int8=False, torch_weights=True)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert (manifest["samcp"]["mask_size"], manifest["samcp"]["roi_size"]) == (14, 7)
    ort = Segmenter.from_bundle(bundle_dir, backend="onnxruntime", threads=1, samcp_options=OPTIONS)
    ref = Segmenter.from_bundle(bundle_dir, backend="torch", samcp_options=OPTIONS)
    assert ort.samcp.scorer.mask_size == 14
    image = render_panoptic(1, size=SIZE).image
    a, b = ref(image), ort(image)
    assert len(a.instances) >= 1 and len(b.masks) == len(a.masks)
    assert _match(a, b) >= 0.99


def test_mask_size_must_be_a_multiple_of_the_roi_grid():
    for bad in (5, -7, 10):
        with pytest.raises(ValueError, match="mask_size must be 0 or a positive multiple"):
            SamcpInfo(classes=("a",), mask_size=bad)
    assert SamcpInfo(classes=("a",)).mask_side == 7 and SamcpInfo(classes=("a",), mask_size=21).mask_side == 21


def test_classes_filter_on_a_bundle(samcp_bundle):
    seg = Segmenter.from_bundle(samcp_bundle[0], backend="onnxruntime", classes=["wall", "star"],
                                samcp_options=OPTIONS)
    res = seg(render_panoptic(1, size=SIZE).image)
    assert {r["category"] for r in res.instances} <= {"wall", "star"}
    with pytest.raises(ValueError, match="unknown class name"):
        Segmenter.from_bundle(samcp_bundle[0], backend="onnxruntime", classes=["blob"])


def test_segment_cli_runs_a_samcp_bundle_without_torch(samcp_bundle, tmp_path):
    """`samantic segment --bundle` (SAM-CP) in a process where torch cannot be imported writes the
    same panoptic segments as `samantic segment --samcp` on torch, and valid COCO panoptic files."""
    bundle_dir, head_file = samcp_bundle
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_TORCH)
    images = tmp_path / "in"
    images.mkdir()
    for s in (0, 1):
        Image.fromarray(render_panoptic(s, size=SIZE).image).save(images / f"scene{s}.png")
    (images / "broken.png").write_bytes(b"not a png")
    exe = str(Path(sys.executable).with_name("samantic"))
    flags = ["--score-thresh", str(OPTIONS["score_thresh"]), "--no-progress"]
    proc = subprocess.run([exe, "segment", str(images), "--bundle", str(bundle_dir), "--backend", "onnxruntime",
                           "--out", str(tmp_path / "ort"), *flags], env=dict(os.environ, PYTHONPATH=str(blocker)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the broken file fails, the rest is done
    assert "broken.png" in proc.stderr
    ckpt = bundle_dir / Bundle.load(bundle_dir).manifest["torch_weights"]["file"]
    proc = subprocess.run([exe, "segment", str(images / "scene0.png"), str(images / "scene1.png"), "--model",
                           "sam_nano", "--checkpoint", str(ckpt), "--samcp", str(head_file),
                           "--out", str(tmp_path / "torch"), *flags], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from pycocotools import mask as mask_utils

    from samantic.io.panoptic import read_panoptic

    n = 0
    for s in (0, 1):
        ort = json.loads((tmp_path / "ort" / f"scene{s}.png.json").read_text())
        ref = json.loads((tmp_path / "torch" / f"scene{s}.png.json").read_text())
        assert ort["backend"] == "onnxruntime"
        o = [{**a["segmentation"], "counts": a["segmentation"]["counts"].encode()} for a in ort["annotations"]]
        r = [{**a["segmentation"], "counts": a["segmentation"]["counts"].encode()} for a in ref["annotations"]]
        assert len(o) == len(r)
        if r:
            iou = np.atleast_2d(mask_utils.iou(o, r, [0] * len(r)))
            best = iou.argmax(0)
            assert all(iou[best[j], j] >= 0.99 and ort["annotations"][best[j]]["category_name"] ==
                       ref["annotations"][j]["category_name"] for j in range(len(r)))
        n += len(r)
        pan, segments = read_panoptic(tmp_path / "ort" / f"scene{s}.png.panoptic.png",
                                      tmp_path / "ort" / f"scene{s}.png.panoptic.json")
        ids = sorted(int(v) for v in np.unique(pan) if v)
        assert ids == sorted(seg["id"] for seg in segments) and len(ids) == len(o)
    assert n >= 2


def test_label_boxes_and_areas_equal_a_per_label_scan():
    from samantic.pipeline.panoptic import _label_boxes

    rng = np.random.default_rng(5)
    for h, w, n in [(40, 60, 7), (1, 30, 3), (25, 1, 2), (50, 50, 0)]:
        labels = rng.integers(0, n + 1, (h, w)).astype(np.int32)
        if n:
            labels[labels == n] = 0  # one label absent
        boxes, areas = _label_boxes(labels, n)
        within = np.zeros((n + 1, 4), np.int64)  # any box holding the label: the true one, widened
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            if len(ys):
                within[k] = [max(xs.min() - 2, 0), ys.min(), xs.max(), min(ys.max() + 3, h - 1)]
        boxes2, areas2 = _label_boxes(labels, n, within)
        assert (boxes2 == boxes).all() and (areas2 == areas).all()
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            assert areas[k] == len(ys)
            if len(ys):
                assert boxes[k].tolist() == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            else:
                assert boxes[k].tolist() == [0, 0, 0, 0]
