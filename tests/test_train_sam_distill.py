"""`samantic train sam --distill-weight`: every training image anchored, the outputs held to a frozen
copy of the starting weights while the masks (and the class term) train."""

import copy
import json
import pickle

import numpy as np
import pytest
import torch


def test_anchored_marks_every_sample_and_keeps_the_data(tmp_path):
    from samantic.train.data.shapes import CLASSES
    from samantic.train.sam import Anchored, CocoInstances, ShapesStream

    plain = ShapesStream(7)
    data = Anchored(plain)
    assert len(data) == len(plain) and repr(data) == "shapes:7" and data.class_names == tuple(CLASSES)
    for i in (0, 3):
        a, b = data[i], plain[i]
        assert a.anchor and not b.anchor
        assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
        assert np.array_equal(a.classes, b.classes)
    # the loader's worker processes get a copy of it
    again = pickle.loads(pickle.dumps(data))
    assert again[2].anchor and np.array_equal(again[2].masks, plain[2].masks)
    assert copy.deepcopy(data).class_names == tuple(CLASSES)
    # a COCO directory: its root (recorded in the weights' header) and categories come through
    from samantic.cli.main import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["data", "shapes", "--out", str(tmp_path / "coco"), "--n", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    coco = CocoInstances(tmp_path / "coco")
    wrapped = Anchored(coco)
    assert wrapped.root == coco.root and wrapped.class_names == coco.class_names and len(wrapped) == 2
    assert wrapped[1].anchor and np.array_equal(wrapped[1].masks, coco[1].masks)
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute


def test_cli_distill_weight_holds_the_outputs_to_the_starting_weights(tmp_path):
    from safetensors import safe_open
    from typer.testing import CliRunner

    from samantic.cli.main import app

    runner = CliRunner()
    out = tmp_path / "m.safetensors"
    common = ["train", "sam", "--data", "shapes:0", "--out", str(out), "--steps", "3", "--images-per-step", "1",
              "--masks-per-image", "1", "--iterations", "1", "--workers", "0", "--no-progress", "--log-every", "1",
              "--lr", "1e-3", "--warmup-steps", "0", "--trainable", "mask_decoder", "--box-prob", "0"]
    res = runner.invoke(app, common + ["--distill-weight", "1"])
    assert res.exit_code == 1
    assert "--distill-weight 1 holds the outputs to the starting weights'" in res.output and "--checkpoint" in res.output
    res = runner.invoke(app, common + ["--distill-weight", "1", "--distill-points", "4", "--class-weight", "0.2",
                                       "--checkpoint", "pkg:assets/sam_nano.safetensors"])
    assert res.exit_code == 0, res.output
    assert "outputs held to pkg:assets/sam_nano.safetensors (weight 1, 4 points per image)" in res.output
    log = [json.loads(line) for line in out.with_name(out.name + ".log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    # step 1 is computed before any update: the model is still its reference, nothing to distil;
    # later steps, after the decoder moved, are pulled back toward the starting weights'
    assert log[0]["distill"] == pytest.approx(0.0, abs=1e-10) and log[0]["distill_iou"] == pytest.approx(0.0, abs=1e-12)
    assert log[2]["distill"] > 1e-8
    assert "class_loss_0" in log[0] and "iou_0" in log[0]  # the masks and the class term still train
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["training"])
    assert meta["distill"] == {"weight": 1.0, "points": 4} and meta["class_weight"] == 0.2
    assert meta["data"] == "shapes:0"
    # without the option the weights record no distillation and the log no distillation term
    plain = tmp_path / "p.safetensors"
    res = runner.invoke(app, [*common[:4], "--out", str(plain), *common[6:], "--checkpoint", "pkg:assets/sam_nano.safetensors"])
    assert res.exit_code == 0, res.output
    with safe_open(str(plain), "pt") as f:
        assert "distill" not in json.loads(f.metadata()["training"])
    assert all("distill" not in json.loads(line) for line in plain.with_name(plain.name + ".log.jsonl").read_text().splitlines())
