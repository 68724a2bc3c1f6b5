"""SAM-CP training, inference and evaluation (samantic.train.samcp, samantic.pipeline.panoptic,
samantic.train.samcp_eval) and the commands ``train samcp``, ``segment --samcp``, ``eval samcp``.

Segment-everything costs seconds per image on this CPU whatever the size, so the tests share
one small patch cache (three 96x128 v2 scenes, an 8x8 grid, loose thresholds) and a head
trained for a few steps; what they check does not depend on the head being good.
"""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from samantic.heads.samcp import SamcpHead, SamcpInfo, load_samcp
from samantic.pipeline.panoptic import PanopticOutput, SamcpPredictor, panoptic_fusion
from samantic.train.data.panoptic import CATEGORIES, STUFF_CLASSES, THING_CLASSES, render_panoptic
from samantic.train.samcp import (
    SamcpTrainConfig,
    SamcpTrainer,
    assign_patches,
    class_membership,
    collate_examples,
    hungarian_match,
    load_examples,
    samcp_losses,
)
from samantic.train.samcp_cache import PanopticStream

SIZE = (96, 128)
GRID = 8
LOW = {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.5}
SMALL = dict(d_model=32, heads=2, layers=2, encoder_layers=1, ffn_dim=64, roi_channels=8,
             backbone_channels=(8, 16, 16, 32), input_size=128)


def small_info(**kw) -> SamcpInfo:
    return SamcpInfo(classes=THING_CLASSES, stuff=STUFF_CLASSES, model="sam_nano", **{**SMALL, **kw})


@pytest.fixture(scope="module")
def nano():
    from samantic.models import create_model

    return create_model("sam_nano")


@pytest.fixture(scope="module")
def examples(nano, tmp_path_factory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("samcp_cache")
    ex, report = load_examples(nano, PanopticStream(1_000_000, 3, size=SIZE), cache, small_info().names,
                               points_per_side=GRID, progress=False, **LOW)
    assert report.computed == 3 and len(ex) == 3
    return ex, cache


# ---------------------------------------------------------------- assignment


def test_assign_patches_thresholds_ignore_band_and_fallback():
    iop = np.array([[0.9, 0.0, 0.0],    # member of 0
                    [0.6, 0.3, 0.0],    # ignored for 0 (0.5 <= iop < 0.8), negative for 1
                    [0.85, 0.0, 0.0],   # mask inside 0 but its box is not: ignored
                    [0.0, 0.3, 0.2]])   # nothing reaches 0.8: the fallback for 1 (best IoU)
    box = np.array([[0.95, 0, 0], [0.7, 0.4, 0], [0.6, 0, 0], [0, 0.5, 0.3]])
    iou = np.array([[0.7, 0, 0], [0.4, 0.1, 0], [0.5, 0, 0], [0, 0.25, 0.1]])
    m = assign_patches(iop, box, iou, 0.8, 0.5)
    assert m[0].tolist() == [1, 0, 0]
    assert m[1, 0] == -1 and m[1, 1] == 0
    assert m[2, 0] == -1
    # GT 1 gets patch 3 (its best by IoU); GT 2's best patch is taken already, so it has none
    assert m[3].tolist() == [0, 1, 0]
    assert (m[:, 2] == 1).sum() == 0


def test_class_membership_sums_instances_of_a_class():
    # patch 0 lies half in each of two instances of class 2: a member of class 2, of no instance
    iop = np.array([[0.45, 0.45, 0.0], [0.0, 0.0, 0.95]])
    cls = class_membership(iop, np.array([2, 2, 0]), 3, 0.8, 0.5)
    assert cls[:, 0].tolist() == [0, 0, 1]
    assert cls[:, 1].tolist() == [1, 0, 0]
    assert (cls[1] == 0).all()  # an absent class: every patch negative


def test_hungarian_match_minimises_total_cost():
    torch.manual_seed(0)
    cfg = SamcpTrainConfig()
    for trial in range(5):
        q, p, g = 4, 4, 3
        logits = torch.randn(q, 6)
        aff = torch.randn(q, p) * 3
        member = torch.from_numpy(np.random.default_rng(trial).integers(-1, 2, (p, g)).astype(np.int8))
        classes = torch.tensor([0, 2, 4])
        qi, gi = hungarian_match(logits, aff, member, classes, cfg)
        assert len(qi) == g and len(set(qi.tolist())) == g

        # the same cost, computed element by element, minimised by brute force
        def cost(a, b):
            t = (member[:, b] == 1).float()
            w = (member[:, b] >= 0).float()
            prob = logits[a, classes[b]].sigmoid()
            c_cls = 0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log() - 0.75 * prob ** 2 * -(1 - prob + 1e-8).log()
            pr = aff[a].sigmoid()
            from samantic.train.samcp import _focal

            focal = (_focal(aff[a], t) * w).sum() / w.sum().clamp(min=1)
            dice = 1 - (2 * (pr * t * w).sum() + 1) / ((pr * w).sum() + (t * w).sum() + 1)
            local = float(member[a, b] != 1)
            return float(cfg.class_weight * c_cls + cfg.focal_weight * focal + cfg.dice_weight * dice
                         + cfg.locality_weight * local)

        got = sum(cost(a, b) for a, b in zip(qi, gi))
        best = min(sum(cost(a, b) for a, b in zip(perm, range(g))) for perm in itertools.permutations(range(q), g))
        assert got == pytest.approx(best, rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------- training


def test_examples_from_the_cache(examples):
    ex, _ = examples
    names = small_info().names
    for e in ex:
        p = e.boxes.shape[0]
        assert e.roi_masks.shape == (p, 7, 7) and e.membership.shape[0] == p
        assert e.class_targets.shape == (len(names), p)
        assert ((e.membership == 1).sum(1) <= 1).all()  # a patch belongs to at most one segment
        assert (e.boxes[:, 2:] > e.boxes[:, :2]).all()
        # segments map onto the vocabulary by name
        for c in e.gt_classes:
            assert c >= 0
    assert sum(e.boxes.shape[0] for e in ex) > 0


def test_examples_load_each_image_once_and_equal_from_a_reused_cache(nano, examples):
    """Loading examples walks the dataset once (scenes are rendered on the fly: a second pass would render each
    again); from the cache built by the fixture, nothing is recomputed and the examples are the same."""
    ex, cache = examples

    class Counted(PanopticStream):
        loads = 0

        def load(self, i):
            Counted.loads += 1
            return super().load(i)

    again, report = load_examples(nano, Counted(1_000_000, 3, size=SIZE), cache, small_info().names,
                                  points_per_side=GRID, progress=False, **LOW)
    assert Counted.loads == 3 and (report.computed, report.reused) == (0, 3)
    assert [e.key for e in again] == [e.key for e in ex]
    for a, b in zip(again, ex):
        for name in ("image", "boxes", "roi_masks", "membership", "gt_classes", "class_targets"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_v1_scenes_mixed_in_train_things_only(nano, examples):
    """``shapes:`` scenes in a mixed set: their shapes are things of the v2 vocabulary, no stuff is present,
    and a training step takes v1 and v2 examples together."""
    from samantic.train.data.shapes import CLASSES, render_scene
    from samantic.train.samcp_cache import ConcatPanoptic, ShapesStream

    ex_v2, cache = examples
    data = ConcatPanoptic([PanopticStream(1_000_000, 1, size=SIZE), ShapesStream(1_000_000, 2, size=SIZE)])
    ex, report = load_examples(nano, data, cache, small_info().names, points_per_side=GRID, progress=False, **LOW)
    assert (report.computed, report.reused) == (2, 1) and [e.key for e in ex][1:] == ["shapes:1000000", "shapes:1000001"]
    names = small_info().names
    for e, seed in zip(ex[1:], (1_000_000, 1_000_001)):
        labels = render_scene(seed, size=SIZE).labels
        assert [names[c] for c in e.gt_classes] == [CLASSES[k] for k in labels]
        assert e.gt_isthing.all()
        stuff_rows = [names.index(n) for n in STUFF_CLASSES]
        # a v1 background is not annotated for stuff: those rows are ignored, not negatives
        assert (e.class_targets[stuff_rows] == -1).all()
        assert e.class_known.tolist() == [n not in STUFF_CLASSES for n in names]
        assert (e.class_targets[e.class_known] >= 0).any()  # thing rows keep their targets
        np.testing.assert_array_equal(e.flipped().class_known, e.class_known)
    assert ex[0].class_known is None  # v2 scenes: every class annotated
    torch.manual_seed(0)
    head = SamcpHead(small_info())
    trainer = SamcpTrainer(head, SamcpTrainConfig(steps=2, images_per_step=3, warmup_steps=1), ex)
    # the loss of a v1 image does not reach the stuff classes' presence or Type-I affinity rows
    v1 = [e for e in ex[1:] if len(e.boxes)][:1]
    assert v1
    images, boxes, masks = collate_examples(v1, torch.device("cpu"))
    out = head(images, boxes, masks)
    for t in out.presence_logits + out.affinity:
        t.retain_grad()
    samcp_losses(out, v1, trainer.config)[0].backward()
    stuff = torch.tensor(stuff_rows)
    things = torch.tensor([names.index(n) for n in THING_CLASSES])
    for l in range(len(out.affinity)):
        assert out.presence_logits[l].grad[0, stuff].abs().max() == 0
        assert out.presence_logits[l].grad[0, things].abs().max() > 0
        assert out.affinity[l].grad[0, stuff].abs().max() == 0
        assert out.affinity[l].grad[0, things].abs().max() > 0
    loss, _ = trainer.train_step(ex)
    assert np.isfinite(loss)


def test_finer_patch_masks_train_and_flip(nano, examples):
    """mask_size 14: examples carry 14 x 14 masks (the cache is reused), flipped ones mirror them, a step
    trains every parameter, and the file keeps the size; a 7 x 7 head's file does not name it (older
    readers know no mask_size)."""
    _, cache = examples
    info = small_info(mask_size=14)
    ex, report = load_examples(nano, PanopticStream(1_000_000, 3, size=SIZE), cache, info.names,
                               roi_size=info.mask_side, points_per_side=GRID, progress=False, **LOW)
    assert report.computed == 0 and all(e.roi_masks.shape[1:] == (14, 14) for e in ex)
    e = next(e for e in ex if len(e.boxes))
    np.testing.assert_array_equal(e.flipped().roi_masks, e.roi_masks[:, :, ::-1])
    torch.manual_seed(0)
    head = SamcpHead(info)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    trainer = SamcpTrainer(head, SamcpTrainConfig(steps=2, images_per_step=3, warmup_steps=1), ex)
    loss, _ = trainer.train_step([x.flipped() for x in ex])
    assert np.isfinite(loss)
    assert not torch.equal(before["roi_embed.mlp.0.weight"], head.state_dict()["roi_embed.mlp.0.weight"])
    assert head.roi_embed.mlp[0].in_features == info.roi_channels * 49 + 196
    assert json.loads(info.to_metadata()["config"])["mask_size"] == 14
    assert "mask_size" not in json.loads(small_info().to_metadata()["config"])
    assert SamcpInfo.from_metadata(small_info().to_metadata()).mask_side == 7


def test_losses_fall_when_fitting_a_few_scenes(examples):
    ex, _ = examples
    ex = [e for e in ex if e.boxes.shape[0]]
    torch.manual_seed(0)
    head = SamcpHead(small_info())
    cfg = SamcpTrainConfig(steps=100, images_per_step=len(ex), lr=2e-3, warmup_steps=1, flip_prob=0.0)
    trainer = SamcpTrainer(head, cfg, ex)
    first = trainer.train_step(ex)[0]
    for _ in range(59):
        last, parts = trainer.train_step(ex)
    assert last < 0.6 * first, (first, last)
    assert set(parts) == {"class", "focal", "dice", "sem_focal", "sem_dice", "presence"}


def test_loss_reaches_every_stage_and_the_backbone(examples):
    ex, _ = examples
    torch.manual_seed(0)
    head = SamcpHead(small_info())
    from samantic.train.samcp import collate_examples

    images, boxes, masks = collate_examples(ex, torch.device("cpu"))
    out = head(images, boxes, masks)
    loss, _ = samcp_losses(out, ex, SamcpTrainConfig())
    loss.backward()
    assert head.backbone.body.stem[0][0].weight.grad.abs().sum() > 0
    for aff in head.affinity:  # the head MLP's last layer starts at 0, so its gradient is where a stage learns first
        assert aff.head_mlp[-1].weight.grad is not None and aff.head_mlp[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("patch_drop,crop_scale", [(0.0, 1.0), (0.4, 0.6)])
def test_resume_gives_the_same_weights(examples, tmp_path, patch_drop, crop_scale):
    ex, _ = examples
    cfg = SamcpTrainConfig(steps=4, images_per_step=2, lr=1e-3, warmup_steps=1, checkpoint_every=2, log_every=1,
                           patch_drop=patch_drop, crop_scale=crop_scale)

    class Interrupted(SamcpTrainer):
        def train_step(self, batch):
            if self.step == 3:
                raise KeyboardInterrupt
            return super().train_step(batch)

    def trainer(cls):
        torch.manual_seed(0)
        return cls(SamcpHead(small_info()), cfg, ex)

    trainer(SamcpTrainer).train(tmp_path / "a.safetensors", progress=False)
    with pytest.raises(KeyboardInterrupt):
        trainer(Interrupted).train(tmp_path / "b.safetensors", progress=False)  # checkpoint at step 2
    # the interrupt itself saved the finished steps (not only the step-2 checkpoint)
    assert torch.load(tmp_path / "b.safetensors.ckpt", weights_only=True)["step"] == 3
    trainer(SamcpTrainer).train(tmp_path / "b.safetensors", resume=True, progress=False)
    straight, resumed = load_samcp(tmp_path / "a.safetensors"), load_samcp(tmp_path / "b.safetensors")
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    meta = resumed.info.extra
    assert meta["steps_done"] == "4" and json.loads(meta["train_config"])["steps"] == 4
    assert json.loads(meta["train_config"])["patch_drop"] == patch_drop
    # steps 1-2 of the interrupted run, then 3-4 after the resume
    steps = [json.loads(l)["step"] for l in (tmp_path / "b.safetensors.log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_an_interrupt_inside_the_optimizer_step_waits_for_the_step_and_the_checkpoint_resumes(examples, tmp_path):
    """Ctrl-C landing inside ``optimizer.step()`` (as SIGTERM did in CI) is delivered once the step has finished:
    the checkpoint saved on it is a whole step (Adam's state complete, the step counted) and resumes."""
    import signal

    ex, _ = examples
    cfg = SamcpTrainConfig(steps=5, images_per_step=2, warmup_steps=1, checkpoint_every=100, log_every=1)
    out = tmp_path / "h.safetensors"
    trainer = SamcpTrainer(SamcpHead(small_info()), cfg, ex)
    step = trainer.optimizer.step
    calls = []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second step: the signal comes before Adam has made or updated anything
            signal.raise_signal(signal.SIGINT)
        return step(*args, **kwargs)

    trainer.optimizer.step = interrupted_step
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a fresh Python, whatever
    try:                                                                # handler an earlier test or library left
        with pytest.raises(KeyboardInterrupt):
            trainer.train(out, progress=False)
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    assert len(calls) == 2
    state = torch.load(tmp_path / "h.safetensors.ckpt", weights_only=True)
    assert state["step"] == 2  # the interrupted step finished and counts
    assert all({"exp_avg", "exp_avg_sq"} <= set(v) for v in state["optimizer"]["state"].values())
    again = SamcpTrainer(SamcpHead(small_info()), cfg, ex)
    result = again.train(out, resume=True, progress=False)
    assert (result.steps, result.steps_run) == (5, 3)
    assert restored is signal.default_int_handler  # the handler is back as it was


def test_resume_refuses_another_runs_checkpoint_and_may_only_lengthen(examples, tmp_path):
    from dataclasses import asdict, replace

    ex, _ = examples
    cfg = SamcpTrainConfig(steps=2, images_per_step=2, warmup_steps=1, checkpoint_every=1, log_every=1)
    out = tmp_path / "h.safetensors"
    SamcpTrainer(SamcpHead(small_info()), cfg, ex, metadata={"data": "A"}).train(out, progress=False)
    # more steps: allowed, the run goes on from step 2
    more = SamcpTrainer(SamcpHead(small_info()), replace(cfg, steps=3, time_budget=60.0), ex, metadata={"data": "A"})
    assert more.train(out, resume=True, progress=False).steps_run == 1
    # other classes of the same count, other data, another recipe: another run's checkpoint
    info = small_info()
    renamed = SamcpInfo(**{**asdict(info), "classes": list(reversed(info.classes))})
    for head, config, meta, what in ((SamcpHead(renamed), cfg, {"data": "A"}, "names"),
                                     (SamcpHead(small_info()), cfg, {"data": "B"}, "data 'A' -> 'B'"),
                                     (SamcpHead(small_info()), replace(cfg, lr=1.0), {"data": "A"}, "config.lr"),
                                     (SamcpHead(small_info(texture_channels=4)), cfg, {"data": "A"}, "texture_channels")):
        with pytest.raises(ValueError, match=f"another run .*{what}"):
            SamcpTrainer(head, replace(config, steps=4), ex, metadata=meta).train(out, resume=True, progress=False)
    # a head option added later stays out of the record while off: checkpoints from before it still resume
    assert "texture_channels" not in SamcpTrainer(SamcpHead(small_info()), cfg, ex).run_record()["head"]
    # a damaged run record, a checkpoint without its step, a file of something else: named, not a KeyError
    ckpt = tmp_path / "h.safetensors.ckpt"
    state = torch.load(ckpt, weights_only=True)
    for name, broken in (("record", {**state, "run": "{not json"}), ("step", {k: v for k, v in state.items() if k != "step"}),
                         ("other", [1, 2, 3])):
        bad = tmp_path / f"{name}.safetensors"
        torch.save(broken, tmp_path / f"{name}.safetensors.ckpt")
        with pytest.raises(ValueError, match="cannot resume from this checkpoint"):
            SamcpTrainer(SamcpHead(small_info()), cfg, ex, metadata={"data": "A"}).train(bad, resume=True, progress=False)
    # --resume without a checkpoint: a fresh start with a fresh log
    (tmp_path / "n.safetensors.log.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    SamcpTrainer(SamcpHead(small_info()), cfg, ex).train(tmp_path / "n.safetensors", resume=True, progress=False)
    steps = [json.loads(l)["step"] for l in (tmp_path / "n.safetensors.log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_patch_drop_subsets_patches_and_their_targets(examples):
    """A dropped patch leaves every array it has a row or column in; a thing left without member patches
    sits the step out; drops are drawn per step (the same batch for the same step, others differ)."""
    ex, _ = examples
    e = max(ex, key=lambda x: len(x.boxes))
    p = len(e.boxes)
    keep = np.arange(p) % 2 == 0
    s = e.subset(keep)
    np.testing.assert_array_equal(s.boxes, e.boxes[keep])
    np.testing.assert_array_equal(s.roi_masks, e.roi_masks[keep])
    np.testing.assert_array_equal(s.membership, e.membership[keep])
    np.testing.assert_array_equal(s.class_targets, e.class_targets[:, keep])
    for g in range(len(e.gt_classes)):
        kept_member = (e.membership[keep, g] == 1).any()
        expect = e.gt_classes[g] if (kept_member or not e.gt_isthing[g]) else -1
        assert s.gt_classes[g] == expect
    # a thing whose only member patches are all dropped
    g = next(g for g in range(len(e.gt_classes)) if e.gt_isthing[g] and e.gt_classes[g] >= 0)
    gone = e.subset(e.membership[:, g] != 1)
    assert gone.gt_classes[g] == -1 and e.gt_classes[g] >= 0
    with pytest.raises(ValueError, match="patch_drop"):
        SamcpTrainConfig(patch_drop=1.0)
    cfg = SamcpTrainConfig(steps=10, images_per_step=len(ex), warmup_steps=1, patch_drop=0.5, flip_prob=0.0)
    trainer = SamcpTrainer(SamcpHead(small_info()), cfg, ex)
    full = {x.key: len(x.boxes) for x in trainer.examples}
    sizes = [sorted((x.key, len(x.boxes)) for x in trainer.batch_at(step)) for step in range(4)]
    assert sizes[0] == sorted((x.key, len(x.boxes)) for x in trainer.batch_at(0))
    assert len({tuple(z) for z in sizes}) > 1
    for z in sizes:
        for key, n in z:
            assert 1 <= n <= full[key]
    assert sum(n for z in sizes for _, n in z) < 0.8 * sum(full[k] for z in sizes for k, _ in z)
    loss, _ = trainer.train_step(trainer.batch_at(0))
    assert np.isfinite(loss)


def test_crop_keeps_the_part_of_each_patch_inside_the_window():
    """A patch cut by the crop window gets its clipped box and the RoI mask of its inside part (what
    mask_to_roi gives on the cropped full-resolution mask); patches mostly outside leave with their
    targets; the full window changes nothing."""
    from samantic.heads.samcp import mask_to_roi
    from samantic.train.samcp import SamcpExample

    h, w, r = 120, 160, 14
    yy, xx = np.mgrid[:h, :w]
    masks = np.stack([(xx - 60) ** 2 + (yy - 60) ** 2 < 40 ** 2,            # a disc the window cuts
                      (xx >= 100) & (xx < 130) & (yy >= 20) & (yy < 50),    # a square inside it
                      (xx < 12) & (yy >= 90)])                               # a corner mostly outside
    boxes = np.array([[20, 20, 100, 100], [100, 20, 130, 50], [0, 90, 12, 120]], np.float32)
    roi = mask_to_roi(torch.from_numpy(masks), torch.from_numpy(boxes), size=r).numpy()
    member = np.array([[1, -1], [0, 1], [0, 0]], np.int8)
    ex = SamcpExample("k", np.zeros((h, w, 3), np.uint8), boxes, roi, member, np.array([2, 5]),
                      np.array([True, True]), np.array([[1, 0, 0], [0, 1, -1]], np.int8))
    same = ex.cropped(0, 0, w, h)
    np.testing.assert_array_equal(same.boxes, ex.boxes)
    np.testing.assert_allclose(same.roi_masks, ex.roi_masks)
    x0, y0, x1, y1 = 50, 10, 150, 100
    c = ex.cropped(x0, y0, x1, y1)
    assert c.image.shape == (y1 - y0, x1 - x0, 3)
    np.testing.assert_array_equal(c.boxes, [[0, 10, 50, 90], [50, 10, 80, 40]])  # the corner patch left
    np.testing.assert_array_equal(c.membership, member[:2])
    np.testing.assert_array_equal(c.class_targets, ex.class_targets[:, :2])
    np.testing.assert_allclose(c.roi_masks[1], roi[1])  # inside: unchanged
    inside = mask_to_roi(torch.from_numpy(masks[:1, y0:y1, x0:x1]), torch.from_numpy(c.boxes[:1]), size=r).numpy()
    assert np.abs(c.roi_masks[0] - inside[0]).mean() < 0.04
    assert np.abs(roi[0] - inside[0]).mean() > 0.12  # the uncut mask would be wrong
    # a thing whose only member patch leaves is out of the step's instance targets
    gone = ex.cropped(100, 0, 160, 60)
    assert list(gone.gt_classes) == [-1, 5]
    with pytest.raises(ValueError, match="no patch of k lies in the crop window"):
        ex.cropped(140, 60, 160, 80)
    with pytest.raises(ValueError, match="crop_scale"):
        SamcpTrainConfig(crop_scale=0.0)


def test_crop_scale_zooms_into_half_the_images_per_step(examples):
    ex, _ = examples
    cfg = SamcpTrainConfig(steps=10, images_per_step=len(ex), warmup_steps=1, crop_scale=0.5, flip_prob=0.0)
    trainer = SamcpTrainer(SamcpHead(small_info()), cfg, ex)
    shapes = [[x.image.shape[:2] for x in trainer.batch_at(step)] for step in range(8)]
    assert shapes[0] == [x.image.shape[:2] for x in trainer.batch_at(0)]  # drawn per step, reproducibly
    cropped = [s for z in shapes for s in z if s != SIZE]
    assert 0 < len(cropped) < sum(len(z) for z in shapes)
    assert all(SIZE[0] * 0.5 - 1 <= a <= SIZE[0] and SIZE[1] * 0.5 - 1 <= b <= SIZE[1] for a, b in cropped)
    for x in trainer.batch_at(3):
        assert (x.boxes[:, 2:] > x.boxes[:, :2]).all() and x.boxes.min() >= 0
        assert (x.boxes[:, 2] <= x.image.shape[1]).all() and (x.boxes[:, 3] <= x.image.shape[0]).all()
    loss, _ = trainer.train_step(trainer.batch_at(3))
    assert np.isfinite(loss)


def test_color_perm_permutes_the_channels_of_some_images_and_nothing_else(examples):
    from itertools import permutations

    ex, _ = examples
    by_key = {x.key: x for x in ex}
    cfg = SamcpTrainConfig(steps=10, images_per_step=len(ex), warmup_steps=1, color_perm=0.5, flip_prob=0.0)
    trainer = SamcpTrainer(SamcpHead(small_info()), cfg, ex)
    permuted = kept = 0
    for step in range(8):
        for x in trainer.batch_at(step):
            orig = by_key[x.key]
            assert np.array_equal(x.boxes, orig.boxes) and np.array_equal(x.roi_masks, orig.roi_masks)
            assert np.array_equal(x.class_targets, orig.class_targets)
            if np.array_equal(x.image, orig.image):
                kept += 1
                continue
            orders = [o for o in permutations(range(3))
                      if np.array_equal(x.image, orig.image[..., list(o)])]
            assert orders and orders[0] != (0, 1, 2)
            permuted += 1
    assert permuted > 0 and kept > 0
    for x, y in zip(trainer.batch_at(5), trainer.batch_at(5)):  # drawn per step, reproducibly
        assert np.array_equal(x.image, y.image)
    off = SamcpTrainer(SamcpHead(small_info()), SamcpTrainConfig(steps=10, images_per_step=len(ex), flip_prob=0.0), ex)
    assert all(np.array_equal(x.image, by_key[x.key].image) for x in off.batch_at(0))
    # off, it stays out of the run record: checkpoints written before the option existed still resume
    assert "color_perm" not in off.run_record()["config"] and trainer.run_record()["config"]["color_perm"] == 0.5
    with pytest.raises(ValueError, match="color_perm"):
        SamcpTrainConfig(color_perm=1.5)


# ---------------------------------------------------------------- inference


def test_panoptic_fusion_highest_score_wins_and_small_leftovers_drop():
    m = np.zeros((3, 4, 6), bool)
    m[0, :, :4] = True       # score 0.9
    m[1, :, 2:] = True       # score 0.5: keeps 8 of 16 pixels = 0.5 -> kept at 0.5
    m[2, :, 1:4] = True      # score 0.7: inside mask 0 -> keeps nothing -> dropped
    out, kept = panoptic_fusion(m, np.array([0.9, 0.5, 0.7]), overlap_thresh=0.5)
    assert kept.tolist() == [True, True, False]
    assert (out[:, :4] == 1).all() and (out[:, 4:] == 2).all()
    out, kept = panoptic_fusion(m, np.array([0.9, 0.5, 0.7]), overlap_thresh=0.6)
    assert kept.tolist() == [True, False, False] and (out[:, 4:] == 0).all()


class _FixedScores(SamcpPredictor):
    """A predictor whose head outputs are given (to test the merge and fusion)."""

    def __init__(self, head, aff, cls, presence, **kw):
        super().__init__(head, **kw)
        self.fixed = (aff, cls, presence)

    def scores(self, image, patch_rles, patch_boxes):
        return self.fixed


def _rles_and_boxes(patches):
    """pycocotools RLEs (str counts) and XYXY-inclusive boxes of binary masks ``[N, H, W]``."""
    rles = mask_utils.encode(np.asfortranarray(patches.transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode()
    return rles, np.array([[x, y, x + bw - 1, y + bh - 1] for x, y, bw, bh in mask_utils.toBbox(rles).astype(int)])


def test_predictor_merges_patches_like_pycocotools_and_fuses():
    h, w = 40, 50
    rng = np.random.default_rng(0)
    patches = np.zeros((4, h, w), np.uint8)
    patches[0, 5:20, 5:20] = 1
    patches[1, 15:30, 10:25] = 1     # overlaps patch 0: one instance with it
    patches[2, 30:38, 30:48] = 1     # another instance
    patches[3, :5, :] = 1            # stuff (wall)
    rles, boxes = _rles_and_boxes(patches)
    info = small_info()
    c, p = info.num_classes, 4
    aff = np.full((c + p, p), 0.01)
    aff[c + 0, [0, 1]] = 0.9          # query of patch 0: patches 0 and 1
    aff[c + 1, [0, 1]] = 0.8          # the same set, a lower score: deduplicated
    aff[c + 2, 2] = 0.95
    wall = info.names.index("wall")
    aff[wall, 3] = 0.9
    cls = np.full((p, c), 0.01)
    cls[0, info.names.index("star")] = 0.9
    cls[1, info.names.index("star")] = 0.6
    cls[2, info.names.index("ring")] = 0.8
    presence = np.full(c, 0.01)
    presence[wall] = 0.95
    pred = _FixedScores(SamcpHead(info), aff, cls, presence, score_thresh=0.3, min_area=0)
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    out = pred(image, rles, boxes)
    names = {s["category_name"] for s in out.segments_info}
    assert names == {"star", "ring", "wall"}
    star = next(s for s in out.segments_info if s["category_name"] == "star")
    union = mask_utils.decode(mask_utils.merge([rles[0], rles[1]], intersect=False)).astype(bool)
    assert ((out.panoptic == star["id"]) == union).all()
    assert star["patches"] == [0, 1]
    # semantic map from the same pass; segments_info agrees with the map
    for s in out.segments_info:
        region = out.panoptic == s["id"]
        assert s["area"] == region.sum()
        assert (out.semantic[region] == s["category_id"]).all()
        assert info.names[s["category_id"] - 1] == s["category_name"]
    assert (out.semantic[out.panoptic == 0] == 0).all()
    # the unfused instances: one per distinct patch set of a thing class, best first
    assert [d["category_name"] for d in out.instances] == ["ring", "star"] or \
        [d["category_name"] for d in out.instances] == ["star", "ring"]
    # a class filter keeps only the wanted names
    only = _FixedScores(SamcpHead(info), aff, cls, presence, classes=["ring"], min_area=0)(image, rles, boxes)
    assert {s["category_name"] for s in only.segments_info} == {"ring"}
    with pytest.raises(ValueError, match="knows: circle"):
        SamcpPredictor(SamcpHead(info), classes=["blob"])


def test_instance_list_takes_each_querys_next_classes_and_the_maps_stay():
    h, w = 30, 30
    patches = np.zeros((2, h, w), np.uint8)
    patches[0, 2:12, 2:12] = 1
    patches[1, 15:28, 15:28] = 1
    rles, boxes = _rles_and_boxes(patches)
    info = small_info()
    c, p = info.num_classes, 2
    aff = np.full((c + p, p), 0.01)
    aff[c + 0, 0] = 0.9
    aff[c + 1, 1] = 0.8
    cls = np.full((p, c), 0.01)
    ring, circle, star = (info.names.index(n) for n in ("ring", "circle", "star"))
    cls[0, ring], cls[0, circle], cls[0, star] = 0.6, 0.3, 0.04   # star: under instance_thresh
    cls[1, star] = 0.7
    presence = np.zeros(c)
    image = np.zeros((h, w, 3), np.uint8)
    outs = {k: _FixedScores(SamcpHead(info), aff, cls, presence, instance_classes=k, min_area=0)(image, rles, boxes)
            for k in (1, 2, 3)}
    listed = {k: [(d["category_name"], round(d["score"], 4)) for d in o.instances] for k, o in outs.items()}
    assert listed[1] == [("star", 0.56), ("ring", 0.54)]
    # query 0 again under its second class, scored by that class's probability; star (0.04) never
    assert listed[2] == listed[3] == [("star", 0.56), ("ring", 0.54), ("circle", 0.27)]
    circle_rle = next(d for d in outs[2].instances if d["category_name"] == "circle")["segmentation"]
    assert (mask_utils.decode(circle_rle).astype(bool) == patches[0].astype(bool)).all()
    for k in (2, 3):  # the panoptic and semantic maps take the best class only
        assert (outs[k].panoptic == outs[1].panoptic).all() and (outs[k].semantic == outs[1].semantic).all()
        assert outs[k].segments_info == outs[1].segments_info
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="instance_classes"):
            SamcpPredictor(SamcpHead(info), instance_classes=bad)


def test_segmenter_with_samcp_returns_a_panoptic_result(nano, examples, tmp_path):
    from samantic.runtime import PanopticResult, Segmenter

    torch.manual_seed(0)
    head = SamcpHead(small_info())
    head.info.extra["patches"] = json.dumps({"points_per_side": GRID, **LOW})
    seg = Segmenter(nano, samcp=head, samcp_options={"score_thresh": 0.0, "min_area": 0})
    assert seg.config.points_per_side == GRID and seg.config.pred_iou_thresh == LOW["pred_iou_thresh"]
    image = render_panoptic(11, size=SIZE).image
    res = seg(image)
    assert isinstance(res, PanopticResult)
    assert res.panoptic_map.shape == SIZE and res.semantic_map.shape == SIZE
    assert len(res) == len(res.segments_info) == len(res.instances)
    for s, inst in zip(res.segments_info, res.instances):
        m = mask_utils.decode(inst["segmentation"]).astype(bool)
        assert (m == (res.panoptic_map == s["id"])).all()
    assert res.overlay().shape == image.shape
    assert "samcp" in seg.timings
    with pytest.raises(ValueError, match="trained on patches of sam_nano"):
        head.check_model("sam_vit_b")
    with pytest.raises(ValueError, match="either a U-SAM head"):
        Segmenter(nano, head=object(), samcp=head)

    # classes and score_thresh as on the U-SAM path: a comma string, a list; an empty choice is an error
    names = head.info.names
    assert Segmenter(nano, samcp=head, classes=f"{names[0]}, {names[-1]}").samcp.wanted.tolist() == \
        [n in (names[0], names[-1]) for n in names]
    assert Segmenter(nano, samcp=head, classes=[names[1]]).samcp.wanted.sum() == 1
    for empty in ([], "", " , "):
        with pytest.raises(ValueError, match="names no class"):
            Segmenter(nano, samcp=head, classes=empty)
    with pytest.raises(ValueError, match="blob"):
        Segmenter(nano, samcp=head, classes="blob")
    assert Segmenter(nano, samcp=head, score_thresh=0.9).samcp.score_thresh == 0.9
    with pytest.raises(ValueError, match="contradict"):
        Segmenter(nano, samcp=head, score_thresh=0.9, samcp_options={"score_thresh": 0.2})


# ---------------------------------------------------------------- evaluation


class _Oracle:
    """Returns the ground truth of the v2 scene whose image it is given (scores every metric 1)."""

    def __init__(self, seeds, kind="v2"):
        self.names = tuple(THING_CLASSES) + tuple(STUFF_CLASSES)
        self.kind = kind
        from samantic.train.data.shapes import render_scene
        self.scenes = {}
        for s in seeds:
            sc = render_panoptic(s) if kind == "v2" else render_scene(s)
            self.scenes[sc.image.tobytes()[:4096] + bytes(str(sc.image.shape), "ascii")] = sc

    def __call__(self, image, rles, boxes):
        sc = self.scenes[image.tobytes()[:4096] + bytes(str(image.shape), "ascii")]
        if self.kind == "v2":
            panoptic = sc.panoptic.astype(np.int32)
            segs = [{"id": int(i), "category_id": int(c), "category_name": self.names[c - 1]} for i, c in sc.segments]
            masks, labels = sc.masks, np.asarray(sc.labels)
        else:
            masks, labels = sc.masks.astype(bool), np.asarray(sc.labels)
            panoptic = np.zeros(masks.shape[1:], np.int32)
            for i, m in enumerate(masks):
                panoptic[m] = i + 1
            segs = [{"id": i + 1, "category_id": int(l) + 1, "category_name": self.names[l]} for i, l in enumerate(labels)]
        semantic = np.zeros(panoptic.shape, np.uint8)
        for s in segs:
            semantic[panoptic == s["id"]] = s["category_id"]
        inst = []
        for m, l in zip(masks, labels):
            r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            r["counts"] = r["counts"].decode()
            inst.append({"category_id": int(l) + 1, "category_name": self.names[l], "score": 1.0, "segmentation": r})
        return PanopticOutput(panoptic, segs, semantic, inst, self.names, len(THING_CLASSES))


def test_evaluate_samcp_scores_the_ground_truth_as_perfect(nano, tmp_path, monkeypatch):
    from samantic.train import samcp_cache
    from samantic.train.samcp_eval import evaluate_samcp

    # no segment-everything needed: the oracle ignores the patches
    monkeypatch.setattr(samcp_cache.PatchCache, "compute", lambda self, sample: _EmptyPatches(sample.image))
    monkeypatch.setattr(samcp_cache.PatchCache, "get", lambda self, image: None)
    r = evaluate_samcp(_Oracle([0, 1]), nano, [0, 1], tmp_path, kind="v2", progress=False)
    assert r.pq["all"]["pq"] == pytest.approx(1.0) and r.pq["things"]["rq"] == pytest.approx(1.0)
    assert r.miou == pytest.approx(1.0) and r.ap50 == pytest.approx(1.0) and r.ap == pytest.approx(1.0)
    from samantic.train.data.shapes import render_scene

    v1 = [s for s in range(2, 20) if len(render_scene(s).labels) >= 2][:2]  # some v1 scenes have no object
    r1 = evaluate_samcp(_Oracle(v1, kind="v1"), nano, v1, tmp_path, kind="v1", progress=False)
    assert r1.miou == pytest.approx(1.0) and r1.ap50 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="training seed"):
        evaluate_samcp(_Oracle([]), nano, [1_000_000], tmp_path, progress=False)
    # a training scene only when asked for (benchmarks/samcp_train_gap.py: what a head memorised)
    rt = evaluate_samcp(_Oracle([1_000_000]), nano, [1_000_000], tmp_path, progress=False, training_seeds=True)
    assert rt.scenes == 1 and rt.pq["all"]["pq"] == pytest.approx(1.0)


class _EmptyPatches:
    def __init__(self, image):
        from samantic.ops import RleBatch

        self.size = image.shape[:2]
        self.patch_boxes = np.zeros((0, 4), np.int64)
        self._b = RleBatch(np.zeros(0, np.uint32), np.zeros(1, np.int64), self.size)

    def __len__(self):
        return 0

    def patch_batch(self):
        return self._b


# ---------------------------------------------------------------- commands


def _samantic(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "samantic.cli.main", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900)


def _small_train_args(out, cache):
    """`samantic train samcp` on three cached scenes, one image per step, one decoder layer, one thread."""
    return ["train", "samcp", "--data", "shapes-panoptic:1000000:3", "--out", str(out), "--cache", str(cache),
            "--points-per-side", str(GRID), "--pred-iou-thresh", str(LOW["pred_iou_thresh"]),
            "--stability-score-thresh", str(LOW["stability_score_thresh"]), "--images-per-step", "1", "--layers", "1",
            "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def trained(examples, tmp_path_factory):
    """`samantic train samcp` on the cached scenes (the cache is reused, nothing recomputed)."""
    _, cache = examples
    out = tmp_path_factory.mktemp("head") / "samcp.safetensors"
    data = tmp_path_factory.mktemp("pdata")
    from samantic.train.data.panoptic import write_panoptic

    write_panoptic(data, [render_panoptic(1_000_000 + i, size=SIZE) for i in range(3)], progress=False)
    r = _samantic("train", "samcp", "--data", str(data), "--out", str(out), "--cache", str(cache), "--points-per-side",
                  str(GRID), "--pred-iou-thresh", str(LOW["pred_iou_thresh"]), "--stability-score-thresh",
                  str(LOW["stability_score_thresh"]), "--steps", "3", "--images-per-step", "2", "--layers", "1", "--roi-size", "14",
                  "--patch-drop", "0.25", "--weight-decay", "0.1", "--crop-scale", "0.7", "--threads", "1",
                  "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 computed, 3 reused" in r.stdout
    return out


def test_train_samcp_writes_a_head_with_its_vocabulary_and_patches(trained, nano):
    from samantic.models.weights import state_sha256

    head = load_samcp(trained)
    assert head.info.classes == THING_CLASSES and head.info.stuff == STUFF_CLASSES
    assert head.info.layers == 1 and head.info.model == "sam_nano"
    assert head.info.roi_size == head.info.mask_side == 14  # --roi-size (the mask input follows it)
    assert json.loads(head.info.extra["patches"]) == {"points_per_side": GRID, **LOW}
    assert head.info.extra["steps_done"] == "3"
    cfg = json.loads(head.info.extra["train_config"])
    assert (cfg["patch_drop"], cfg["weight_decay"], cfg["crop_scale"]) == (0.25, 0.1, 0.7)
    assert head.info.extra["sam_state_sha256"] == state_sha256(nano)  # the SAM whose patches it learned from
    assert head.check_weights(nano) is None
    assert not {"stages", "stage", "init_weights"} & set(head.info.extra)  # one stage: no recipe of stages


def test_train_samcp_sigterm_saves_the_checkpoint_and_resume_goes_on(examples, tmp_path):
    import signal
    import time

    _, cache = examples
    out = tmp_path / "h.safetensors"
    base = _small_train_args(out, cache)
    args = [sys.executable, "-m", "samantic.cli.main", *base, "--steps", "100000", "--checkpoint-every", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "h.safetensors.ckpt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted at step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    step = torch.load(tmp_path / "h.safetensors.ckpt", weights_only=True)["step"]
    assert step >= 1 and f"interrupted at step {step}:" in stderr  # the step it stopped at is the one saved
    r = _samantic(*base, "--steps", str(step + 1), "--checkpoint-every", "1", "--resume")
    assert r.returncode == 0 and f"steps {step + 1}," in r.stdout, r.stdout + r.stderr
    r = _samantic(*base, "--steps", str(step + 1), "--checkpoint-every", "1", "--resume")
    assert r.returncode == 0 and "no step trained" in r.stderr, r.stdout + r.stderr


def test_train_samcp_says_when_the_time_budget_cut_the_steps(examples, tmp_path):
    """A time budget that ends the run before --steps: trained and saved, and a note says how many steps it made
    and that a step count alone does not depend on the machine's speed; no note when the steps were all made."""
    _, cache = examples
    out = tmp_path / "h.safetensors"
    base = _small_train_args(out, cache)
    r = _samantic(*base, "--steps", "100000", "--time-budget", "0.0005")  # 0.03 s: a step or two
    assert r.returncode == 0 and out.is_file(), r.stdout + r.stderr
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        steps = int(f.metadata()["steps_done"])
    assert 1 <= steps < 100000
    assert f"ended training at step {steps} of 100000" in r.stderr and "--steps without --time-budget" in r.stderr
    r = _samantic(*base, "--steps", "1", "--time-budget", "10")
    assert r.returncode == 0 and "ended training at step" not in r.stderr, r.stdout + r.stderr


def test_train_samcp_init_starts_from_a_head_and_refuses_another_architecture(trained, examples, tmp_path):
    """--init: the run starts from the file's weights (at lr 0 they come out unchanged), records its digest, and a
    head of other options is refused before the patch cache, naming the file and what differs."""
    import hashlib

    from samantic.heads.samcp import save_samcp

    _, cache = examples
    base = _small_train_args(tmp_path / "h.safetensors", cache)
    r = _samantic(*base, "--init", str(trained), "--steps", "1")  # `trained` has --roi-size 14; this run 7
    assert r.returncode == 1 and str(trained) in r.stderr and "roi_size 14 against 7" in r.stderr, r.stdout + r.stderr
    assert "patches of" not in r.stdout  # refused before the cache
    r = _samantic(*base, "--roi-size", "14", "--fpn-smooth", "separable", "--input-size", "96", "--init", str(trained),
                  "--steps", "1")  # the backbone's options reach the head: another FPN, another input side
    assert r.returncode == 1 and "fpn_smooth None against 'separable'; input_size 384 against 96" in r.stderr, r.stderr
    r = _samantic(*base, "--fpn-smooth", "full", "--steps", "1")
    assert r.returncode == 1 and "fpn_smooth must be one of conv, separable, got 'full'" in r.stderr, r.stderr
    r = _samantic(*base, "--init", str(tmp_path / "missing.safetensors"), "--steps", "1")
    assert r.returncode == 1 and "missing.safetensors" in r.stderr and "Traceback" not in r.stderr
    r = _samantic(*base, "--roi-size", "14", "--init", str(trained), "--steps", "1", "--lr", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    ours, theirs = load_samcp(tmp_path / "h.safetensors"), load_samcp(trained)
    assert ours.info.extra["init"] == hashlib.sha256(trained.read_bytes()).hexdigest()
    assert ours.info.extra["init_file"] == str(trained)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # texture statistics may be added to a head without them (they start at zero: the head starts as the file's) ...
    grown = tmp_path / "grown.safetensors"
    r = _samantic(*_small_train_args(grown, cache), "--roi-size", "14", "--texture-channels", "4", "--init",
                  str(trained), "--steps", "1", "--lr", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    g = load_samcp(grown)
    assert g.info.texture_channels == 4 and g.info.extra["init"] == ours.info.extra["init"]
    gs = g.state_dict()
    assert set(gs) - set(b) == {k for k in gs if k.startswith("roi_embed.texture_")} != set()
    assert all(torch.equal(gs[k], b[k]) for k in b)
    m = g.info.mask_side
    args = (torch.rand(1, 3, 64, 64), [torch.tensor([[2.0, 3, 40, 50], [30, 20, 60, 62]])], [torch.rand(2, m, m)])
    with torch.no_grad():
        torch.testing.assert_close(g.eval()(*args).class_logits[-1], theirs.eval()(*args).class_logits[-1])
    # ... but not taken away: a head with them does not start one without
    r = _samantic(*_small_train_args(tmp_path / "h2.safetensors", cache), "--roi-size", "14", "--init", str(grown),
                  "--steps", "1")
    assert r.returncode == 1 and "texture_channels 4 against None" in r.stderr, r.stdout + r.stderr
    # the run record holds the starting head: resuming with another one is another run
    other = tmp_path / "other.safetensors"
    save_samcp(theirs, other, metadata={"note": "another file"})
    r = _samantic(*base, "--roi-size", "14", "--init", str(other), "--steps", "2", "--resume")
    assert r.returncode == 1 and "another run" in r.stderr and "init" in r.stderr, r.stdout + r.stderr


def test_parse_stages_carries_what_a_stage_leaves_out_and_names_bad_specs():
    from samantic.train.samcp import parse_stages

    first = {"steps": 100, "minutes": 0.0, "lr": 3e-4, "color_perm": 0.0, "texture_channels": 0}
    stages = parse_stages(["steps=50,minutes=2.5", "lr=1e-4, color-perm=0.5", "texture_channels=8", ""], first)
    assert stages == [
        {"steps": 50, "minutes": 2.5, "lr": 3e-4, "color_perm": 0.0, "texture_channels": 0},
        {"steps": 50, "minutes": 2.5, "lr": 1e-4, "color_perm": 0.5, "texture_channels": 0},
        {"steps": 50, "minutes": 2.5, "lr": 1e-4, "color_perm": 0.5, "texture_channels": 8},
        {"steps": 50, "minutes": 2.5, "lr": 1e-4, "color_perm": 0.5, "texture_channels": 8},
    ]
    assert parse_stages([""], first) == [first]  # no --stage: the command's own options, one stage
    for specs, message in ((["steps=1", "epochs=3"], "--stage 2 ('epochs=3'): 'epochs=3' is not KEY=VALUE"),
                           (["lr"], "'lr' is not KEY=VALUE with KEY one of steps, minutes"),
                           (["steps=1.5"], "steps must be an integer, got '1.5'"),
                           (["lr=fast"], "lr must be a number, got 'fast'"),
                           (["steps=0"], "steps must be >= 1"), (["minutes=-1"], "minutes must be a finite number >= 0"),
                           (["lr=nan"], "lr must be a finite number >= 0"), (["minutes=inf"], "finite"),
                           (["color_perm=2"], "color_perm must be in [0, 1]"),
                           (["texture_channels=8", "texture_channels=4"], "--stage 2 ('texture_channels=4'): "
                            "texture_channels 8 -> 4"),
                           (["texture_channels=8", "texture_channels=0"], "switched on once")):
        with pytest.raises(ValueError) as e:
            parse_stages(specs, first)
        assert message in str(e.value)


def test_train_stages_resume_a_stage_cut_short_and_refuse_a_changed_stage_before(examples, tmp_path):
    """A staged run cut short in its second stage and resumed with that stage's steps raised ends with the weights
    of the run never cut; a stage's own checkpoint is refused when its recipe changed, and the second stage's when
    the first trained on since (other starting weights), naming the stage."""
    from samantic.train.samcp import parse_stages, stage_output, train_stages

    ex, _ = examples
    first = {"steps": 2, "minutes": 0.0, "lr": 1e-3, "color_perm": 0.0, "texture_channels": 0}
    cfg = SamcpTrainConfig(images_per_step=1, checkpoint_every=1, seed=3)

    def run(out, specs, resume=False):
        torch.manual_seed(3)
        return train_stages(SamcpHead(small_info()), cfg, ex, parse_stages(specs, first), out, seed=3, resume=resume,
                            progress=False)

    whole = run(tmp_path / "whole.safetensors", ["", "steps=3,lr=5e-4"])
    cut = tmp_path / "cut.safetensors"
    run(cut, ["", "steps=1,lr=5e-4"])
    results = run(cut, ["", "steps=3,lr=5e-4"], resume=True)
    assert [r.steps_run for r in results] == [0, 2] and [r.output for r in results] == [stage_output(cut, 1, 2), cut]
    a, b = load_samcp(whole[-1].output).state_dict(), load_samcp(cut).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"stage 1/2: .*checkpoint of another run.*config.lr 0.001 -> 0.002"):
        run(cut, ["lr=2e-3", "steps=3,lr=5e-4"], resume=True)  # not a resumable change of stage 1
    with pytest.raises(ValueError, match=r"stage 2/2: .*checkpoint of another run.*init_weights"):
        run(cut, ["steps=3", "steps=4,lr=5e-4"], resume=True)  # stage 1 trains on: stage 2 starts elsewhere


def test_train_samcp_stages_give_the_weights_of_separate_runs_chained_by_init(examples, tmp_path):
    """Two --stage's in one command (the second switching on colour permutations and texture statistics) save
    exactly the weights of two commands chained by --init, record the recipe and the chain, and --resume with
    both stages done trains nothing and changes nothing."""
    from safetensors.torch import load_file

    from samantic.models.weights import state_sha256

    _, cache = examples
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    r = _samantic(*_small_train_args(a, cache), "--steps", "2", "--lr", "1e-3")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _samantic(*_small_train_args(b, cache), "--steps", "2", "--lr", "5e-4", "--color-perm", "1",
                  "--texture-channels", "4", "--init", str(a))
    assert r.returncode == 0, r.stdout + r.stderr

    out = tmp_path / "staged.safetensors"
    staged = [*_small_train_args(out, cache), "--steps", "2", "--lr", "1e-3", "--stage", "",
              "--stage", "lr=5e-4,color_perm=1,texture_channels=4"]  # every image of stage 2 permuted
    r = _samantic(*staged)
    assert r.returncode == 0, r.stdout + r.stderr
    first = tmp_path / "staged.stage1.safetensors"
    assert f"stage 1/2: 2 steps, lr 0.001, color_perm 0, texture_channels 0 -> {first}" in r.stdout
    assert f"stage 2/2: 2 steps, lr 0.0005, color_perm 1, texture_channels 4 -> {out}" in r.stdout
    assert r.stdout.count("patches of") == 1  # one load of the patches for both stages
    for ours, theirs in ((first, a), (out, b)):
        x, y = load_file(str(ours)), load_file(str(theirs))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), ours
    head = load_samcp(out)
    assert head.info.texture_channels == 4 and head.info.extra["stage"] == "2/2"
    assert head.info.extra["init_weights"] == state_sha256(load_samcp(first))  # the weights it started from
    assert head.info.extra["init_file"] == str(first) and "init" not in head.info.extra  # `init`: --init's file
    recipe = json.loads(head.info.extra["stages"])
    assert [(s["lr"], s["color_perm"], s["texture_channels"]) for s in recipe] == [(1e-3, 0.0, 0), (5e-4, 1.0, 4)]
    assert json.loads(head.info.extra["train_config"])["color_perm"] == 1.0
    assert (tmp_path / "staged.stage1.safetensors.log.jsonl").is_file() and (tmp_path / "staged.safetensors.ckpt").is_file()
    before = load_file(str(out))
    r = _samantic(*staged, "--resume")
    assert r.returncode == 0 and r.stderr.count("no step trained") == 1, r.stdout + r.stderr  # the last stage's
    assert "steps= of the last --stage" in r.stderr
    after = load_file(str(out))
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a recipe that cannot be run is refused before the patches are loaded
    r = _samantic(*staged[:-1], "texture_channels=4", "--stage", "texture_channels=2")
    assert r.returncode == 1 and "--stage 3 ('texture_channels=2')" in r.stderr and "patches of" not in r.stdout


def test_samcp_head_on_other_sam_weights_warns(trained, nano, tmp_path):
    """Patches of other weights than the head was trained on: Segmenter warns, segment notes it, heads
    without the record (trained before it existed) pass."""
    import copy
    import warnings

    from samantic.batch import SegmentOptions, prepare
    from samantic.models import save_checkpoint
    from samantic.pipeline.panoptic import SamcpWeightsWarning
    from samantic.runtime import Segmenter

    other = copy.deepcopy(nano)
    with torch.no_grad():
        other.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.1)
    head = load_samcp(trained)
    msg = head.check_weights(other, "h.safetensors")
    assert msg is not None and "h.safetensors" in msg and "other weights" in msg
    assert head.info.extra["sam_state_sha256"][:12] in msg
    with pytest.warns(SamcpWeightsWarning, match="other weights"):
        Segmenter(other, samcp=head)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamcpWeightsWarning)
        Segmenter(nano, samcp=head)  # the same weights: silent
        del head.info.extra["sam_state_sha256"]
        assert head.check_weights(other) is None
        Segmenter(other, samcp=head)
    # `samantic segment --samcp` (prepare): a note for the console, no Python warning
    ckpt = save_checkpoint(other.state_dict(), tmp_path / "other.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamcpWeightsWarning)
        prepared = prepare(SegmentOptions(samcp=str(trained), checkpoint=str(ckpt)))
    assert any(n.startswith("warning: ") and "other weights" in n for n in prepared.notes), prepared.notes
    assert not any("other weights" in n for n in prepare(SegmentOptions(samcp=str(trained))).notes)


def test_train_samcp_rejects_unknown_classes(tmp_path):
    r = _samantic("train", "samcp", "--data", "shapes-panoptic:1000000:1", "--out", str(tmp_path / "h.safetensors"),
                  "--classes", "circle,blob", "--no-progress")
    assert r.returncode == 1 and "blob" in r.stderr and "house" in r.stderr


def test_segment_with_samcp_writes_coco_semantic_and_panoptic_files(trained, tmp_path):
    from PIL import Image

    from samantic.io.panoptic import read_panoptic

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(render_panoptic(21, size=SIZE).image).save(src / "a.png")
    (src / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    r = _samantic("segment", str(src), "--out", str(out), "--samcp", str(trained), "--score-thresh", "0",
                  "--no-progress")
    assert r.returncode == 1, r.stdout + r.stderr  # the broken file failed, the good one was done
    assert "broken.png" in r.stderr
    for suffix in (".json", ".semantic.png", ".panoptic.png", ".panoptic.json", ".overlay.png"):
        assert (out / f"a.png{suffix}").is_file(), suffix
    res = json.loads((out / "a.png.json").read_text())
    names = {c["id"]: c["name"] for c in res["categories"]}
    assert [names[i] for i in sorted(names)] == list(THING_CLASSES + STUFF_CLASSES)
    for ann in res["annotations"]:
        assert ann["category_name"] == names[ann["category_id"]] and 0 <= ann["score"] <= 1
        assert mask_utils.area(ann["segmentation"]) == ann["area"]
    ids, segs = read_panoptic(out / "a.png.panoptic.png", out / "a.png.panoptic.json")
    assert len(segs) == len(res["annotations"])
    sem = np.asarray(Image.open(out / "a.png.semantic.png"))
    assert Image.open(out / "a.png.semantic.png").mode == "P"
    for s in segs:
        assert (sem[ids == s["id"]] == s["category_id"]).all()
    assert (sem[ids == 0] == 0).all()
    # the same settings the head was trained with
    assert res["settings"]["points_per_side"] == GRID
    r = _samantic("segment", str(src / "a.png"), "--out", str(tmp_path / "o2"), "--samcp", str(trained),
                  "--classes", "circle,blob", "--no-progress")
    assert r.returncode == 1 and "blob" in r.stderr and "lollipop" in r.stderr


def test_segment_rerun_redoes_missing_files_and_refuses_another_runs_results(trained, tmp_path):
    """A rerun into the same folder: done images are skipped only when every file this run writes exists and
    the results came from the same weights, head, classes and settings; --mask-pngs writes one PNG per segment."""
    import csv
    import socket

    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(render_panoptic(21, size=SIZE).image).save(src / "a.png")
    out = tmp_path / "out"
    plain = _samantic("segment", str(src / "a.png"), "--out", str(out), "--points-per-side", "4", "--no-progress")
    assert plain.returncode == 0, plain.stderr
    # the same folder with a SAM-CP head: another run's results, not skipped as done
    r = _samantic("segment", str(src / "a.png"), "--out", str(out), "--samcp", str(trained), "--no-progress")
    assert r.returncode == 1 and "another run" in r.stderr and "head None ->" in r.stderr, r.stderr
    assert not (out / "a.png.panoptic.png").exists()
    args = ["segment", str(src / "a.png"), "--out", str(out), "--samcp", str(trained), "--score-thresh", "0",
            "--no-progress"]
    assert _samantic(*args, "--overwrite").returncode == 0
    stamp = (out / "a.png.json").stat().st_mtime_ns
    assert _samantic(*args).returncode == 0 and (out / "a.png.json").stat().st_mtime_ns == stamp  # skipped
    # --mask-pngs asks for files that are not there: the image is redone, one PNG per segment
    assert _samantic(*args, "--mask-pngs").returncode == 0
    assert (out / "a.png.json").stat().st_mtime_ns != stamp
    rows = list(csv.DictReader((out / "a.png.masks" / "metadata.csv").open()))
    ids = np.asarray(Image.open(out / "a.png.panoptic.png").convert("RGB")).astype(np.int64)
    ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
    assert len(rows) == len(json.loads((out / "a.png.panoptic.json").read_text())["annotations"][0]["segments_info"])
    for row in rows:
        m = np.asarray(Image.open(out / "a.png.masks" / f"{row['id']}.png")) > 0
        assert (m == (ids == int(row["segment_id"]))).all() and int(row["area"]) == m.sum()
    # other classes: another run again
    r = _samantic(*args, "--classes", trained_names(trained)[0])
    assert r.returncode == 1 and "another run (classes [" in r.stderr, r.stderr
    # a socket among the inputs fails alone; the batch goes on
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(src / "s.png"))
        r = _samantic("segment", str(src / "s.png"), str(src / "a.png"), "--out", str(tmp_path / "o3"), "--samcp",
                      str(trained), "--no-progress")
    finally:
        sock.close()
    assert r.returncode == 1 and "s.png: not a regular file" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "o3" / "a.png.panoptic.png").is_file()
    pan = json.loads((tmp_path / "o3" / "a.png.panoptic.json").read_text())
    assert pan["images"][0]["file_name"] == "a.png" and pan["images"][0]["source"] == str(src / "a.png")


def trained_names(path):
    return load_samcp(path).info.names


def test_oracle_selects_exactly_each_segments_member_patches(nano, examples):
    """The oracle row of `eval samcp`: every thing instance is the union of its member patches (the
    training targets), with its class; stuff comes only from classes whose regions have members."""
    from samantic.train.samcp_cache import PatchCache
    from samantic.train.samcp_eval import OracleSamcpScorer

    _, cache_dir = examples
    pc = PatchCache(cache_dir, nano, points_per_side=GRID, **LOW)
    names = {c["id"]: c["name"] for c in CATEGORIES}
    checked = 0
    for seed in range(1_000_000, 1_000_003):
        image = render_panoptic(seed, size=SIZE).image
        entry = pc.get(image)
        assert entry is not None
        member = assign_patches(entry.iop, entry.box_iop, entry.iou) == 1
        out = SamcpPredictor(OracleSamcpScorer(pc, CATEGORIES), min_area=0, nms_thresh=1.0)(
            image, entry.patch_batch(), entry.patch_boxes)
        expected = []
        for g, cat in enumerate(entry.gt_categories):
            if entry.gt_isthing[g] and member[:, g].any():
                rles = [entry.patch_rles[i] for i in np.flatnonzero(member[:, g])]
                expected.append((names[int(cat)], mask_utils.decode(mask_utils.merge(rles, intersect=False)).astype(bool)))
        got = [(d["category_name"], mask_utils.decode(d["segmentation"]).astype(bool)) for d in out.instances]
        assert len(got) == len(expected)
        for name, mask in expected:
            assert any(n == name and (m == mask).all() for n, m in got), name
            checked += 1
        stuff_with_members = {names[int(c)] for g, c in enumerate(entry.gt_categories)
                              if not entry.gt_isthing[g] and member[:, g].any()}
        assert {s["category_name"] for s in out.segments_info if not s["isthing"]} <= stuff_with_members
        assert all(d["score"] == pytest.approx(1.0) for d in out.instances)
    assert checked > 0
    with pytest.raises(ValueError, match="no entry in the patch cache"):
        OracleSamcpScorer(pc, CATEGORIES).scores(np.zeros((SIZE[0], SIZE[1], 3), np.uint8), [], np.zeros((0, 4)))


def test_eval_samcp_command_with_the_oracle_row(trained, examples, tmp_path):
    _, cache = examples
    out = tmp_path / "ev"
    r = _samantic("eval", "samcp", "--samcp", str(trained), "--seeds", "0:1", "--v1-seeds", "0:1", "--cache", str(cache),
                  "--flip", "--oracle", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "eval_samcp.json").read_text())
    assert [h["head"] for h in res["heads"]] == [str(trained), "oracle"]
    assert res["command"].endswith("--flip --oracle")
    assert res["heads"][0]["setting"].endswith("test-time flip")  # the head mirrored, the oracle not
    head, oracle = res["heads"][0]["v2"], res["heads"][1]["v2"]
    assert 0.0 < oracle["pq"]["all"]["pq"] <= 1.0
    assert oracle["semantic"]["miou"] > head["semantic"]["miou"]  # a 3-step head is far from perfect
    assert res["heads"][1]["v1"]["scenes"] == 1
    md = (out / "eval_samcp.md").read_text()
    assert "| oracle | the training targets as scores" in md
    # the error breakdown: every false negative is missed or misnamed, misnamed ones are the confusion's off-diagonal
    pq = head["pq"]
    matrix = np.array(pq["confusion"]["matrix"])
    per = list(pq["per_class"].values())
    assert all(r["missed"] + r["misnamed"] == r["fn"] and 0 <= r["spurious"] <= r["fp"] for r in per)
    assert [r["misnamed"] for r in per] == (matrix.sum(1) - np.diag(matrix)).tolist()
    assert np.diag(matrix).tolist() == [r["tp"] for r in per]
    assert "| class | PQ | SQ | RQ | IoU | AP50 | TP | missed | misnamed (as) | spurious |" in md
    # the bootstrap interval over scenes: one scene, so every resample is that scene
    for h in (head, oracle):
        assert h["pq_interval_95"]["all"] == pytest.approx([h["pq"]["all"]["pq"]] * 2)
    assert "PQ, 95% bootstrap interval over the v2 scenes" in md and "oracle " in md


def test_named_as_lists_the_other_classes_most_often_first():
    from samantic.cli.eval import _named_as

    confusion = {"names": ["a", "b", "c"], "matrix": [[4, 1, 3], [0, 2, 0], [0, 0, 0]]}
    assert _named_as(confusion, 0) == " (c 3, b 1)"
    assert _named_as(confusion, 1) == "" and _named_as({}, 0) == ""
