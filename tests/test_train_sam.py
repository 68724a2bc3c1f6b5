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


class _Items:
    """A finite stream of tagged items (``MixedStream`` only indexes it)."""

    def __init__(self, tag, n):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return (self.tag, i)


def test_mixed_stream_wraps_finite_streams_and_keeps_endless_ones_in_order():
    from samantic.train.data.shapes import render_scene
    from samantic.train.sam import MixedStream, ShapesStream

    mix = MixedStream([_Items("a", 3), _Items("b", 5)])
    assert len(mix) == 10  # each stream equally likely under a random index
    assert [mix[i] for i in range(8)] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 0), ("b", 3)]
    assert mix[19] == ("b", 4)
    endless = MixedStream([ShapesStream(0), _Items("b", 2)])
    assert len(endless) == 1 << 30 and endless[5] == ("b", 0)
    assert np.array_equal(endless[4].image, render_scene(2).image)  # the endless stream in order
    with pytest.raises(ValueError, match="is empty"):
        MixedStream([_Items("a", 0)])
    with pytest.raises(ValueError, match="at least one stream"):
        MixedStream([])


def _anchor_batch(anchored, low_res):
    from samantic.train.data.shapes import render_scene
    from samantic.train.sam import Preparer, Sample, collate

    prep = Preparer(384, low_res, SamTrainConfig(zoom_prob=0.0, flat_steps=0, masks_per_image=2))
    rng = np.random.default_rng(0)
    items = []
    for seed, anchor in zip((1, 2), anchored):
        s = render_scene(seed, size=(96, 128))
        items.append(prep(Sample(s.image, s.masks, anchor=anchor), rng, 0))
    return collate(items)


def test_anchor_encoder_distils_the_anchored_images_only():
    """The anchor term is weight x the relative squared difference of the anchored images' embeddings."""
    import copy

    from samantic.models import create_model

    base = create_model("sam_nano").eval()
    config = SamTrainConfig(images_per_step=2, masks_per_image=2, iterations=1, box_prob=0.0, lr=1e-4,
                            trainable=("image_encoder", "mask_decoder"))
    reference = copy.deepcopy(base.image_encoder)
    with torch.no_grad():  # a reference that differs from the model, so the term is not zero
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    low_res = base.prompt_encoder.mask_input_size[0]
    batch = _anchor_batch([True, False], low_res)
    assert batch["anchor"].tolist() == [True, False]
    assert "anchor" not in _anchor_batch([False, False], low_res)

    def step(weight, encoder, b=batch):
        trainer = SamTrainer(copy.deepcopy(base), config, data=None, anchor_encoder=encoder, anchor_weight=weight)
        return trainer.train_step(b)

    plain, plain_stats = step(0.0, None)
    one, one_stats = step(1.0, reference)
    three, three_stats = step(3.0, reference)
    assert "anchor" not in plain_stats and one_stats["anchor"] > 1e-4
    assert one_stats["anchor"] == pytest.approx(three_stats["anchor"], rel=1e-5)
    assert one - plain == pytest.approx(one_stats["anchor"], rel=1e-3)
    assert three - plain == pytest.approx(3 * one_stats["anchor"], rel=1e-3)
    # by hand: only image 0 is anchored
    with torch.no_grad():
        x = SamTrainer(copy.deepcopy(base), config, data=None)._images(batch)
        ref = reference(x[:1])
        want = ((base.image_encoder(x[:1]) - ref) ** 2).mean() / (ref ** 2).mean()
    assert one_stats["anchor"] == pytest.approx(float(want), rel=1e-4)
    # the base's own encoder as the reference: nothing to pull toward at the first step
    _, same = step(1.0, copy.deepcopy(base.image_encoder))
    assert same["anchor"] == pytest.approx(0.0, abs=1e-10)
    _, no_anchor = step(1.0, reference, _anchor_batch([False, False], low_res))
    assert "anchor" not in no_anchor
    with pytest.raises(ValueError, match="does not train"):
        SamTrainer(copy.deepcopy(base), SamTrainConfig(trainable=("mask_decoder",)), None, anchor_encoder=reference,
                   anchor_weight=1.0)
    with pytest.raises(ValueError, match="anchor_weight must be > 0"):
        SamTrainer(copy.deepcopy(base), config, None, anchor_encoder=reference, anchor_weight=0.0)


def test_distill_prompts_lie_inside_each_image():
    from samantic.models import create_model

    trainer = SamTrainer(create_model("sam_nano"), SamTrainConfig(), data=None, reference=create_model("sam_nano"),
                         distill_weight=1.0, distill_points=50)
    sizes = torch.tensor([[96, 128], [384, 200]])  # rows, columns
    index, coords = trainer.distill_prompts(sizes)
    assert index.tolist() == [0] * 50 + [1] * 50 and coords.shape == (100, 1, 2)
    x, y = coords[:, 0, 0], coords[:, 0, 1]
    assert (x >= 0).all() and (y >= 0).all()
    assert (x[:50] < 128).all() and (y[:50] < 96).all() and (x[50:] < 200).all() and (y[50:] < 384).all()
    assert x[:50].max() > 64 and y[50:].max() > 192  # spread over the image, not a corner


def test_reference_distils_point_outputs_on_anchored_images():
    """The distillation term: mean squared difference of the logits where either lies inside the
    boundary band (+-DISTILL_CLIP) or they disagree on the side, + iou_weight x the squared difference
    of the predicted IoUs; computed by hand with segment-anything's own MaskDecoder."""
    import copy

    from samantic.models import create_model
    from samantic.train.sam import DISTILL_CLIP

    base = create_model("sam_nano").eval()
    config = SamTrainConfig(images_per_step=2, masks_per_image=2, iterations=1, box_prob=0.0, lr=1e-4,
                            trainable=("image_encoder", "mask_decoder"))
    reference = copy.deepcopy(base)
    with torch.no_grad():  # a reference whose decoder differs from the model's, so the term is not zero
        for p in reference.mask_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    low_res = base.prompt_encoder.mask_input_size[0]
    batch = _anchor_batch([False, True], low_res)
    coords = torch.tensor([[[10.0, 20.0]], [[60.0, 40.0]], [[120.0, 90.0]]])
    tasks_seen = []

    def hook(sparse, dense, tasks):
        tasks_seen.append(tasks.clone())
        return sparse, dense

    def step(weight, ref, b=batch):
        trainer = SamTrainer(copy.deepcopy(base), config, data=None, reference=ref, distill_weight=weight,
                             prompt_hook=hook)
        trainer.distill_prompts = lambda sizes: (torch.zeros(len(coords), dtype=torch.long), coords)
        return trainer.train_step(b)

    plain, plain_stats = step(0.0, None)
    one, one_stats = step(1.0, reference)
    three, three_stats = step(3.0, reference)
    assert "distill" not in plain_stats and one_stats["distill"] > 1e-4 and one_stats["distill_iou"] > 0
    term = one_stats["distill"] + config.iou_weight * one_stats["distill_iou"]
    assert one - plain == pytest.approx(term, rel=1e-3)
    assert three - plain == pytest.approx(3 * term, rel=1e-3)
    assert torch.equal(tasks_seen[-1], torch.zeros(3, dtype=torch.long))  # the distilled prompts ask task 0
    # by hand, image 1 (the anchored one) through segment-anything's MaskDecoder, one prompt at a time
    with torch.no_grad():
        x = SamTrainer(copy.deepcopy(base), config, data=None)._images(batch)[1:]
        lows, ref_lows, ious, ref_ious = [], [], [], []
        for model, lo, io in ((base, lows, ious), (reference, ref_lows, ref_ious)):
            emb = model.image_encoder(x)
            for c in coords:
                sparse, dense = model.prompt_encoder(points=(c[None], torch.ones(1, 1, dtype=torch.long)),
                                                     boxes=None, masks=None)
                m, q = model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=True)
                lo.append(m)
                io.append(q)
        low, ref_low = torch.cat(lows), torch.cat(ref_lows).clamp(-DISTILL_CLIP, DISTILL_CLIP)
        err = low - ref_low
        both = ((low >= DISTILL_CLIP) & (ref_low >= DISTILL_CLIP)) | ((low <= -DISTILL_CLIP) & (ref_low <= -DISTILL_CLIP))
        err[both] = 0
        want = (err ** 2).sum() / (~both).sum()
        want_iou = ((torch.cat(ious) - torch.cat(ref_ious)) ** 2).mean()
    assert one_stats["distill"] == pytest.approx(float(want), rel=1e-3)
    assert one_stats["distill_iou"] == pytest.approx(float(want_iou), rel=1e-3)
    # the base itself as the reference: nothing to distil at the first step
    _, same = step(1.0, copy.deepcopy(base))
    assert same["distill"] == pytest.approx(0.0, abs=1e-10) and same["distill_iou"] == pytest.approx(0.0, abs=1e-12)
    _, none = step(1.0, reference, _anchor_batch([False, False], low_res))
    assert "distill" not in none
    with pytest.raises(ValueError, match="distill_weight must be > 0"):
        SamTrainer(copy.deepcopy(base), config, None, reference=reference, distill_weight=0.0)
    with pytest.raises(ValueError, match="distill_points"):
        SamTrainer(copy.deepcopy(base), config, None, reference=reference, distill_weight=1.0, distill_points=0)


def test_anchored_images_without_labels_train_only_the_distillation():
    import copy

    from samantic.models import create_model

    base = create_model("sam_nano").eval()
    config = SamTrainConfig(images_per_step=2, masks_per_image=2, iterations=1, box_prob=0.0, lr=1e-4,
                            trainable=("mask_decoder",))
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for p in reference.mask_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    low_res = base.prompt_encoder.mask_input_size[0]

    def step(batch, labels):
        trainer = SamTrainer(copy.deepcopy(base), config, data=None, reference=reference, distill_weight=1.0,
                             anchor_labels=labels)
        return trainer.train_step(batch)

    # every image anchored, no labels: the loss is the distillation term alone
    loss, stats = step(_anchor_batch([True, True], low_res), False)
    assert "iou_0" not in stats and stats["distill"] > 0
    assert loss == pytest.approx(stats["distill"] + config.iou_weight * stats["distill_iou"], rel=1e-5)
    # with labels, the same batch adds the mask loss
    with_labels, stats2 = step(_anchor_batch([True, True], low_res), True)
    assert "iou_0" in stats2 and with_labels - (stats2["distill"] + config.iou_weight * stats2["distill_iou"]) > 1e-3
    # a mixed batch keeps the unanchored image's instances
    _, mixed = step(_anchor_batch([False, True], low_res), False)
    assert "iou_0" in mixed and "distill" in mixed


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_batchnorm_keeps_running_statistics_and_trains_the_affine(tmp_path, freeze):
    import copy

    from samantic.models import create_model
    from samantic.train.sam import ShapesStream

    base = create_model("sam_nano").eval()
    config = SamTrainConfig(steps=1, images_per_step=2, masks_per_image=2, iterations=1, box_prob=0.0, lr=1e-3,
                            warmup_steps=1, trainable=("image_encoder", "mask_decoder"), freeze_batchnorm=freeze)
    model = copy.deepcopy(base)
    SamTrainer(model, config, ShapesStream(0), workers=0).train(tmp_path / "m.safetensors", progress=False)
    before, after = base.image_encoder.state_dict(), model.image_encoder.state_dict()
    stats = [k for k in before if k.endswith("running_mean") or k.endswith("running_var")]
    affine = [k[: -len("running_mean")] + "weight" for k in stats if k.endswith("running_mean")]
    assert stats and affine
    assert all(torch.equal(before[k], after[k]) for k in stats) == freeze
    assert any(not torch.equal(before[k], after[k]) for k in affine)  # the scales train either way


def test_soft_stability_approaches_segment_anythings_score():
    from segment_anything.utils.amg import calculate_stability_score

    from samantic.train.sam import soft_stability

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, 40, generator=gen) * 4
    logits[3] = -5.0  # empty at both offsets
    sharp = logits[4].clone()
    logits[4, :10] = 0.5  # a band between -1 and +1: unstable
    logits = torch.where((logits.abs() - 1).abs() < 0.05, logits * 1.2, logits)  # none at a step
    want = calculate_stability_score(logits, 0.0, 1.0)
    got = soft_stability(logits, slope=200.0)
    ok = ~torch.isnan(want)
    assert torch.allclose(got[ok], want[ok], atol=2e-3)
    assert got[3] == pytest.approx(1.0)  # an empty mask is stable, not nan
    assert soft_stability(logits)[4] < soft_stability(sharp) - 0.05  # the band costs stability at the default slope
    # a steeper boundary scores higher at the default slope
    ramp = torch.linspace(-3, 3, 40)[None, None, :].expand(1, 40, 40)
    assert soft_stability(ramp * 4) > soft_stability(ramp)


def test_stability_term_adds_weight_times_one_minus_the_soft_stability():
    import copy

    from samantic.models import create_model

    base = create_model("sam_nano").eval()
    batch = _anchor_batch([False, False], base.prompt_encoder.mask_input_size[0])

    def step(weight):
        config = SamTrainConfig(images_per_step=2, masks_per_image=2, iterations=1, box_prob=0.0, lr=1e-4,
                                trainable=("mask_decoder",), stability_weight=weight)
        return SamTrainer(copy.deepcopy(base), config, data=None).train_step(batch)

    plain, plain_stats = step(0.0)
    two, two_stats = step(2.0)
    assert "soft_stability" not in plain_stats and 0.0 < two_stats["soft_stability"] < 1.0
    assert two - plain == pytest.approx(2.0 * (1.0 - two_stats["soft_stability"]), rel=1e-3, abs=1e-6)
    with pytest.raises(ValueError, match="stability_weight"):
        SamTrainConfig(stability_weight=-1.0)
