"""Convolutional image encoders (sam_nano v5 candidates) and the trainer's batched decoding."""

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from samantic.models import create_model, get_config, save_checkpoint
from samantic.models.configs import SamConfig

CONV = ["sam_nano", "sam_nano_conv", "sam_nano_conv512"]


@pytest.mark.parametrize("name", CONV)
def test_conv_candidates_are_sams_with_the_right_embedding(name):
    config = get_config(name)
    torch.manual_seed(0)
    model = create_model(name, pretrained=False)
    side = config.img_size // config.patch_size
    with torch.no_grad():
        emb = model.image_encoder(torch.randn(2, 3, config.img_size, config.img_size))
    assert emb.shape == (2, config.prompt_embed_dim, side, side)
    assert torch.isfinite(emb).all()
    # the decoder and prompt encoder are sam_nano's, so shapes of everything but the encoder agree
    nano = create_model("sam_nano_vit").state_dict()
    ours = model.state_dict()
    for k, v in ours.items():
        if not k.startswith("image_encoder."):
            assert nano[k].shape == v.shape, k


def test_conv_model_runs_in_segment_anythings_tools(tmp_path):
    torch.manual_seed(0)
    model = create_model("sam_nano_conv", pretrained=False)
    image = np.random.default_rng(0).integers(0, 256, size=(90, 130, 3), dtype=np.uint8)
    predictor = SamPredictor(model)
    predictor.set_image(image)
    masks, scores, low = predictor.predict(point_coords=np.array([[60.0, 40.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 90, 130) and low.shape == (3, 96, 96)
    records = SamAutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0).generate(image)
    assert records and records[0]["segmentation"].shape == (90, 130)
    # saved and loaded through the registry, strictly, with the same outputs
    path = save_checkpoint(model, tmp_path / "conv.safetensors")
    again = create_model("sam_nano_conv", checkpoint=path)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        torch.testing.assert_close(again.image_encoder(x), model.image_encoder(x))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"encoder_type": "cnn"}, "encoder_type must be"),
        ({"encoder_widths": (32, 64)}, "4 encoder_widths"),
        ({"patch_size": 32, "img_size": 384}, "must be 8 or 16"),
        ({"img_size": 400}, "multiple of"),
        ({"encoder_num_heads": 3}, "divisible by encoder_num_heads"),
    ],
)
def test_invalid_conv_configs(change, message):
    with pytest.raises(ValueError, match=message):
        get_config("sam_nano_conv", **change)


def test_vit_config_refuses_conv_fields_and_old_json_still_loads():
    with pytest.raises(ValueError, match="encoder_type='conv' only"):
        get_config("sam_nano_vit", encoder_widths=(1, 2, 3, 4))
    old = {k: v for k, v in get_config("sam_nano_vit").to_dict().items()
           if k not in ("encoder_type", "encoder_widths", "encoder_blocks")}
    assert SamConfig.from_dict(old) == get_config("sam_nano_vit")  # checkpoints written before the conv fields
    conv = get_config("sam_nano_conv")
    assert SamConfig.from_json(conv.to_json()) == conv


@pytest.mark.parametrize("multimask", [True, False])
def test_batched_decoding_matches_segment_anythings_decoder(multimask):
    """decode_prompts (one embedding per prompt, many images) == MaskDecoder image by image."""
    from samantic.train.sam import decode_prompts

    torch.manual_seed(0)
    model = create_model("sam_nano_vit")
    emb = torch.randn(2, 128, 24, 24)
    index = torch.tensor([0, 0, 1, 1, 1])
    coords = torch.rand(5, 2, 2) * 384
    labels = torch.tensor([[1, 0], [1, 1], [1, 0], [0, 1], [1, 1]])
    masks_in = torch.randn(5, 1, 96, 96)
    pe = model.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=masks_in)
        got_masks, got_iou = decode_prompts(model.mask_decoder, emb[index], pe, sparse, dense, multimask)
        again = decode_prompts(model.mask_decoder, emb[index], pe, sparse, dense, multimask, return_tokens=True)
        torch.testing.assert_close(again[0], got_masks, rtol=0, atol=0)
        got_tokens = again[2]
        dec = model.mask_decoder
        assert got_tokens.shape == (5, 3 if multimask else 1, dec.transformer_dim)
        seen = []  # the output mask tokens segment-anything's decoder computes: its transformer's token outputs
        hook = dec.transformer.register_forward_hook(lambda m, i, o: seen.append(o[0][:, 1 : 1 + dec.num_mask_tokens]))
        for img in (0, 1):
            sel = index == img
            ref_masks, ref_iou = model.mask_decoder(image_embeddings=emb[img : img + 1], image_pe=pe,
                                                    sparse_prompt_embeddings=sparse[sel],
                                                    dense_prompt_embeddings=dense[sel], multimask_output=multimask)
            torch.testing.assert_close(got_masks[sel], ref_masks, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got_iou[sel], ref_iou, rtol=1e-4, atol=1e-4)
            ref_tokens = seen[-1][:, 1:] if multimask else seen[-1][:, :1]
            torch.testing.assert_close(got_tokens[sel], ref_tokens, rtol=1e-4, atol=1e-4)
        hook.remove()


def test_preparer_gives_low_res_soft_masks_and_boxes():
    from samantic.train.sam import Preparer, Sample, SamTrainConfig

    image = np.zeros((200, 100, 3), np.uint8)
    masks = np.zeros((2, 200, 100), bool)
    masks[0, 20:60, 10:50] = True
    masks[1, 100:180, 40:90] = True
    prep = Preparer(384, 96, SamTrainConfig(zoom_prob=0.0, masks_per_image=8))
    item = prep(Sample(image, masks), np.random.default_rng(0), 0)
    assert item.image.shape == (384, 192, 3)
    assert item.soft.shape == (2, 96, 96) and item.soft.dtype == np.float16
    # areas survive the resize (x1.92) and the 4x4 area-average
    areas = sorted(float(s.astype(np.float32).sum()) * 16 for s in item.soft)
    assert areas == pytest.approx(sorted([40 * 40 * 1.92 ** 2, 80 * 50 * 1.92 ** 2]), rel=0.08)
    assert (item.soft[:, :, 48:] == 0).all()  # the padding holds nothing
    assert item.boxes.shape == (2, 4) and (item.boxes[:, 2] > item.boxes[:, 0]).all()


def test_time_budget_stops_training_and_decays_the_rate(tmp_path):
    from conftest import DiskWorld

    from samantic.train.sam import SamTrainConfig, SamTrainer

    cfg = SamTrainConfig(steps=10_000, images_per_step=1, masks_per_image=1, iterations=1, warmup_steps=0,
                         time_budget=3.0, log_every=1, checkpoint_every=1000)
    trainer = SamTrainer(create_model("sam_nano_conv", pretrained=False), cfg, DiskWorld(disks=1, n=4))
    assert trainer.lr_at(5, 0.0) == pytest.approx(cfg.lr, rel=1e-3)
    assert trainer.lr_at(5, 3.0) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    result = trainer.train(tmp_path / "m.safetensors", progress=False)
    assert 0 < result.steps < 10_000
    assert result.history[-1]["seconds"] >= 3.0
    with pytest.raises(ValueError, match="time_budget"):
        SamTrainConfig(time_budget=-1)


def test_shipped_nano_carries_recommended_thresholds_and_other_weights_do_not(tmp_path):
    from samantic.models import get_model_entry, recommended_thresholds
    from samantic.models.registry import SAM_THRESHOLDS
    from samantic.runtime import Segmenter

    entry = get_model_entry("sam_nano")
    assert set(entry.thresholds) == {"pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"}
    shipped = create_model("sam_nano")
    assert recommended_thresholds(shipped) == entry.thresholds
    seg = Segmenter(shipped)
    assert (seg.config.pred_iou_thresh, seg.config.stability_score_thresh, seg.config.box_nms_thresh) == (
        entry.thresholds["pred_iou_thresh"], entry.thresholds["stability_score_thresh"],
        entry.thresholds["box_nms_thresh"])
    assert Segmenter(shipped, pred_iou_thresh=0.7).config.pred_iou_thresh == 0.7  # the user's word wins
    # weights other than the shipped ones, and models without a recommendation: segment-anything's
    path = save_checkpoint(shipped, tmp_path / "mine.safetensors")
    assert recommended_thresholds(create_model("sam_nano", checkpoint=path)) == SAM_THRESHOLDS
    assert recommended_thresholds(create_model("sam_nano", pretrained=False)) == SAM_THRESHOLDS
    with torch.device("meta"):
        assert recommended_thresholds(create_model("sam_vit_b")) == SAM_THRESHOLDS


def test_register_model_refuses_bad_thresholds():
    from samantic.models import register_model

    with pytest.raises(ValueError, match="thresholds take"):
        register_model(thresholds={"pred_iou": 0.5})
    with pytest.raises(ValueError, match="thresholds take"):
        register_model(thresholds={"pred_iou_thresh": 1.5})
    with pytest.raises(ValueError, match="optionally \\('box_nms_thresh',\\)"):
        register_model(thresholds={"pred_iou_thresh": 0.5, "box_nms_thresh": 0.3})  # the pair is needed
    with pytest.raises(ValueError, match="thresholds take"):
        register_model(thresholds={"pred_iou_thresh": 0.5, "stability_score_thresh": 0.9, "box_nms_thresh": 2})
    assert callable(register_model(thresholds={"pred_iou_thresh": 0.5, "stability_score_thresh": 0.9,
                                               "box_nms_thresh": 0.3}))  # a decorator, nothing registered yet


def test_threshold_calibration_on_two_scenes():
    from samantic.train.metrics import calibrate_thresholds

    r = calibrate_thresholds(create_model("sam_nano"), range(500, 502), (0.3, 0.9), (0.8,), points_per_side=8,
                             box_nms_grid=(0.7,), progress=False)
    assert len(r.rows) == 2 and r.n_images == 2 and r.n_objects > 0 and r.n_candidates > 0
    loose, strict = r.rows
    assert loose["masks_per_image"] >= strict["masks_per_image"]  # a higher bar keeps no more masks
    assert loose["recall_50"] >= strict["recall_50"] >= 0
    for row in r.rows:
        assert 0 <= row["precision_50"] <= 1 and row["recall_75"] <= row["recall_50"]
    assert r.best in r.rows and -1 <= r.iou_correlation <= 1
    assert "(chosen)" in r.markdown() and "box_nms_thresh" in r.markdown()
    with pytest.raises(ValueError, match="training seed"):
        calibrate_thresholds(create_model("sam_nano"), [2_000_000], progress=False)


def test_threshold_calibration_rows_are_the_generator_run_at_their_box_nms():
    """Each row of the box-NMS grid keeps what segment-everything run at that triple keeps (masks per image,
    recall), and a lower box NMS keeps no more masks."""
    from samantic.train.data.shapes import render_scene
    from samantic.train.metrics import calibrate_thresholds, evaluate_sam

    nano = create_model("sam_nano")
    r = calibrate_thresholds(nano, [502], (0.3,), (0.8,), points_per_side=8, box_nms_grid=(0.7, 0.5, 0.2),
                             progress=False)
    assert [row["box_nms_thresh"] for row in r.rows] == [0.7, 0.5, 0.2]
    kept = [row["masks_per_image"] for row in r.rows]
    assert kept[0] > kept[1] > kept[2]  # the grid changes what is kept on this scene
    for row in r.rows:
        amg = {"points_per_side": 8, "pred_iou_thresh": 0.3, "stability_score_thresh": 0.8,
               "box_nms_thresh": row["box_nms_thresh"]}
        reference = SamAutomaticMaskGenerator(nano, **amg)  # segment-anything's, at the row's triple
        assert len(reference.generate(render_scene(502).image)) == row["masks_per_image"]
        m = evaluate_sam(nano, [], [502], progress=False, amg_kwargs=amg).metrics
        assert m["masks_per_image"] == pytest.approx(row["masks_per_image"])
        assert m["recall_50"] == pytest.approx(row["recall_50"]) and m["recall_75"] == pytest.approx(row["recall_75"])


def test_threshold_calibration_on_panoptic_scenes_counts_entities(tmp_path):
    """--scenes v2: the objects are a panoptic scene's entities (things and stuff regions); the CLI says so."""
    from typer.testing import CliRunner

    from samantic.cli.main import app
    from samantic.train.data.panoptic import render_panoptic
    from samantic.train.metrics import calibrate_thresholds

    scene = render_panoptic(500)
    r = calibrate_thresholds(create_model("sam_nano"), [500], (0.3,), (0.8,), points_per_side=4, scenes="v2",
                             progress=False)
    assert r.n_objects == len(scene.masks) + len(scene.stuff_masks) > len(scene.masks)
    assert r.scenes == "v2" and "1 v2 scenes" in r.markdown() and "entities" in r.markdown()
    with pytest.raises(ValueError, match="scenes must be"):
        calibrate_thresholds(create_model("sam_nano"), [500], scenes="v3", progress=False)
    res = CliRunner().invoke(app, ["eval", "thresholds", "--seeds", "500:501", "--pred-iou", "0.3", "--stability",
                                   "0.8", "--points-per-side", "4", "--scenes", "v2", "--out", str(tmp_path),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "eval_thresholds.md").read_text()
    assert "--scenes v2" in md and "entities" in md
    res = CliRunner().invoke(app, ["eval", "thresholds", "--seeds", "500:501", "--scenes", "v3", "--out",
                                   str(tmp_path / "bad"), "--no-progress"])
    assert res.exit_code == 1 and "scenes must be" in res.output
