"""SUM's data (labelled set, images-only pool, cached soft pseudo-labels) and its uncertainty-aware
prompts and loss, plugged into the SAM trainer."""

import copy

import numpy as np
import pytest
import torch

from samantic.train.sam import MaskLoss, PointSampler, Preparer, Sample, SamTrainConfig, SamTrainer, collate
from samantic.train.sum import (ENTITY, PART, SALIENT, UNSPECIFIED, LabelledFolder, LabelledScenes,
                                PoolGroundTruth, PseudoLabelCache, PseudoLabelled, UncertaintyMaskLoss,
                                UncertaintyPointSampler, UnlabelledPool, build_pseudo_labels, open_labelled,
                                open_pool, scene_task_masks)

SIZE = (96, 128)


@pytest.fixture(scope="module")
def nano():
    from samantic.models import create_model

    return create_model("sam_nano").eval()


# ---------------------------------------------------------------- labelled set


def test_task_masks_cover_every_task_of_a_scene():
    from samantic.models.tasks import TASKS
    from samantic.train.data.panoptic import COMPOSITE_PARTS, render_panoptic

    assert [TASKS[t] for t in (UNSPECIFIED, SALIENT, ENTITY, PART)] == ["unspecified", "salient", "entity", "part"]
    for seed in range(3000000, 3000012):
        scene = render_panoptic(seed, size=SIZE)
        masks, tasks = scene_task_masks(scene)
        t, s = len(scene.masks), len(scene.stuff_masks)
        composites = sum(n in COMPOSITE_PARTS for n in scene.names)
        assert list(np.bincount(tasks, minlength=4)) == [t, 1, t + s, t + composites]
        assert (masks[tasks == UNSPECIFIED] == scene.masks).all()
        assert (masks[tasks == SALIENT][0] == scene.salient_mask).all()
        assert (masks[tasks == ENTITY] == scene.entity_masks).all()
        parts = masks[tasks == PART]
        assert parts.any(axis=(1, 2)).all()
        # every part lies inside one thing, and each thing is exactly the union of its parts
        union = np.zeros_like(scene.masks)
        for p in parts:
            owner = [k for k in range(t) if (p <= scene.masks[k]).all()]
            assert len(owner) == 1
            union[owner[0]] |= p
        assert (union == scene.masks).all()
        if len(scene.part_masks):
            assert any((parts == pm).all(axis=(1, 2)).any() for pm in scene.part_masks)


def test_labelled_folder_reads_what_the_scenes_give(tmp_path):
    from samantic.train.data.panoptic import render_panoptic, write_panoptic

    seeds = [3000001, 3000004]
    write_panoptic(tmp_path, [render_panoptic(s, size=SIZE) for s in seeds], progress=False)
    folder = open_labelled(tmp_path)
    assert isinstance(folder, LabelledFolder) and len(folder) == 2
    for i, s in enumerate(seeds):
        a, b = folder[i], LabelledScenes(s, 1, size=SIZE)[0]
        assert (a.image == b.image).all()
        assert (a.tasks == b.tasks).all() and (a.masks == b.masks).all()
    stream = open_labelled("shapes-panoptic:7:3")
    assert isinstance(stream, LabelledScenes) and (stream.seed, len(stream)) == (7, 3)
    for bad in ("shapes-panoptic:x", "shapes-panoptic:-1", "shapes-panoptic:1:0"):
        with pytest.raises(ValueError, match="labelled set"):
            open_labelled(bad)
    with pytest.raises(FileNotFoundError, match="instances.json"):
        open_labelled(tmp_path / "images")


# ---------------------------------------------------------------- unlabelled pool


def test_pool_gives_images_and_only_the_evaluation_accessor_gives_ground_truth(tmp_path):
    from samantic.train.data.panoptic import render_panoptic, write_panoptic

    pool = UnlabelledPool(40, 3, size=SIZE)
    assert len(pool) == 3 and pool.key(1) == "shapes-panoptic:41"
    image = pool[1]
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == SIZE + (3,)
    scene = render_panoptic(41, size=SIZE)
    assert (image == scene.image).all()
    # the pool holds a seed range and nothing else
    assert not any(isinstance(v, np.ndarray) or hasattr(v, "masks") for v in vars(pool).values())
    gt = PoolGroundTruth(pool)[1]
    assert (gt == np.concatenate([scene.entity_masks, scene.part_masks])).all()
    # a folder pool lists images only; its ground truth comes from the same accessor
    write_panoptic(tmp_path, [render_panoptic(s, size=SIZE) for s in (40, 41)], progress=False)
    folder = open_pool(tmp_path)
    assert len(folder) == 2 and (folder[1] == scene.image).all()
    assert (PoolGroundTruth(folder)[1] == gt).all()
    with pytest.raises(ValueError, match="unlabelled pool"):
        open_pool("shapes-panoptic:1:2:3")


class _ImageOnly:
    """A rendered scene whose ground truth cannot be read."""

    def __init__(self, scene):
        self.image = scene.image

    def __getattr__(self, name):
        raise AssertionError(f"training read the pool's ground truth ({name})")


def test_training_data_from_the_pool_never_reads_ground_truth(nano, tmp_path, monkeypatch):
    import samantic.train.data.panoptic as panoptic

    real = panoptic.render_panoptic
    monkeypatch.setattr(panoptic, "render_panoptic", lambda *a, **k: _ImageOnly(real(*a, **k)))
    pool = UnlabelledPool(50, 2, size=SIZE)
    cache = PseudoLabelCache(tmp_path, nano, points_per_side=4, pred_iou_thresh=0.3, stability_score_thresh=0.7)
    data = PseudoLabelled(pool, cache,
                          uncertainty=lambda image, labels: np.full((len(labels),) + image.shape[:2], 0.25))
    for i in range(len(data)):
        sample = data[i]
        assert (sample.tasks == UNSPECIFIED).all() and sample.uncertainty.shape == sample.masks.shape
    with pytest.raises(AssertionError, match="ground truth"):
        PoolGroundTruth(pool)[0]


# ---------------------------------------------------------------- pseudo-labels


def test_pseudo_labels_keep_the_generators_masks_as_soft_logits_and_are_cached(nano, tmp_path):
    from samantic.ops import rle_decode
    from samantic.pipeline import AutomaticMaskGenerator

    pool = UnlabelledPool(4000000, 2, size=(160, 200))
    kw = dict(points_per_side=8, pred_iou_thresh=0.3, stability_score_thresh=0.8)
    report = build_pseudo_labels(nano, pool, tmp_path, progress=False, **kw)
    assert (report.computed, report.reused) == (2, 0) and report.masks > 0
    assert report.dir.name == report.key and (report.dir / "meta.json").is_file()
    again = build_pseudo_labels(nano, pool, tmp_path, progress=False, **kw)
    assert (again.computed, again.reused, again.masks) == (0, 2, report.masks)
    # the key follows thresholds and weights
    other = PseudoLabelCache(tmp_path, nano, points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.8)
    assert other.key != report.key
    nudged = copy.deepcopy(nano)
    with torch.no_grad():
        nudged.mask_decoder.iou_token.weight[0, 0] += 1e-3
    assert PseudoLabelCache(tmp_path, nudged, **kw).key != report.key
    # every cached mask is the generator's mask, with its soft probabilities kept
    generator = AutomaticMaskGenerator(nano, **kw)
    cache = PseudoLabelCache(tmp_path, nano, **kw)
    soft = 0
    for i in range(len(pool)):
        entry = cache.get(pool[i])
        ref = generator.generate_masks(pool[i])
        assert entry is not None and len(entry) == len(ref)
        assert entry.logits.dtype == np.float16 and entry.logits.shape[1:] == (192, 192)
        assert np.allclose(entry.iou_preds, ref.iou_preds) and (entry.boxes == ref.boxes).all()
        ours, theirs = entry.masks(), rle_decode(ref.rles).astype(bool)
        for a, b in zip(ours, theirs):
            assert (a ^ b).sum() <= max(3, 0.002 * b.sum())  # float16 logits round a rare boundary pixel
        p = entry.probabilities()
        assert p.min() >= 0 and p.max() <= 1
        soft += ((p > 0.05) & (p < 0.95)).sum()
    assert soft > 0
    # a damaged entry is recomputed, never trusted
    path = cache.path(pool[0])
    path.write_bytes(b"not an npz")
    assert cache.get(pool[0]) is None
    assert build_pseudo_labels(nano, pool, tmp_path, progress=False, **kw).computed == 1


# ---------------------------------------------------------------- the trainer carries tasks and uncertainty


def test_preparer_moves_tasks_and_uncertainty_with_their_masks():
    rng = np.random.default_rng(0)
    h, w = 120, 160
    for seed in range(20):
        n = 6
        masks = np.zeros((n, h, w), bool)
        for k in range(n):
            y, x = rng.integers(0, h - 30), rng.integers(0, w - 30)
            masks[k, y : y + 30, x : x + 30] = True
        tasks = np.arange(n, dtype=np.int64)
        unc = np.broadcast_to((tasks / 10.0)[:, None, None], (n, h, w)).astype(np.float16)  # mask k: U = k / 10
        config = SamTrainConfig(zoom_prob=0.5, masks_per_image=4)
        item = Preparer(64, 16, config)(Sample(np.zeros((h, w, 3), np.uint8), masks, tasks, unc),
                                        np.random.default_rng(seed), 0)
        assert item is not None and len(item.tasks) == len(item.soft) == len(item.uncertainty)
        ih, iw = (item.image.shape[0] + 3) // 4, (item.image.shape[1] + 3) // 4
        inside = item.uncertainty[:, : ih - 1, : iw - 1].astype(np.float32)
        assert np.allclose(inside, (item.tasks / 10.0)[:, None, None], atol=2e-3)
        assert (item.uncertainty[:, ih:] == 0).all() and (item.uncertainty[:, :, iw:] == 0).all()
    plain = Preparer(64, 16, config)(Sample(np.zeros((h, w, 3), np.uint8), masks), np.random.default_rng(0), 0)
    assert plain.tasks is None and plain.uncertainty is None
    batch = collate([item, plain])
    assert "tasks" not in collate([plain]) and "uncertainty" not in collate([plain])
    assert batch["tasks"].tolist() == item.tasks.tolist() + [0] * len(plain.soft)
    assert batch["uncertainty"].shape == batch["soft"].shape
    assert (batch["uncertainty"][len(item.soft):] == 0).all()


# ---------------------------------------------------------------- sampler


def test_sampler_never_draws_where_u_is_one_and_draws_in_proportion_to_one_minus_u():
    gen = torch.Generator().manual_seed(0)
    m = 6000
    gt = torch.zeros(m, 10, 10, dtype=torch.bool)
    gt[:, 2:8, 2:8] = True
    u = torch.zeros(m, 10, 10)
    u[:, 2:8, 2:4] = 1.0  # never
    u[:, 2:8, 4:6] = 0.5  # half as often as ...
    u[:, 2:8, 6:8] = 0.0  # ... here
    coords, labels = UncertaintyPointSampler().first_points(gt, gen, uncertainty=u)
    x = coords[:, 0, 0].long()
    y = coords[:, 0, 1].long()
    assert (labels == 1).all() and gt[torch.arange(m), y, x].all()
    assert not (x < 4).any()
    half, full = int(((x >= 4) & (x < 6)).sum()), int((x >= 6).sum())
    # expected share 1/3 of 6000 = 2000, binomial sd ~37
    assert abs(half - m / 3) < 5 * (m * (1 / 3) * (2 / 3)) ** 0.5, (half, full)
    # later points: the error region, likewise weighted; a miss only gives positive points
    pred = torch.zeros_like(gt)
    pred[:, 2:8, 2:5] = True  # misses columns 5-7
    coords, labels = UncertaintyPointSampler().next_points(gt, pred, gen, uncertainty=u)
    x = coords[:, 0, 0].long()
    assert (labels == 1).all() and (x >= 5).all()
    n5, n67 = int((x == 5).sum()), int((x >= 6).sum())  # weights 0.5 * 6 vs 1 * 12 pixels
    assert abs(n5 / m - 0.2) < 0.03, n5
    # an untrusted miss is not chased: a trusted false alarm is
    pred2 = gt.clone()
    pred2[:, 2:8, 2:4] = False  # a miss where U = 1
    pred2[:, 0, 0] = True  # a false alarm where U = 0
    coords, labels = UncertaintyPointSampler().next_points(gt, pred2, gen, uncertainty=u)
    assert (labels == 0).all() and (coords[:, 0] == 0.5).all()


def test_sampler_without_uncertainty_or_with_zero_uncertainty_is_the_base_sampler():
    gt = torch.zeros(50, 12, 12, dtype=torch.bool)
    gt[:, 3:9, 1:7] = True
    pred = torch.zeros_like(gt)
    pred[:, 0:5, 0:10] = True
    base, ours = PointSampler(), UncertaintyPointSampler()
    for call in (lambda s, g, **k: s.first_points(gt, g, **k), lambda s, g, **k: s.next_points(gt, pred, g, **k)):
        a = call(base, torch.Generator().manual_seed(3))
        b = call(ours, torch.Generator().manual_seed(3))
        c = call(ours, torch.Generator().manual_seed(3), uncertainty=torch.zeros(gt.shape))
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and all(torch.equal(x, y) for x, y in zip(a, c))


# ---------------------------------------------------------------- loss


def test_loss_is_mask_loss_at_zero_uncertainty_and_ignores_pixels_at_one():
    torch.manual_seed(0)
    logits = torch.randn(5, 16, 16) * 3
    gt = torch.rand(5, 16, 16) > 0.6
    plain, ours = MaskLoss(), UncertaintyMaskLoss()
    assert torch.equal(ours(logits, gt), plain(logits, gt))
    assert torch.allclose(ours(logits, gt, uncertainty=torch.zeros(5, 16, 16)), plain(logits, gt), atol=1e-7)
    u = torch.zeros(5, 16, 16)
    u[:, :, :8] = 1.0
    loss = ours(logits, gt, uncertainty=u)
    scrambled_logits, scrambled_gt = logits.clone(), gt.clone()
    scrambled_logits[:, :, :8] = torch.randn(5, 16, 8) * 10
    scrambled_gt[:, :, :8] = ~gt[:, :, :8]
    assert torch.allclose(loss, ours(scrambled_logits, scrambled_gt, uncertainty=u), atol=1e-6)
    assert not torch.allclose(plain(logits, gt), plain(scrambled_logits, scrambled_gt))
    # focal weighted by 1 - U, dice only where 1 - U > 0.5: at U = 0.6 a pixel is in the focal term only
    u = torch.full((5, 16, 16), 0.6)
    only_focal = UncertaintyMaskLoss(focal_weight=1.0, dice_weight=0.0)
    assert torch.allclose(only_focal(logits, gt, uncertainty=u), 0.4 * MaskLoss(1.0, 0.0)(logits, gt), atol=1e-6)
    only_dice = UncertaintyMaskLoss(focal_weight=0.0, dice_weight=1.0)
    assert torch.allclose(only_dice(logits, gt, uncertainty=u), torch.zeros(5))  # nothing left: (0 + 1) / (0 + 1)
    with pytest.raises(ValueError, match="dice_threshold"):
        UncertaintyMaskLoss(dice_threshold=1.0)


# ---------------------------------------------------------------- the trainer with SUM's hooks


class _Spy:
    def __init__(self):
        self.calls = []


class _SpySampler(UncertaintyPointSampler):
    def __init__(self, spy):
        self.spy = spy

    def first_points(self, gt, gen, uncertainty=None):
        self.spy.calls.append(("first", None if uncertainty is None else uncertainty.shape))
        return super().first_points(gt, gen, uncertainty=uncertainty)

    def next_points(self, gt, pred, gen, uncertainty=None):
        self.spy.calls.append(("next", None if uncertainty is None else uncertainty.shape))
        return super().next_points(gt, pred, gen, uncertainty=uncertainty)


class _SpyLoss(UncertaintyMaskLoss):
    def __init__(self, spy):
        super().__init__()
        self.spy = spy

    def __call__(self, logits, gt, weight=None, uncertainty=None):
        self.spy.calls.append(("loss", None if uncertainty is None else float(uncertainty.max())))
        return super().__call__(logits, gt, weight, uncertainty)


class _TinyPseudoLabelled:
    """Disks as pseudo-labels, the right half of each one fully uncertain."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        from conftest import DiskWorld

        s = DiskWorld(size=(96, 96), disks=2)[i]
        unc = np.zeros(s.masks.shape, np.float16)
        unc[:, :, 48:] = 1.0
        return Sample(s.image, s.masks, tasks=np.array([UNSPECIFIED, PART]), uncertainty=unc)


def test_sam_trainer_runs_sum_sampler_loss_and_task_hook_on_pseudo_labels(tmp_path):
    from samantic.models import create_model

    torch.manual_seed(0)
    spy, tasks_seen = _Spy(), []

    def hook(sparse, dense, tasks):
        tasks_seen.append(tasks.tolist())
        return sparse, dense

    config = SamTrainConfig(steps=2, images_per_step=2, masks_per_image=2, iterations=2, warmup_steps=1,
                            box_prob=0.0, zoom_prob=0.0, log_every=1, checkpoint_every=10)
    trainer = SamTrainer(create_model("sam_nano", pretrained=False), config, _TinyPseudoLabelled(),
                         sampler=_SpySampler(spy), loss=_SpyLoss(spy), prompt_hook=hook)
    result = trainer.train(tmp_path / "sum.safetensors", progress=False)
    assert result.steps == 2 and np.isfinite(result.last_loss)
    kinds = [c[0] for c in spy.calls]
    assert kinds.count("first") == 2 and kinds.count("next") == 2 and kinds.count("loss") == 4
    assert all(c[1] is not None for c in spy.calls)  # every hook got the maps
    assert max(c[1] for c in spy.calls if c[0] == "loss") == 1.0
    assert len(tasks_seen) == 4 and all(sorted(set(t)) == [UNSPECIFIED, PART] for t in tasks_seen)


def test_plain_hooks_train_as_before_on_data_with_extras(tmp_path):
    """Vanilla fine-tuning on the same data: hooks without the parameters get no extras."""
    from samantic.models import create_model

    torch.manual_seed(0)
    calls = []
    config = SamTrainConfig(steps=1, images_per_step=2, masks_per_image=2, iterations=2, warmup_steps=1,
                            box_prob=0.0, zoom_prob=0.0, log_every=1, checkpoint_every=10)
    trainer = SamTrainer(create_model("sam_nano", pretrained=False), config, _TinyPseudoLabelled(),
                         prompt_hook=lambda sparse, dense: calls.append(1) or (sparse, dense))
    assert trainer.train(tmp_path / "v.safetensors", progress=False).steps == 1 and len(calls) == 2
