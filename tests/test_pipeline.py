"""samantic's AutomaticMaskGenerator against segment-anything's SamAutomaticMaskGenerator, side by side.

Stated tolerance (the pipeline issue): >= 99% of reference masks matched one-to-one at
mask IoU >= 0.99, predicted IoU and stability within 1e-3, mask counts within 1%.
"""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator

from samantic.models import create_model
from samantic.pipeline import AmgConfig, AutomaticMaskGenerator, ScoredMasks
from samantic.pipeline.prompts import crop_boxes, layer_point_grids, near_crop_edge, point_grid


@pytest.fixture(scope="module")
def nano(structured_nano):
    return structured_nano


def _images():
    from skimage import data

    from conftest import disk_image

    astronaut = data.astronaut()[::2, ::2].copy()  # 256 x 256
    return {"astronaut": astronaut, "disks": disk_image(101), "disks-odd": disk_image(102, (199, 301))}


IMAGES = _images()


def _to_rle(seg, mode, shape):
    if mode == "binary_mask":
        return mask_utils.encode(np.asfortranarray(seg.astype(np.uint8)))
    if mode == "uncompressed_rle":
        return mask_utils.frPyObjects(seg, *seg["size"])
    return seg


def assert_equivalent(ref, ours, mode="coco_rle", shape=None):
    assert abs(len(ours) - len(ref)) <= max(1, round(0.01 * len(ref))), (len(ours), len(ref))
    if not ref:
        return
    r_rles = [_to_rle(r["segmentation"], mode, shape) for r in ref]
    o_rles = [_to_rle(o["segmentation"], mode, shape) for o in ours]
    iou = mask_utils.iou(o_rles, r_rles, [0] * len(r_rles))  # [ours, ref]
    iou = np.atleast_2d(iou)
    matched = 0
    used = set()
    for j in range(len(ref)):
        i = int(np.argmax(iou[:, j]))
        if iou[i, j] >= 0.99 and i not in used:
            used.add(i)
            matched += 1
            assert abs(ours[i]["predicted_iou"] - ref[j]["predicted_iou"]) <= 1e-3
            assert abs(ours[i]["stability_score"] - ref[j]["stability_score"]) <= 1e-3
            assert ours[i]["crop_box"] == ref[j]["crop_box"]
            assert np.allclose(ours[i]["point_coords"], ref[j]["point_coords"])
            assert ours[i]["area"] == pytest.approx(ref[j]["area"], rel=0.01)
    assert matched >= 0.99 * len(ref), f"{matched}/{len(ref)} reference masks matched at IoU >= 0.99"


SETTINGS = {
    "defaults": dict(points_per_side=8),
    "thresholds-0": dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0),
    "relaxed": dict(points_per_side=8, pred_iou_thresh=0.5, stability_score_thresh=0.6),
    "crops": dict(points_per_side=6, crop_n_layers=1, pred_iou_thresh=0.0, stability_score_thresh=0.0),
    "min-region": dict(points_per_side=8, min_mask_region_area=100, pred_iou_thresh=0.0, stability_score_thresh=0.0),
}


@pytest.mark.parametrize("image_name", sorted(IMAGES))
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_matches_reference_generator(nano, image_name, setting):
    image = IMAGES[image_name]
    kwargs = dict(SETTINGS[setting], output_mode="coco_rle")
    ref = SamAutomaticMaskGenerator(nano, **kwargs).generate(image)
    ours = AutomaticMaskGenerator(nano, **kwargs).generate(image)
    assert_equivalent(ref, ours)


@pytest.mark.parametrize("mode", ["binary_mask", "uncompressed_rle", "coco_rle"])
def test_output_modes_match_reference(nano, mode):
    image = IMAGES["disks"]
    kwargs = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, output_mode=mode)
    ref = SamAutomaticMaskGenerator(nano, **kwargs).generate(image)
    ours = AutomaticMaskGenerator(nano, **kwargs).generate(image)
    assert ref, "the setting must produce masks for this test to mean anything"
    assert set(ours[0]) == set(ref[0])
    if mode == "binary_mask":
        assert ours[0]["segmentation"].dtype == bool and ours[0]["segmentation"].shape == image.shape[:2]
    elif mode == "uncompressed_rle":
        assert isinstance(ours[0]["segmentation"]["counts"], list)
    else:
        assert isinstance(ours[0]["segmentation"]["counts"], str)
    assert_equivalent(ref, ours, mode)


@pytest.mark.slow
def test_true_defaults_match_reference(nano):
    image = IMAGES["disks"]
    ref = SamAutomaticMaskGenerator(nano, output_mode="coco_rle").generate(image)
    ours = AutomaticMaskGenerator(nano, output_mode="coco_rle").generate(image)
    assert_equivalent(ref, ours)


def test_grids_and_crops_match_segment_anything():
    from segment_anything.utils import amg

    for n in (1, 4, 7, 32):
        assert np.array_equal(point_grid(n), amg.build_point_grid(n))
    for args in ((16, 2, 2), (32, 1, 1), (9, 3, 2)):
        ours = layer_point_grids(*args)
        ref = amg.build_all_layer_point_grids(*args)
        assert len(ours) == len(ref) and all(np.array_equal(a, b) for a, b in zip(ours, ref))
    for size in ((480, 640), (1001, 333), (64, 64)):
        for layers in (0, 1, 2):
            assert crop_boxes(size, layers, 512 / 1500) == amg.generate_crop_boxes(size, layers, 512 / 1500)
    rng = np.random.default_rng(0)
    boxes = rng.integers(0, 300, (200, 4))
    boxes[:, 2:] += boxes[:, :2]
    crop, image = [100, 50, 400, 350], [0, 0, 640, 480]
    ref = amg.is_box_near_crop_edge(torch.as_tensor(boxes), crop, image).numpy()
    assert np.array_equal(near_crop_edge(boxes, crop, image), ref) and ref.any() and not ref.all()


def test_config_validation():
    with pytest.raises(ValueError, match="output_mode"):
        AmgConfig(output_mode="png")
    with pytest.raises(ValueError, match="exactly one"):
        AmgConfig(points_per_side=None)
    with pytest.raises(ValueError, match="points_per_batch"):
        AmgConfig(points_per_batch=0)
    assert AmgConfig().replace(points_per_side=8).points_per_side == 8
    with pytest.raises(ValueError, match="unknown"):
        AmgConfig().replace(points_per_sid=8)


def test_bad_images_raise_value_error(nano):
    gen = AutomaticMaskGenerator(nano, points_per_side=2)
    with pytest.raises(ValueError, match="HxWx3"):
        gen.generate(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        gen.generate(np.zeros((10, 10, 3), np.float32))


def test_scorer_drops_masks_before_upscaling_and_carries_fields(nano):
    image = IMAGES["disks"]
    kwargs = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, output_mode="coco_rle")
    calls = []

    def scorer(tokens, iou):
        calls.append(tokens.shape)
        keep = np.arange(len(iou)) % 2 == 0  # drop every other candidate
        return ScoredMasks(keep=keep, fields={"category_id": np.arange(len(iou))})

    plain = AutomaticMaskGenerator(nano, **kwargs)
    plain.generate(image)
    gen = AutomaticMaskGenerator(nano, mask_scorer=scorer, **kwargs)
    records = gen.generate(image)
    assert calls and calls[0][1] == nano.mask_decoder.transformer_dim
    # only the survivors were upscaled
    assert gen.stats["masks_upscaled"] == sum((np.arange(s[0]) % 2 == 0).sum() for s in calls)
    assert gen.stats["masks_upscaled"] < plain.stats["masks_upscaled"]
    assert records and all(r["category_id"] % 2 == 0 for r in records)


@pytest.fixture(scope="module")
def shipped_nano():
    return create_model("sam_nano")  # the trained weights inside the package


@pytest.mark.parametrize("seed", [900001, 900008])
def test_trained_nano_matches_reference_at_its_thresholds(shipped_nano, seed):
    """The shipped nano with default settings except its own recommended thresholds, on held-out scenes."""
    from samantic.train.data.shapes import render_scene

    image = render_scene(seed, size=(384, 512)).image
    kw = dict(shipped_nano.samantic_thresholds, output_mode="coco_rle")
    ref = SamAutomaticMaskGenerator(shipped_nano, **kw).generate(image)
    ours = AutomaticMaskGenerator(shipped_nano, **kw).generate(image)
    assert len(ref) >= 2, "the trained nano keeps masks at these thresholds"
    assert_equivalent(ref, ours)


# (depth, width, heads, mlp): sam_nano's decoder, the official checkpoints' decoder, no layers, only the first layer
TRANSFORMERS = {"nano": (2, 128, 4, 512), "official": (2, 256, 8, 2048), "depth-0": (0, 64, 4, 128),
                "depth-1": (1, 64, 4, 128), "depth-3": (3, 64, 4, 128)}


@pytest.mark.parametrize("arch, batch", [("nano", 1), ("nano", 5), ("official", 3), ("depth-0", 4), ("depth-1", 4),
                                         ("depth-3", 4)])
def test_shared_image_transformer_matches_segment_anything(arch, batch):
    """The folded, image-shared two-way transformer against segment-anything's on the image repeated B times."""
    from segment_anything.modeling import TwoWayTransformer

    from samantic.pipeline.transformer import two_way_transformer

    torch.manual_seed(batch)
    depth, width, heads, mlp = TRANSFORMERS[arch]
    transformer = TwoWayTransformer(depth=depth, embedding_dim=width, num_heads=heads, mlp_dim=mlp)
    with torch.no_grad():  # random biases everywhere, so the folded bias terms are exercised
        for p in transformer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    c = transformer.embedding_dim
    image, pe = torch.randn(1, c, 16, 12), torch.randn(1, c, 16, 12)
    tokens = torch.randn(batch, 7, c)
    with torch.no_grad():
        ref_q, ref_k = transformer(image.repeat(batch, 1, 1, 1), pe.repeat(batch, 1, 1, 1), tokens)
        q, k = two_way_transformer(transformer, image, pe, tokens)
        # a per-prompt image batch (no sharing) takes the same path
        # channels-last makes the flattened image tokens a contiguous view of the caller's tensor
        image_b = image.repeat(batch, 1, 1, 1).contiguous(memory_format=torch.channels_last)
        q2, k2 = two_way_transformer(transformer, image_b, pe, tokens)
        assert torch.equal(image_b, image.repeat(batch, 1, 1, 1))  # the skip connections ran in place, not on inputs
        # a per-prompt positional encoding (distinct per prompt) is not the shared one
        pe_b = torch.randn(batch, c, 16, 12)
        ref_q5, ref_k5 = transformer(image.repeat(batch, 1, 1, 1), pe_b, tokens)
        q5, k5 = two_way_transformer(transformer, image, pe_b, tokens)
        # only some output tokens (the decoder reads the IoU token and the requested mask tokens)
        q3, k3 = two_way_transformer(transformer, image, pe, tokens, out_tokens=[0, 2, 3, 4])
    q4, k4 = two_way_transformer(transformer, image, pe, tokens)  # autograd on: nothing is overwritten in place
    assert q.shape == ref_q.shape and k.shape == ref_k.shape and q3.shape == (batch, 4, c)
    torch.testing.assert_close(q4.detach(), q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k4.detach(), k, atol=1e-6, rtol=1e-6)
    for a, b in ((q, ref_q), (k, ref_k), (q2, ref_q), (k2, ref_k), (q3, ref_q[:, [0, 2, 3, 4]]), (k3, ref_k)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    for a, b in ((q5, ref_q5), (k5, ref_k5)):  # float rounding only (one element of the official width hits 2.3e-5)
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_transformer_export_layout_matches(monkeypatch):
    """The softmax layout an ONNX export takes (prompt tokens on the last axis) computes the same function."""
    from segment_anything.modeling import TwoWayTransformer

    from samantic.pipeline.transformer import two_way_transformer

    torch.manual_seed(3)
    transformer = TwoWayTransformer(depth=2, embedding_dim=64, num_heads=4, mlp_dim=128)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    image, pe, tokens = torch.randn(1, 64, 8, 6), torch.randn(1, 64, 8, 6), torch.randn(5, 7, 64)
    with torch.no_grad():
        ref_q, ref_k = transformer(image.repeat(5, 1, 1, 1), pe.repeat(5, 1, 1, 1), tokens)
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        q, k = two_way_transformer(transformer, image, pe, tokens)
    torch.testing.assert_close(q, ref_q, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(k, ref_k, atol=2e-5, rtol=1e-4)


def test_transformer_under_autocast_runs():
    """bf16 autocast without autograd: the in-place skip connection must not meet mixed dtypes."""
    from segment_anything.modeling import TwoWayTransformer

    from samantic.pipeline.transformer import two_way_transformer

    torch.manual_seed(0)
    transformer = TwoWayTransformer(depth=2, embedding_dim=64, num_heads=4, mlp_dim=128)
    image, pe, tokens = torch.randn(1, 64, 8, 8), torch.randn(1, 64, 8, 8), torch.randn(3, 7, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref_q, _ = transformer(image.repeat(3, 1, 1, 1), pe.repeat(3, 1, 1, 1), tokens)
        q, _ = two_way_transformer(transformer, image, pe, tokens)
    torch.testing.assert_close(q.float(), ref_q.float(), atol=0.1, rtol=0.05)


def test_adaptive_order_goes_coarse_to_fine():
    from samantic.pipeline.prompts import adaptive_order

    order = adaptive_order(8)
    assert sorted(order.tolist()) == list(range(64))
    rows, cols = order // 8, order % 8
    level = np.where((rows % 4 == 0) & (cols % 4 == 0), 0, np.where((rows % 2 == 0) & (cols % 2 == 0), 1, 2))
    assert level.tolist() == sorted(level.tolist())  # every coarse point before any finer one
    assert (level == 0).sum() == 4 and (level == 1).sum() == 12


def test_adaptive_skips_points_inside_confident_masks_and_keeps_the_objects(shipped_nano):
    from samantic.ops import rle_iou

    nano = shipped_nano

    image = IMAGES["disks"]
    settings = dict(points_per_side=16, points_per_batch=16, pred_iou_thresh=0.6, stability_score_thresh=0.9)
    exact = AutomaticMaskGenerator(nano, **settings)
    ex = exact.generate_masks(image)
    adaptive = AutomaticMaskGenerator(nano, adaptive=True, adaptive_iou_thresh=0.8, adaptive_stability_thresh=0.95,
                                      **settings)
    assert (adaptive.config.adaptive_iou_thresh, adaptive.config.adaptive_stability_thresh) == (0.8, 0.95)
    ad = adaptive.generate_masks(image)
    assert exact.stats["points_skipped"] == 0 and exact.stats["points"] == 256
    assert 0 < adaptive.stats["points_skipped"] < adaptive.stats["points"] == 256
    assert adaptive.stats["masks_decoded"] == 3 * (256 - adaptive.stats["points_skipped"])
    assert len(ex) > 0 and len(ad) > 0
    best = rle_iou(ad.rles, ex.rles).max(0)  # each exact mask's best adaptive match
    assert (best >= 0.9).mean() >= 0.8, best


@pytest.mark.parametrize("n", [1, 5, 8, 11, 32])
def test_coarse_parents_are_the_coarser_neighbours(n):
    from samantic.pipeline.prompts import NO_PARENT, OUTSIDE, adaptive_levels, adaptive_order, coarse_parents

    level = adaptive_levels(n)
    parents = coarse_parents(n)
    assert parents.shape == (n * n, 4)
    assert np.array_equal(np.sort(adaptive_order(n)), np.arange(n * n))
    for p in range(n * n):
        i, j = divmod(p, n)
        slots = parents[p][parents[p] != NO_PARENT]
        if level[p] == 0:
            assert len(slots) == 0
            continue
        step = 2 if level[p] == 1 else 1
        # halfway between two coarser points along a row or column (2 parents) or at the centre of four
        assert len(slots) == (4 if (i % (2 * step)) and (j % (2 * step)) else 2)
        inside = slots[slots != OUTSIDE]
        for q in inside:
            qi, qj = divmod(int(q), n)
            assert level[q] < level[p] and abs(qi - i) in (0, step) and abs(qj - j) in (0, step)
        # a slot is OUTSIDE exactly when the parent's row or column lies beyond the grid
        beyond = (i + step >= n and i % (2 * step)) or (j + step >= n and j % (2 * step))
        assert (OUTSIDE in slots) == bool(beyond)


class _HotSpotEngine:
    """A fake engine: predicted IoU 0.9 for points within ``radius`` of ``hot`` (input frame), else 0.1;
    every mask is empty. Records the points it was prompted with."""

    name = "fake"
    img_size = 64
    mask_threshold = 0.0
    pixel_mean = (0.0, 0.0, 0.0)
    pixel_std = (1.0, 1.0, 1.0)

    def __init__(self, hot=(34.0, 34.0), radius=6.0):
        self.hot, self.radius = np.array(hot), radius
        self.prompted = []

    def encode(self, x):
        pass

    def run_prompts(self, coords):
        from samantic.pipeline.engine import PromptOutputs

        self.prompted.extend(map(tuple, np.asarray(coords)))
        near = np.linalg.norm(np.asarray(coords) - self.hot, axis=1) <= self.radius
        iou = np.where(near, 0.9, 0.1).astype(np.float32)[:, None].repeat(3, 1)
        return PromptOutputs(iou, np.zeros((len(coords), 3, 4), np.float32))

    def upscale(self, out, prompt_idx, mask_idx):
        return np.full((len(prompt_idx), 16, 16), -5.0, np.float32)

    def reset(self):
        pass


def _prompted_cells(engine, n=16):
    """Grid (row, col) of every prompted point (grid cell centres at (k + 0.5) * 64 / n)."""
    return {(int(round(y / (64 / n) - 0.5)), int(round(x / (64 / n) - 0.5))) for x, y in engine.prompted}


def test_adaptive_refines_only_around_promising_coarse_points():
    from samantic.pipeline.generator import MaskGenerator

    image = np.zeros((64, 64, 3), np.uint8)
    engine = _HotSpotEngine()
    gen = MaskGenerator(engine, AmgConfig(points_per_side=16, adaptive=True, adaptive_margin=0.15))
    assert gen.generate(image) == []
    cells = _prompted_cells(engine)
    assert len(engine.prompted) == len(cells) == 256 - gen.stats["points_skipped"]
    assert gen.stats["points_skipped"] == gen.stats["points_quiet"] > 128 and gen.stats["points_covered"] == 0
    assert gen.stats["masks_decoded"] == 3 * len(cells)
    # the coarse lattice always; the hot point (8, 8) and every finer point it is a parent of
    assert {(i, j) for i in range(0, 16, 4) for j in range(0, 16, 4)} <= cells
    assert {(8, 8), (6, 8), (10, 8), (8, 6), (6, 6), (10, 10), (7, 8), (9, 9), (7, 7), (8, 9)} <= cells
    # (5, 8) lies between (4, 8) and (6, 8), both cold; (2, 2) between four cold level-0 points
    assert (5, 8) not in cells and (2, 2) not in cells and (1, 1) not in cells
    # the coarse lattice stops at row/column 12: the border rows and columns beyond it are prompted
    assert {(14, 4), (4, 14), (14, 14)} <= cells


@pytest.mark.parametrize("change", [dict(pred_iou_thresh=0.0), dict(adaptive_margin=float("inf")),
                                    dict(pred_iou_thresh=0.2), dict(adaptive=False)])
def test_adaptive_prompts_everything_when_nothing_can_be_ruled_out(change):
    from samantic.pipeline.generator import MaskGenerator

    engine = _HotSpotEngine()
    config = AmgConfig(points_per_side=16, adaptive=True).replace(**change)
    gen = MaskGenerator(engine, config)
    gen.generate(np.zeros((64, 64, 3), np.uint8))
    assert len(engine.prompted) == 256 and gen.stats["points_skipped"] == 0


def test_adaptive_margin_is_validated():
    with pytest.raises(ValueError, match="adaptive_margin"):
        AmgConfig(adaptive_margin=-0.1)
    with pytest.raises(ValueError, match="adaptive_margin"):
        AmgConfig(adaptive_margin=float("nan"))


def test_adaptive_keeps_the_shipped_nanos_masks_on_held_out_scenes(shipped_nano):
    """At the shipped nano's own thresholds, adaptive prompting skips the points inside confident masks
    and those around which nothing came close to the IoU filter, and keeps every mask."""
    from samantic.ops import rle_iou
    from samantic.train.data.shapes import render_scene

    kw = dict(shipped_nano.samantic_thresholds)
    skipped, found, total = 0, 0, 0
    seeds = (900001, 900004, 900006, 900008)  # v8 keeps 6 / 6 / 6 / 7 masks there
    for seed in seeds:
        image = render_scene(seed, size=(480, 640)).image
        exact = AutomaticMaskGenerator(shipped_nano, **kw).generate_masks(image)
        gen = AutomaticMaskGenerator(shipped_nano, adaptive=True, **kw)
        ad = gen.generate_masks(image)
        skipped += gen.stats["points_skipped"]
        total += len(exact)
        if len(exact) and len(ad):
            found += int((rle_iou(ad.rles, exact.rles).max(0) >= 0.9).sum())
    assert total >= 20, "the scenes must have masks at these thresholds for the test to mean anything"
    assert found >= 0.95 * total, (found, total)
    assert skipped >= 0.15 * len(seeds) * 1024, skipped  # v5: 598 of 3072 (284 quiet, 314 covered); v8: 1925 of 4096


class _Square(torch.nn.Module):  # not an activation the pixelwise path knows: the modules run as they are
    def forward(self, x):
        return x * x


@pytest.mark.parametrize("width, activation", [(128, "gelu"), (256, "gelu"), (64, "relu"), (64, "other")])
def test_mask_logits_of_selected_pairs_match_segment_anything(width, activation, monkeypatch):
    """PromptMaskDecoder.masks (pixelwise upscaling on the CPU) against segment-anything's MaskDecoder on the same
    prompts: the selected (prompt, mask) pairs, in any order and with repeats, equal up to float rounding."""
    from types import SimpleNamespace

    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    from samantic.pipeline.decoder import PromptMaskDecoder, _pixelwise_upscaling

    torch.manual_seed(width)
    act = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU, "other": _Square}[activation]
    decoder = MaskDecoder(transformer_dim=width, transformer=TwoWayTransformer(
        depth=2, embedding_dim=width, num_heads=4, mlp_dim=2 * width), activation=act)
    prompts = PromptEncoder(embed_dim=width, image_embedding_size=(12, 10), input_image_size=(48, 40),
                            mask_in_chans=16)
    with torch.no_grad():  # random biases and LayerNorm affine terms, so every term of the rewrite is exercised
        for p in list(decoder.parameters()) + list(prompts.parameters()):
            p.add_(0.2 * torch.randn_like(p))
    emb = torch.randn(1, width, 12, 10)
    coords, labels = torch.rand(6, 1, 2) * torch.tensor([40.0, 48.0]), torch.ones(6, 1, dtype=torch.int)
    ours = PromptMaskDecoder(SimpleNamespace(mask_decoder=decoder, prompt_encoder=prompts))
    prompt_idx = torch.tensor([4, 0, 4, 2, 0, 5, 4])
    mask_idx = torch.tensor([2, 0, 0, 1, 0, 2, 2])
    with torch.no_grad():
        sparse, dense = prompts(points=(coords, labels), boxes=None, masks=None)
        ref, ref_iou = decoder(emb, prompts.get_dense_pe(), sparse, dense, multimask_output=True)
        out = ours.run(emb, coords, labels)
        logits = ours.masks(out, prompt_idx, mask_idx)
        pixelwise = _pixelwise_upscaling(decoder.output_upscaling, out.src)
        assert _pixelwise_upscaling(decoder.output_upscaling, out.src.double()) is None
    assert _pixelwise_upscaling(decoder.output_upscaling, out.src) is None  # autograd on: the modules
    assert (pixelwise is not None) == (activation != "other")
    assert logits.shape == (7, 48, 40)
    # the random weights give logits in the hundreds: float rounding relative to their scale
    scale = float(ref.abs().max())
    torch.testing.assert_close(out.iou_preds, ref_iou, atol=5e-5 * float(ref_iou.abs().max()), rtol=0)
    torch.testing.assert_close(logits, ref[prompt_idx, mask_idx], atol=5e-5 * scale, rtol=0)
    torch.testing.assert_close(logits[0], logits[6])  # a repeated pair
    # against the modules run on the same transformer output: the upscaling rewrite alone
    monkeypatch.setattr("samantic.pipeline.decoder._pixelwise_upscaling", lambda *a: None)
    with torch.no_grad():
        modules = ours.masks(out, prompt_idx, mask_idx)
        assert ours.masks(out, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)).shape == (0, 48, 40)
    torch.testing.assert_close(logits, modules, atol=1e-6 * scale, rtol=0)
    # indices outside the outputs are an error on both paths, never uninitialised logits
    monkeypatch.undo()
    with torch.no_grad():
        for pi, mi in (([0, 2], [0, 3]), ([6], [0]), ([0], [-1]), ([0, 1], [0])):
            with pytest.raises(IndexError):
                ours.masks(out, torch.tensor(pi), torch.tensor(mi))
