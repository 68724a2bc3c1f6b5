"""Encoder pretraining on image-level class labels (`samantic train encoder`): targets, pooling, scores
checked against torchmetrics, a resumed run equal to an uninterrupted one, a checkpoint `train sam` reads."""

import json
import subprocess

import numpy as np
import pytest
import torch

from samantic.train.data.shapes import CLASSES, render_scene
from samantic.train.pretrain import (MIN_PIXELS, EncoderPretrainer, PooledClassifier, PretrainConfig,
                                     encoder_batch, multilabel_scores, scene_targets)


def test_targets_are_the_classes_visible_in_the_scene():
    for seed in range(5):
        scene = render_scene(seed)
        t = scene_targets(scene.labels, scene.masks)
        visible = {CLASSES[int(l)] for l, m in zip(scene.labels, scene.masks) if m.sum() >= MIN_PIXELS}
        assert {CLASSES[k] for k in np.flatnonzero(t)} == visible
    masks = np.zeros((2, 10, 10), bool)
    masks[0, :4, :4] = True  # 16 pixels: counts
    masks[1, 0, :MIN_PIXELS - 1] = True  # one pixel short: does not
    assert scene_targets(np.array([0, 5]), masks).tolist() == [1, 0, 0, 0, 0, 0, 0]


def test_pooling_reads_only_the_image_not_its_padding():
    torch.manual_seed(0)
    head = PooledClassifier(8, 3)
    emb = torch.randn(2, 8, 6, 6)
    valid = torch.zeros(2, 6, 6, dtype=torch.bool)
    valid[0, :4, :6] = True
    valid[1, :6, :3] = True
    changed = emb.clone()
    changed[~valid[:, None].expand_as(emb)] = 100.0
    assert torch.allclose(head(emb, valid), head(changed, valid))
    changed[0, :, 0, 0] += 1.0  # inside image 0: its logits move, image 1's do not
    out, ref = head(changed, valid), head(emb, valid)
    assert not torch.allclose(out[0], ref[0]) and torch.allclose(out[1], ref[1])


def test_encoder_batch_matches_sam_preprocess():
    from samantic.models import create_model

    sam = create_model("sam_nano", pretrained=False)
    images, targets, valid = encoder_batch([3], sam.image_encoder.img_size, sam.pixel_mean.flatten(),
                                           sam.pixel_std.flatten())
    from segment_anything.utils.transforms import ResizeLongestSide

    scene = render_scene(3)
    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(scene.image)
    ref = sam.preprocess(torch.from_numpy(resized).permute(2, 0, 1)[None].float())
    assert torch.allclose(images, ref, atol=1e-5)
    h, w = resized.shape[:2]
    assert valid[0, :h, :w].all() and valid[0].sum() == h * w
    assert targets[0].tolist() == scene_targets(scene.labels, scene.masks).tolist()


@pytest.mark.filterwarnings("ignore:No positive samples")
def test_multilabel_scores_match_torchmetrics():
    tm = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(60, 7, generator=g)
    targets = (torch.rand(60, 7, generator=g) < 0.4).float()
    targets[:, 6] = 0  # a class never present is left out of the mean, as torchmetrics leaves it
    s = multilabel_scores(scores, targets)
    ref_ap = tm.MultilabelAveragePrecision(num_labels=7, average="none")(scores, targets.long())
    assert s["mAP"] == pytest.approx(float(ref_ap[:6].mean()), abs=1e-6)
    acc = tm.MultilabelAccuracy(num_labels=7, average="micro")(scores, targets.long())
    assert s["label_accuracy"] == pytest.approx(float(acc), abs=1e-6)
    exact = tm.MultilabelExactMatch(num_labels=7)(scores, targets.long())
    assert s["exact_match"] == pytest.approx(float(exact), abs=1e-6)


def _trainer(steps: int) -> EncoderPretrainer:
    from samantic.models import create_model

    torch.manual_seed(0)
    cfg = PretrainConfig(steps=steps, images_per_step=1, warmup_steps=1, checkpoint_every=1, log_every=1)
    return EncoderPretrainer(create_model("sam_nano", pretrained=False), cfg, workers=0)


def test_resumed_run_equals_an_uninterrupted_one_and_only_the_encoder_trains(tmp_path):
    from samantic.models import create_model

    whole = _trainer(2)
    before = {k: v.clone() for k, v in whole.sam.state_dict().items()}
    whole.train(tmp_path / "whole.safetensors", progress=False)
    first = _trainer(1)
    first.train(tmp_path / "split.safetensors", progress=False)
    second = _trainer(2)
    second.train(tmp_path / "split.safetensors", resume=True, progress=False)
    assert second.step == 2
    for k, v in whole.sam.state_dict().items():
        assert torch.equal(v, second.sam.state_dict()[k]), k
        if not k.startswith("image_encoder."):
            assert torch.equal(v, before[k]), k  # prompt encoder and decoder untouched
    changed = [k for k, v in whole.sam.image_encoder.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before["image_encoder." + k])]
    assert changed
    log = [json.loads(l) for l in (tmp_path / "split.safetensors.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    # the output is a checkpoint of the registered model that `train sam --checkpoint` starts from
    loaded = create_model("sam_nano", checkpoint=str(tmp_path / "whole.safetensors"))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, whole.sam.state_dict()[k]), k
    from samantic.models import read_metadata

    meta = json.loads(read_metadata(tmp_path / "whole.safetensors")["pretraining"])
    assert meta["steps_done"] == 2 and meta["classes"] == list(CLASSES)


def test_resume_with_other_settings_is_refused(tmp_path):
    _trainer(1).train(tmp_path / "a.safetensors", progress=False)
    other = _trainer(2)
    other.config.lr = 5e-4
    with pytest.raises(ValueError, match="lr"):
        other.train(tmp_path / "a.safetensors", resume=True, progress=False)


def test_cli_refuses_eval_seeds_inside_the_training_scenes(tmp_path):
    from cli_helpers import cli_env, samantic_exe

    r = subprocess.run([samantic_exe(), "train", "encoder", "--out", str(tmp_path / "e.safetensors"),
                        "--first-seed", "10", "--steps", "5", "--eval-seeds", "0:20", "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 1 and "overlap the training scenes 10:90" in r.stderr
    assert not (tmp_path / "e.safetensors").exists()
    r = subprocess.run([samantic_exe(), "train", "encoder", "--out", str(tmp_path / "e.pt")],
                       capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 1 and ".safetensors" in r.stderr
