"""`samantic train sum`: alternating labelled / pseudo-labelled batches, the ablation's variants,
cached uncertainty maps, resumable training, the CLI's errors."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from samantic.train.sam import SamTrainConfig
from samantic.train.sum import PseudoLabelCache, UnlabelledPool
from samantic.train.sum_train import VARIANTS, SumTrainConfig, SumTrainer, UncertaintyCache, train_sum

SIZE = (96, 128)
LABELLED = "shapes-panoptic:3000000:3"


@pytest.fixture(scope="module")
def nano():
    from samantic.models import create_model

    return create_model("sam_nano").eval()


@pytest.fixture(scope="module")
def refiner_file(tmp_path_factory):
    from samantic.train.sum_refine import MaskRefiner, RefinerConfig, save_refiner

    torch.manual_seed(0)
    refiner = MaskRefiner(RefinerConfig())
    with torch.no_grad():  # not the zero start: the refined mask differs from SAM's, so U is not all zero
        for p in refiner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_refiner(refiner, tmp_path_factory.mktemp("refiner") / "refiner.safetensors")


def _config(steps=2, **kw):
    base = dict(steps=steps, images_per_step=1, masks_per_image=2, iterations=2, lr=1e-4, warmup_steps=1,
                trainable=("mask_decoder",), checkpoint_every=1, log_every=1, box_prob=0.0, zoom_prob=0.0)
    base.update(kw)
    return SamTrainConfig(**base)


def _sum_config(variant):
    return SumTrainConfig(variant=variant, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def test_variants_are_the_ablation_columns():
    assert list(VARIANTS) == ["vanilla", "refine", "no-task", "sum"]
    assert not VARIANTS["vanilla"].uses_uncertainty and not VARIANTS["vanilla"].task_prompt
    assert VARIANTS["refine"].uncertainty_loss and not VARIANTS["refine"].uncertainty_prompts
    assert VARIANTS["no-task"].uncertainty_prompts and not VARIANTS["no-task"].task_prompt
    assert VARIANTS["sum"] == type(VARIANTS["sum"])(True, True, True)
    with pytest.raises(ValueError, match="variant must be one of"):
        SumTrainConfig(variant="full")
    with pytest.raises(ValueError, match="task_lr_scale"):
        SumTrainConfig(task_lr_scale=0)


def test_uncertainty_cache_computes_once_and_workers_only_read(tmp_path, nano, refiner_file):
    from samantic.train.sum_refine import UncertaintyEstimator, load_refiner

    pool = UnlabelledPool(4000000, 1, size=SIZE)
    cache = PseudoLabelCache(tmp_path, nano, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    image = pool[0]
    labels = cache.compute(image)
    assert len(labels) > 0
    estimator = UncertaintyEstimator(nano, load_refiner(refiner_file))
    calls = []

    def counted(img, lab):
        calls.append(1)
        return estimator(img, lab)

    u = UncertaintyCache(cache, counted, refiner_file)
    first = u(image, labels)
    assert first.shape == (len(labels),) + SIZE and 0 <= first.min() and first.max() <= 1 and first.max() > 0
    again = u(image, labels)
    assert len(calls) == 1 and np.array_equal(first, again)
    # the maps are the estimator's, to the 1/255 of their uint8 storage
    assert np.abs(first - estimator(image, labels)).max() <= 0.5 / 255 + 1e-6
    # a data worker's copy has no estimator and no model: it reads, it never computes
    worker = pickle.loads(pickle.dumps(u))
    assert worker.estimator is None and worker.pseudo.model is None
    assert np.array_equal(worker(image, labels), first)
    other = UnlabelledPool(4000001, 1, size=SIZE)[0]
    with pytest.raises(RuntimeError, match="no pseudo-label cached"):
        worker.pseudo.get_or_compute(other)
    with pytest.raises(RuntimeError, match="no uncertainty map cached"):
        worker(other, labels)
    # another refiner file is another key
    other_refiner = tmp_path / "other.safetensors"
    other_refiner.write_bytes(refiner_file.read_bytes() + b" ")
    assert UncertaintyCache(cache, None, other_refiner).dir != u.dir


def test_sum_alternates_labelled_and_pseudo_batches_and_groups_the_task_table(tmp_path, nano, refiner_file):
    import copy

    from samantic.models.task_prompt import attach_task_prompt
    from samantic.train.sum import PseudoLabelled, UncertaintyPointSampler, open_labelled
    from samantic.train.sum_refine import UncertaintyEstimator, load_refiner

    model = copy.deepcopy(nano)
    attach_task_prompt(model)
    pool = UnlabelledPool(4000000, 2, size=SIZE)
    cache = PseudoLabelCache(tmp_path, model, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    u = UncertaintyCache(cache, UncertaintyEstimator(model, load_refiner(refiner_file)), refiner_file)
    for i in range(len(pool)):
        u(pool[i], cache.get_or_compute(pool[i]))
    trainer = SumTrainer(model, _config(), open_labelled(LABELLED), PseudoLabelled(pool, cache, uncertainty=u),
                         task_lr_scale=7.0, sampler=UncertaintyPointSampler(), workers=0)
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["lr_scale"] == 7.0 and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.task_prompt.parameters()}
    batches = trainer._loader(type("V", (), {"value": 0})())
    seen = []
    for step in range(4):
        trainer.step = step
        b = next(batches)
        seen.append(("uncertainty" in b, bool((b["tasks"] != 0).any()) if "tasks" in b else False))
    # even steps: labelled (task masks, no uncertainty); odd steps: pseudo-labels (U maps, task 0)
    assert [s[0] for s in seen] == [False, True, False, True]
    assert all(not s[1] for s in seen[1::2])


@pytest.mark.parametrize("variant", ["vanilla", "sum"])
def test_train_sum_writes_resumable_weights_with_the_record(tmp_path, nano, refiner_file, variant):
    import copy

    from samantic.models import create_model

    out = tmp_path / f"{variant}.safetensors"
    model = copy.deepcopy(nano)
    kw = dict(refiner=refiner_file if variant != "vanilla" else None, pseudo_cache=tmp_path / "cache",
              workers=0, progress=False, log=lambda *_: None)
    pool = "shapes-panoptic:4000000:2"
    result = train_sum(model, LABELLED, pool, out, _config(2), _sum_config(variant), **kw)
    assert result.steps == 2 and out.is_file()
    assert result.data["pseudo_masks"] > 0 and result.data["pseudo_computed"] == 2
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    record = json.loads(meta["sum"])
    assert record["config"]["variant"] == variant and record["variant"] == json.loads(json.dumps(
        VARIANTS[variant].__dict__))
    assert ("task_prompt.embed.weight" in keys) == (variant == "sum")
    if variant == "sum":
        assert (record["uncertainty"] or "").startswith(str(tmp_path / "cache"))
        loaded = create_model("sam_nano", checkpoint=out)
        assert loaded.task_prompt is not None
        # the table trained (it starts at zero), the encoder did not
        assert loaded.task_prompt.embed.weight.abs().sum() > 0
        before, after = nano.image_encoder.state_dict(), loaded.image_encoder.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    # resume to 3 steps: the pool is reused from the cache, one more step runs
    model2 = copy.deepcopy(nano)
    again = train_sum(model2, LABELLED, pool, out, _config(3), _sum_config(variant), resume=True, **kw)
    assert again.steps == 3 and again.data["pseudo_computed"] == 0
    steps = [json.loads(line)["step"] for line in result.log.read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_train_sum_anchors_the_encoder_on_replayed_scenes(tmp_path, nano):
    import copy

    out = tmp_path / "anchored.safetensors"
    config = _config(4, images_per_step=4, trainable=("image_encoder", "mask_decoder"), log_every=1)
    sum_config = SumTrainConfig(variant="vanilla", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                replay=3, anchor_weight=2.0)
    result = train_sum(copy.deepcopy(nano), LABELLED, "shapes-panoptic:4000000:1", out, config, sum_config,
                       pseudo_cache=tmp_path / "cache", workers=0, progress=False, log=lambda *_: None)
    log = [json.loads(line) for line in result.log.read_text().splitlines()]
    drift = [r["anchor"] for r in log if "anchor" in r]
    assert drift and all(d >= 0 for d in drift) and max(drift) > 0  # the encoder moved off the base, and is pulled back
    assert all(r["step"] % 2 == 1 for r in log if "anchor" in r)  # labelled steps only (the pool is not anchored)
    with safe_open(str(out), framework="pt") as f:
        record = json.loads(f.metadata()["sum"])
    assert record["config"]["anchor_weight"] == 2.0 and record["labelled"].endswith(":3")


def test_train_sum_distils_the_base_outputs_on_replayed_scenes(tmp_path, nano):
    """With distill_weight, the replayed plain scenes' point outputs are pulled toward the base's (a
    frozen copy taken before any step, which stays the base while the model moves)."""
    import copy

    from samantic.models import create_model

    out = tmp_path / "distilled.safetensors"
    config = _config(6, images_per_step=4, trainable=("image_encoder", "mask_decoder"), log_every=1, lr=1e-3,
                     freeze_batchnorm=True)  # train-mode batch norm would differ from the base at once
    sum_config = SumTrainConfig(variant="vanilla", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                replay=3, anchor_weight=1.0, distill_weight=2.0, distill_points=4)
    result = train_sum(copy.deepcopy(nano), LABELLED, "shapes-panoptic:4000000:1", out, config, sum_config,
                       pseudo_cache=tmp_path / "cache", workers=0, progress=False, log=lambda *_: None)
    log = [json.loads(line) for line in result.log.read_text().splitlines()]
    distilled = [r for r in log if "distill" in r]
    assert distilled and all(r["step"] % 2 == 1 for r in distilled)  # labelled steps only (the pool is not replayed)
    assert max(r["distill"] for r in distilled) > 0 and max(r["distill_iou"] for r in distilled) > 0
    assert all("anchor" in r for r in distilled)  # the encoder anchor shares the reference's encoder
    trained = create_model("sam_nano", checkpoint=out)
    assert not torch.equal(trained.mask_decoder.iou_token.weight, nano.mask_decoder.iou_token.weight)
    with safe_open(str(out), framework="pt") as f:
        record = json.loads(f.metadata()["sum"])
    assert record["config"]["distill_weight"] == 2.0 and record["config"]["distill_points"] == 4


def test_train_sum_errors(tmp_path, nano, refiner_file):
    with pytest.raises(ValueError, match="needs a mask refiner"):
        train_sum(nano, LABELLED, "shapes-panoptic:4000000:1", tmp_path / "a.safetensors", _config(), _sum_config("sum"))
    with pytest.raises(FileNotFoundError, match="no such refiner"):
        train_sum(nano, LABELLED, "shapes-panoptic:4000000:1", tmp_path / "a.safetensors", _config(),
                  _sum_config("refine"), refiner=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        train_sum(nano, LABELLED, "shapes-panoptic:4000000:1", tmp_path / "a.pt", _config(), _sum_config("vanilla"))
    anchored = SumTrainConfig(variant="vanilla", replay=2, anchor_weight=1.0)
    with pytest.raises(ValueError, match="image encoder does not train"):
        train_sum(nano, LABELLED, "shapes-panoptic:4000000:1", tmp_path / "a.safetensors", _config(), anchored)
    # thresholds nothing passes: no pseudo-label at all is an error, not a silent labelled-only run
    strict = SumTrainConfig(variant="vanilla", points_per_side=2, pred_iou_thresh=1.0, stability_score_thresh=1.0)
    with pytest.raises(ValueError, match="kept no pseudo-label"):
        train_sum(nano, LABELLED, "shapes-panoptic:4000000:1", tmp_path / "a.safetensors", _config(), strict,
                  pseudo_cache=tmp_path / "c", progress=False, log=lambda *_: None)


def test_cli_train_sum_reports_bad_options(tmp_path):
    from samantic.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["train", "sum", "--out", str(tmp_path / "x.safetensors"), "--variant", "full"])
    assert r.exit_code == 1 and "variant must be one of vanilla, refine, no-task, sum" in r.output
    r = runner.invoke(app, ["train", "sum", "--out", str(tmp_path / "x.safetensors"), "--unlabelled",
                            "shapes-panoptic:x"])
    assert r.exit_code == 1 and "needs a mask refiner" in r.output  # checked before the data spec
    r = runner.invoke(app, ["train", "sum", "--out", str(tmp_path / "x.safetensors"), "--variant", "vanilla",
                            "--unlabelled", "shapes-panoptic:x", "--no-progress"])
    assert r.exit_code == 1 and "shapes-panoptic:SEED[:N]" in r.output


def test_train_sum_at_another_input_side_keys_its_pseudo_labels_by_it(tmp_path, nano):
    import copy

    from samantic.models import create_model

    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    at_config = PseudoLabelCache(tmp_path / "cache", nano, **kw)
    assert "img_size" not in at_config.metadata  # the config side keeps the keys written before
    small = create_model("sam_nano", img_size=256).eval()
    at_256 = PseudoLabelCache(tmp_path / "cache", small, **kw)
    assert at_256.metadata["img_size"] == 256 and at_256.key != at_config.key
    # the same weights: only the side tells the two apart
    assert at_256.metadata["state_sha256"] == at_config.metadata["state_sha256"]
    out = tmp_path / "v.safetensors"
    result = train_sum(copy.deepcopy(small), LABELLED, "shapes-panoptic:4000000:1", out, _config(1),
                       _sum_config("vanilla"), pseudo_cache=tmp_path / "cache", workers=0, progress=False,
                       log=lambda *_: None)
    assert result.steps == 1 and result.data["img_size"] == 256 and result.data["pseudo_key"] == at_256.key
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["sum"])["img_size"] == 256
    # these weights run at the side they were trained at (create_model reads it), unless told another
    from samantic.cli.eval import load_column
    from samantic.models import create_model as build, recorded_input_size, save_checkpoint

    assert recorded_input_size(out) == 256 and build("sam_nano", str(out)).image_encoder.img_size == 256
    assert load_column(f"v={out}")[2].image_encoder.img_size == 256
    assert load_column(f"v={out}@320")[2].image_encoder.img_size == 320
    plain = save_checkpoint(nano, tmp_path / "plain.safetensors")
    assert recorded_input_size(plain) == 384 and load_column(f"p={plain}")[2].image_encoder.img_size == 384


def test_cli_train_sum_input_size_needs_a_conv_encoder(tmp_path):
    from samantic.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["train", "sum", "--out", str(tmp_path / "x.safetensors"), "--variant", "vanilla",
                            "--model", "sam_nano_vit", "--input-size", "512", "--no-progress"])
    assert r.exit_code == 1 and "needs a convolutional encoder" in r.output
    r = runner.invoke(app, ["train", "sum", "--out", str(tmp_path / "x.safetensors"), "--variant", "vanilla",
                            "--input-size", "500", "--no-progress"])
    assert r.exit_code == 1 and "multiple of 32" in r.output
    assert not (tmp_path / "x.safetensors").exists()


def test_base_loss_follows_the_base_weights_recipe(tmp_path, nano):
    from samantic.models import save_checkpoint
    from samantic.train.sum_train import base_loss

    # the shipped sam_nano was trained with cross-entropy (focal gamma 0, alpha 0.5, weight 2)
    assert base_loss("sam_nano") == {"focal_weight": 2.0, "focal_alpha": 0.5, "focal_gamma": 0.0, "dice_weight": 1.0}
    sam = {"focal_weight": 20.0, "focal_alpha": 0.25, "focal_gamma": 2.0, "dice_weight": 1.0}
    assert base_loss("sam_vit_b") == sam  # official weights: no record, nothing downloaded
    bare = save_checkpoint(nano, tmp_path / "bare.safetensors")
    assert base_loss("sam_nano", bare) == sam
    recorded = save_checkpoint(nano, tmp_path / "rec.safetensors",
                               metadata={"training": json.dumps({"training": {"focal_weight": 3, "focal_gamma": 1.5}})})
    assert base_loss("sam_nano", recorded) == {**sam, "focal_weight": 3.0, "focal_gamma": 1.5}


@pytest.mark.parametrize("task_answers", [False, True])
def test_a_prompt_with_a_task_trains_every_output_when_task_answers(nano, task_answers):
    import copy

    model = copy.deepcopy(nano)
    config = _config(iterations=1)
    trainer = SumTrainer(model, config, open_labelled_stub(), None, workers=0, task_answers=task_answers)
    low = model.prompt_encoder.mask_input_size[0]
    torch.manual_seed(0)
    with torch.no_grad():
        emb = model.image_encoder(torch.randn(1, 3, model.image_encoder.img_size, model.image_encoder.img_size))
    soft = torch.zeros(2, low, low)
    soft[:, 20:60, 30:90] = 1.0
    index = torch.zeros(2, dtype=torch.long)
    hyper = model.mask_decoder.output_hypernetworks_mlps

    def grads(tasks):
        model.zero_grad(set_to_none=True)
        trainer.gen.manual_seed(0)
        loss, _ = trainer._batch_loss(emb, index[:1], soft[:1], None, None, torch.tensor(tasks))
        loss.backward()
        # outputs 1-3 are the multi-mask outputs; each has its own hypernetwork MLP
        return [hyper[i].layers[-1].weight.grad is not None and bool(hyper[i].layers[-1].weight.grad.abs().sum() > 0)
                for i in (1, 2, 3)]

    # no task ("unspecified"): SAM's best of three, whatever the option
    assert sum(grads([0])) == 1
    # a task: one right answer, every output learns it (only when asked)
    assert sum(grads([3])) == (3 if task_answers else 1)


def open_labelled_stub():
    from samantic.train.sum import open_labelled

    return open_labelled(LABELLED)


def test_replay_interleaves_plain_scenes_as_unspecified_and_anchored():
    from samantic.train.data.shapes import render_scene
    from samantic.train.sam import Preparer, collate
    from samantic.train.sum import open_labelled
    from samantic.train.sum_train import REPLAY_SEED, ReplayScenes, with_replay

    labelled = open_labelled(LABELLED)
    mixed = with_replay(labelled, 5)
    assert len(mixed) == 10 and repr(mixed) == f"{LABELLED}+shapes:{REPLAY_SEED}:5"
    first = mixed[0]
    assert np.array_equal(first.image, labelled[0].image) and (first.tasks != 0).any() and not first.anchor
    plain = mixed[5]  # the third plain scene (the second has no instance)
    scene = render_scene(REPLAY_SEED + 2)
    assert np.array_equal(plain.image, scene.image) and np.array_equal(plain.masks, scene.masks)
    assert len(scene.masks) and plain.anchor  # the images an anchor_weight distils toward the base's encoder
    assert np.array_equal(mixed[11].image, render_scene(REPLAY_SEED + 0).image)  # wraps around
    assert np.array_equal(mixed[6].image, labelled[0].image)  # the labelled set (3 scenes) wraps too
    # in a batch, the plain scene's instances are asked as "unspecified" (task 0)
    prep = Preparer(384, 96, SamTrainConfig(zoom_prob=0.0, flat_steps=0, masks_per_image=50))
    rng = np.random.default_rng(0)
    batch = collate([prep(first, rng, 0), prep(plain, rng, 0)])
    on_plain = batch["image_index"] == 1
    assert on_plain.sum() == len(scene.masks) and not batch["tasks"][on_plain].any()
    assert batch["tasks"][~on_plain].any() and batch["anchor"].tolist() == [False, True]
    with pytest.raises(ValueError, match="replay must be an integer >= 0"):
        SumTrainConfig(replay=-1)
    with pytest.raises(ValueError, match="at least one plain scene"):
        ReplayScenes(0)
    with pytest.raises(IndexError):
        ReplayScenes(2)[2]
    with pytest.raises(ValueError, match="needs replayed plain scenes"):
        SumTrainConfig(anchor_weight=1.0)
    with pytest.raises(ValueError, match="anchor_weight must be >= 0"):
        SumTrainConfig(anchor_weight=-1.0, replay=3)
    with pytest.raises(ValueError, match="distilled images"):
        SumTrainConfig(distill_weight=1.0)
    with pytest.raises(ValueError, match="distill_weight must be >= 0"):
        SumTrainConfig(distill_weight=-1.0, replay=3)
    with pytest.raises(ValueError, match="distill_points must be an integer >= 1"):
        SumTrainConfig(distill_weight=1.0, replay=3, distill_points=0)
    with pytest.raises(ValueError, match="nothing to train"):
        SumTrainConfig(replay=3, replay_labels=False)
    SumTrainConfig(replay=3, replay_labels=False, distill_weight=1.0)  # the replayed scenes serve the distillation


def test_a_trained_encoder_gets_its_own_learning_rate(nano):
    import copy

    model = copy.deepcopy(nano)
    trainer = SumTrainer(model, _config(trainable=("image_encoder", "mask_decoder")), open_labelled_stub(), None,
                         workers=0, encoder_lr_scale=0.25)
    groups = trainer.optimizer.param_groups
    encoder = {id(p) for p in model.image_encoder.parameters()}
    assert len(groups) == 2 and groups[1]["lr_scale"] == 0.25
    assert {id(p) for p in groups[1]["params"]} == encoder
    assert not encoder & {id(p) for p in groups[0]["params"]} and groups[0].get("lr_scale", 1.0) == 1.0
    with pytest.raises(ValueError, match="encoder_lr_scale must be > 0"):
        SumTrainConfig(encoder_lr_scale=0)


def test_task_weights_parse_and_refuse_what_they_cannot_mean(tmp_path, nano):
    from samantic.cli.main import app
    from samantic.train.sum_train import parse_task_weights

    assert parse_task_weights("") == ()
    assert parse_task_weights("part=3") == (1.0, 1.0, 1.0, 3.0)
    assert parse_task_weights(" entity=0.5 , part=2") == (1.0, 1.0, 0.5, 2.0)
    for spec, msg in (("part", "not TASK=WEIGHT"), ("=2", "not TASK=WEIGHT"), ("parts=2", "Did you mean 'part'"),
                      ("part=2,part=3", "given twice"), ("part=x", "not a number"), ("part=0", "> 0"),
                      ("part=-1", "> 0"), ("part=nan", "> 0")):
        with pytest.raises(ValueError, match=msg):
            parse_task_weights(spec)
    with pytest.raises(ValueError, match="task_weights must be finite numbers > 0"):
        SamTrainConfig(task_weights=(1.0, 0.0))
    assert SamTrainConfig(task_weights=[1, 2]).task_weights == (1.0, 2.0)  # as read back from a JSON header
    assert SamTrainConfig(task_weights=np.array([1, 3])).task_weights == (1.0, 3.0)
    with pytest.raises(ValueError, match="one weight per task"):
        train_sum(nano, LABELLED, "shapes-panoptic:4000000:1", tmp_path / "a.safetensors",
                  _config(task_weights=(1.0, 2.0)), _sum_config("vanilla"))
    r = CliRunner().invoke(app, ["train", "sum", "--out", str(tmp_path / "x.safetensors"), "--variant", "vanilla",
                                 "--task-weights", "parts=3", "--no-progress"])
    assert r.exit_code == 1 and "unknown task 'parts'" in r.output


def test_task_weights_choose_which_masks_an_image_prompts():
    from samantic.train.sam import Preparer, Sample

    rng_img = np.random.default_rng(0)
    image = rng_img.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    masks = np.zeros((12, 64, 64), bool)
    for i in range(12):  # twelve separate rectangles
        y, x = divmod(i, 4)
        masks[i, 16 * y + 1 : 16 * y + 13, 16 * x + 1 : 16 * x + 13] = True
    tasks = np.array([0] * 10 + [3] * 2)  # ten unspecified masks, two parts

    def chosen_parts(weights, n=300):
        prep = Preparer(64, 16, SamTrainConfig(masks_per_image=2, zoom_prob=0.0, task_weights=weights))
        rng = np.random.default_rng(1)
        count = 0
        for _ in range(n):
            out = prep(Sample(image, masks, tasks=tasks), rng, 0)
            count += int((out.tasks == 3).sum())
        return count / (2 * n)  # the fraction of prompted masks that are parts

    uniform, weighted = chosen_parts(()), chosen_parts((1.0, 1.0, 1.0, 20.0))
    assert 0.1 < uniform < 0.25  # expected 2 / 12
    # two draws without replacement, parts weighing 20 each against ten masks of 1: expected 0.748 of them parts
    assert 0.65 < weighted < 0.85
    # an image with no more masks than are prompted keeps them all, whatever the weights
    prep = Preparer(64, 16, SamTrainConfig(masks_per_image=16, zoom_prob=0.0, task_weights=(1.0, 1.0, 1.0, 20.0)))
    out = prep(Sample(image, masks, tasks=tasks), np.random.default_rng(2), 0)
    assert sorted(out.tasks.tolist()) == sorted(tasks.tolist())
    # a sample whose task has no weight is refused by its task index, not drawn with a wrong one
    prep = Preparer(64, 16, SamTrainConfig(masks_per_image=2, zoom_prob=0.0, task_weights=(1.0, 1.0)))
    with pytest.raises(ValueError, match="task_weights has 2 entries; a sample has task 3"):
        prep(Sample(image, masks, tasks=tasks), np.random.default_rng(3), 0)
