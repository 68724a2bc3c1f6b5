"""The shipped sam_nano: loads by default, and segments held-out scenes above floors a little under its model card."""

from __future__ import annotations

import json

import pytest
import torch

from samantic.models import create_model, get_model_entry, read_metadata, resolve_checkpoint

# The model card's numbers (sdk/samantic/assets/sam_nano.md: v9 on 100 scenes; on the 16 scenes below it
# measures 0.832 / 0.861 / 0.851, v8 0.825 / 0.860 / 0.845, v7 0.835 / 0.866 / 0.855) minus a margin. v6 (0.813 / 0.846 / 0.838 here)
# fails all three.
# Under the targets (0.85 / 0.90): see the model card.
FLOORS = {"miou_1pt_top": 0.815, "miou_1pt_oracle": 0.85, "miou_3pt": 0.84}


def test_shipped_weights_load_by_default():
    entry = get_model_entry("sam_nano")
    assert entry.default_weights == "pkg:assets/sam_nano.safetensors"
    path = resolve_checkpoint(entry.default_weights)
    assert path.stat().st_size <= 20 * 2**20
    meta = read_metadata(path)
    assert meta["dtype"] == "float16" and meta["model"] == "sam_nano"
    training = json.loads(meta["training"])
    assert meta["version"] == "v9" and training["steps_done"] == 1500  # v8 + 2 x 1,500 CPU steps; the last run's
    assert training["class_weight"] == 0.05  # the token-class term v8 and v9 were trained with
    model = create_model("sam_nano")
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (model.image_encoder.img_size, model.prompt_encoder.embed_dim) == (384, 128)
    assert model.prompt_encoder.image_embedding_size == (48, 48)  # stride 8
    fresh = create_model("sam_nano", pretrained=False)
    w = "mask_decoder.iou_token.weight"
    assert not torch.equal(model.state_dict()[w], fresh.state_dict()[w])


@pytest.fixture(scope="module")
def small_eval():
    from samantic.train.metrics import evaluate_sam

    return evaluate_sam(create_model("sam_nano"), range(0, 16), [], progress=False).metrics


@pytest.mark.parametrize("metric", sorted(FLOORS))
def test_shipped_nano_reaches_its_floors_on_held_out_scenes(small_eval, metric):
    assert small_eval[metric] >= FLOORS[metric], (metric, small_eval)


def test_shipped_nano_tokens_name_the_classes_of_held_out_masks():
    """v9's output mask tokens carry the instances' classes (the token-class term): a probe fitted on their
    masks in 24 scenes names the class of matched masks in 12 held-out scenes. On these scenes v9 measures
    0.718 (chance 0.26), v8 0.501, v7 0.351: the floor fails both. The model card's probe (80 / 40 scenes): 0.785."""
    from samantic.train.data.shapes import CLASSES
    from samantic.train.probe import collect_probe_data, run_probe

    model = create_model("sam_nano")
    train = collect_probe_data(model, range(500_000, 500_024), points_per_side=8, progress=False)
    test = collect_probe_data(model, range(0, 12), points_per_side=8, progress=False)
    res = run_probe(train, test, [("token",)], n_classes=len(CLASSES), epochs=30)
    assert res.rows[0].class_accuracy >= 0.62, res
