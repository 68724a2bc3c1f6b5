"""The trainer's token-class term: classes travel with the masks, the decoder's output mask tokens are
classified, the term adds weight x its cross-entropy, trains the tokens, and is saved and resumed."""

import copy
import json

import numpy as np
import pytest
import torch

from samantic.train.sam import Preparer, Sample, SamTrainConfig, SamTrainer, collate


def _batch(low_res, with_classes=(True, True), seeds=(1, 2), zoom=0.0):
    from samantic.train.data.shapes import render_scene

    prep = Preparer(384, low_res, SamTrainConfig(zoom_prob=zoom, flat_steps=0, masks_per_image=3))
    rng = np.random.default_rng(0)
    items = []
    for seed, has in zip(seeds, with_classes):
        s = render_scene(seed, size=(96, 128))
        items.append(prep(Sample(s.image, s.masks, classes=s.labels if has else None), rng, 0))
    return collate(items)


def test_classes_follow_their_masks_through_preparation():
    from samantic.train.data.shapes import render_scene

    seed = next(s for s in range(20) if len(render_scene(s, size=(96, 128)).labels) >= 3)
    scene = render_scene(seed, size=(96, 128))
    # every instance gets its own class: the index of its mask tells which
    classes = np.arange(len(scene.masks), dtype=np.int64) + 10
    for zoom in (0.0, 1.0):
        prep = Preparer(384, 96, SamTrainConfig(zoom_prob=zoom, flat_steps=0, masks_per_image=2))
        for trial in range(6):
            got = prep(Sample(scene.image, scene.masks, classes=classes), np.random.default_rng(trial), 0)
            if got is None:
                continue
            assert got.classes is not None and len(got.classes) == len(got.soft)
            if zoom == 0.0:  # unzoomed: each kept soft mask is the (possibly flipped) mask of its class
                import cv2

                for c, soft in zip(got.classes, got.soft):
                    m = scene.masks[c - 10]
                    h, w = got.image.shape[:2]
                    want = cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
                    flip = cv2.resize(m[:, ::-1].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
                    full = np.kron(soft.astype(np.float32), np.ones((4, 4)))[:h, :w] > 0.5
                    assert max((full == want.astype(bool)).mean(), (full == flip.astype(bool)).mean()) > 0.97
    batch = _batch(96, (True, False))
    n0 = int((batch["image_index"] == 0).sum())
    assert batch["classes"].dtype == torch.int64 and len(batch["classes"]) == len(batch["soft"])
    assert (batch["classes"][:n0] >= 0).all() and (batch["classes"][n0:] == -1).all()
    assert "classes" not in _batch(96, (False, False))


def test_shapes_streams_carry_classes_and_panoptic_ones_none(tmp_path):
    from samantic.train.data.shapes import CLASSES, render_scene
    from samantic.train.sam import PanopticShapesStream, ShapesStream, open_dataset

    s = ShapesStream(7)[3]
    assert np.array_equal(s.classes, render_scene(10).labels)
    assert ShapesStream(0).class_names == tuple(CLASSES)
    assert PanopticShapesStream(0).class_names == ()
    assert PanopticShapesStream(0)[0].classes is None
    from typer.testing import CliRunner

    from samantic.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["data", "shapes", "--out", str(tmp_path / "ds"), "--n", "2", "--seed", "5"])
    assert res.exit_code == 0, res.output
    ds = open_dataset(str(tmp_path / "ds"))
    assert ds.class_names == tuple(CLASSES)
    ann = json.loads((tmp_path / "ds" / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in ann["categories"]}
    first = [a for a in ann["annotations"] if a["image_id"] == ds.images[0]["id"]]
    assert [CLASSES[c] for c in ds[0].classes] == [names[a["category_id"]] for a in first]


def test_class_term_adds_weight_times_its_cross_entropy_and_trains_the_tokens():
    from samantic.models import create_model

    base = create_model("sam_nano").eval()
    batch = _batch(base.prompt_encoder.mask_input_size[0])
    dim = base.mask_decoder.transformer_dim
    torch.manual_seed(0)
    head = torch.nn.Linear(dim, 7)
    config = SamTrainConfig(images_per_step=2, masks_per_image=3, iterations=2, box_prob=0.0, lr=1e-3,
                            trainable=("mask_decoder",))

    def trainer(weight, classifier):
        return SamTrainer(copy.deepcopy(base), config, data=None, token_classifier=copy.deepcopy(classifier),
                          class_weight=weight)

    plain, plain_stats = SamTrainer(copy.deepcopy(base), config, data=None).train_step(batch)
    assert not any(k.startswith("class_") for k in plain_stats)
    t = trainer(0.5, head)
    half, stats = t.train_step(batch)
    assert {"class_loss_0", "class_loss_1", "class_acc_0", "class_acc_1"} <= set(stats)
    # the loss is averaged over the rounds, like the mask terms
    want = 0.5 * (stats["class_loss_0"] + stats["class_loss_1"]) / 2
    assert half - plain == pytest.approx(want, rel=1e-3)
    # by hand, round 0: the cross-entropy of each of the three output tokens against the prompt's class
    assert 0.5 < stats["class_loss_0"] < 5.0 and 0.0 <= stats["class_acc_0"] <= 1.0
    assert not torch.equal(t.token_classifier.weight, head.weight)  # the classifier trains
    # the tokens learn the classes: fitting one batch, the class loss falls
    t = trainer(1.0, head)
    first = t.train_step(batch)[1]["class_loss_0"]
    for g in t.optimizer.param_groups:
        g["lr"] = 3e-3
    for _ in range(12):
        last = t.train_step(batch)[1]["class_loss_0"]
    assert last < 0.5 * first
    # a batch without classes trains as before; a classifier needs a weight
    no_classes = _batch(base.prompt_encoder.mask_input_size[0], (False, False))
    _, stats = trainer(0.5, head).train_step(no_classes)
    assert not any(k.startswith("class_") for k in stats)
    with pytest.raises(ValueError, match="class_weight must be > 0"):
        SamTrainer(copy.deepcopy(base), config, data=None, token_classifier=head)


def test_classifier_is_saved_beside_the_weights_and_resumed(tmp_path):
    from safetensors import safe_open

    from samantic.models import create_model
    from samantic.train.data.shapes import CLASSES
    from samantic.train.sam import ShapesStream, token_classes_path

    base = create_model("sam_nano").eval()
    cfg = SamTrainConfig(steps=1, images_per_step=1, masks_per_image=2, iterations=1, warmup_steps=1,
                         checkpoint_every=1, log_every=1, trainable=("mask_decoder",), zoom_prob=0.0)
    out = tmp_path / "m.safetensors"
    head = torch.nn.Linear(base.mask_decoder.transformer_dim, len(CLASSES))
    t = SamTrainer(copy.deepcopy(base), cfg, ShapesStream(3), token_classifier=head, class_weight=0.2)
    t.train(out, progress=False)
    path = token_classes_path(out)
    assert path.name == "m.token_classes.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["class_names"]) == list(CLASSES)
        torch.testing.assert_close(f.get_tensor("weight"), t.token_classifier.weight.detach())
    resumed = SamTrainer(copy.deepcopy(base), SamTrainConfig(**{**cfg.__dict__, "steps": 2}), ShapesStream(3),
                         token_classifier=torch.nn.Linear(base.mask_decoder.transformer_dim, len(CLASSES)),
                         class_weight=0.2)
    resumed.load_state(out.with_name(out.name + ".ckpt"))
    torch.testing.assert_close(resumed.token_classifier.weight, t.token_classifier.weight)
    # a run without a classifier cannot be resumed as one with it
    plain_out = tmp_path / "p.safetensors"
    SamTrainer(copy.deepcopy(base), cfg, ShapesStream(3)).train(plain_out, progress=False)
    with pytest.raises(ValueError, match="without a token classifier"):
        SamTrainer(copy.deepcopy(base), cfg, ShapesStream(3), token_classifier=head, class_weight=0.2).load_state(
            plain_out.with_name(plain_out.name + ".ckpt"))


def test_cli_class_weight_needs_data_with_classes(tmp_path):
    from typer.testing import CliRunner

    from samantic.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["train", "sam", "--data", "shapes-panoptic:0", "--out", str(tmp_path / "m.safetensors"),
                              "--class-weight", "0.2", "--steps", "1", "--no-progress"])
    assert res.exit_code == 1
    assert "shapes-panoptic:0 does not give every instance a class" in res.output
    res = runner.invoke(app, ["train", "sam", "--data", "shapes:0", "--out", str(tmp_path / "m.safetensors"),
                              "--class-weight", "0.2", "--steps", "1", "--images-per-step", "1",
                              "--masks-per-image", "1", "--iterations", "1", "--workers", "0", "--no-progress",
                              "--checkpoint", "pkg:assets/sam_nano.safetensors", "--trainable", "mask_decoder"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.token_classes.safetensors").exists()
