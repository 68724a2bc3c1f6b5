"""The SAM trainer: loss falls on a fresh model, checkpoints resume, bad options are refused."""

import json

import numpy as np
import pytest
import torch

from samantic.train.sam import MaskLoss, PointSampler, SamTrainConfig, SamTrainer


def test_loss_falls_and_masks_appear_on_a_fresh_model(structured_nano):
    history = structured_nano.training_result.history
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["iou_0"] > 0.5  # a random model's masks do not overlap the objects at all
    log = [json.loads(l) for l in structured_nano.training_result.log.read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in history]


def test_checkpoint_resumes_where_it_stopped(tmp_path):
    from conftest import DiskWorld

    from samantic.models import create_model

    torch.manual_seed(0)
    cfg = SamTrainConfig(steps=2, images_per_step=1, masks_per_image=1, iterations=1, warmup_steps=1,
                         checkpoint_every=1, log_every=1)
    model = create_model("sam_nano", pretrained=False)
    out = tmp_path / "m.safetensors"
    SamTrainer(model, cfg, DiskWorld(disks=1, n=4)).train(out, progress=False)
    state = torch.load(out.with_name(out.name + ".ckpt"), weights_only=True)
    assert state["step"] == 2
    resumed = SamTrainer(create_model("sam_nano", pretrained=False), cfg.__class__(**{**cfg.__dict__, "steps": 3}),
                         DiskWorld(disks=1, n=4))
    resumed.load_state(out.with_name(out.name + ".ckpt"))
    assert resumed.step == 2
    for (k, a), b in zip(model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    result = resumed.train(out, resume=True, progress=False)
    assert result.steps == 3


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="trainable"):
        SamTrainConfig(trainable=("decoder",))
    with pytest.raises(ValueError, match="steps"):
        SamTrainConfig(steps=0)
    with pytest.raises(ValueError, match="box_prob"):
        SamTrainConfig(box_prob=2.0)


def test_point_sampler_and_loss():
    gen = torch.Generator().manual_seed(0)
    gt = torch.zeros(2, 20, 20, dtype=torch.bool)
    gt[0, 5:10, 5:10] = True
    gt[1, 12:18, 2:6] = True
    coords, labels = PointSampler().first_points(gt, gen)
    for i in range(2):
        x, y = coords[i, 0]
        assert gt[i, int(y), int(x)] and labels[i, 0] == 1
    pred = gt.clone()
    pred[0, 0:3, 0:3] = True  # a false alarm only: the next point is negative, inside it
    pred[1] = False  # a miss only: the next point is positive, inside the object
    coords, labels = PointSampler().next_points(gt, pred, gen)
    x, y = coords[0, 0]
    assert labels[0, 0] == 0 and int(x) < 3 and int(y) < 3
    x, y = coords[1, 0]
    assert labels[1, 0] == 1 and gt[1, int(y), int(x)]
    loss = MaskLoss()
    good = loss(torch.where(gt, 10.0, -10.0), gt)
    bad = loss(torch.where(gt, -10.0, 10.0), gt)
    assert (good < 0.01).all() and (bad > 1.0).all()


def test_open_dataset_streams_v1_v2_and_mixed():
    from samantic.train.data.panoptic import render_panoptic
    from samantic.train.data.shapes import render_scene
    from samantic.train.sam import MixedStream, PanopticShapesStream, ShapesStream, open_dataset

    v2 = open_dataset("shapes-panoptic:5")
    assert isinstance(v2, PanopticShapesStream)
    scene = render_panoptic(7)
    s = v2[2]
    assert (s.image == scene.image).all()
    # every entity (things whole, stuff regions) and every part of a composite thing
    assert len(s.masks) == len(scene.masks) + len(scene.stuff_masks) + len(scene.part_masks)
    mix = open_dataset("shapes-mix:10")
    assert isinstance(mix, MixedStream) and isinstance(open_dataset("shapes:3"), ShapesStream)
    assert (mix[0].image == render_scene(10).image).all()
    assert (mix[1].image == render_panoptic(10).image).all()
    assert (mix[3].image == render_panoptic(11).image).all()
    for bad in ("shapes-panoptic:x", "shapes-mix:-1", "shapes:"):
        with pytest.raises(ValueError, match="data spec"):
            open_dataset(bad)
