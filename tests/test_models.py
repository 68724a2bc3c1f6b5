"""Registry, configs, builders and checkpoint loading, checked against segment-anything itself."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import Sam

from http_server import FileServer
from samantic.models import (
    SamConfig,
    create_model,
    get_config,
    list_models,
    load_checkpoint,
    read_metadata,
    recorded_input_size,
    register_model,
    resolve_checkpoint,
    save_checkpoint,
)
from samantic.models import registry, weights

# Registered name -> segment-anything's own builder: the independent reference.
OFFICIAL = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h"}


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def nano() -> Sam:
    torch.manual_seed(0)
    return create_model("sam_nano")


@pytest.fixture
def nano_pth(nano, tmp_path):
    path = tmp_path / "nano.pth"
    torch.save(nano.state_dict(), path)
    return path


# --------------------------------------------------------------------------- registry


def test_registered_names():
    assert list_models() == ["sam_nano", "sam_nano_conv", "sam_nano_conv512", "sam_nano_panoptic", "sam_nano_sum",
                             "sam_nano_vit", "sam_vit_b", "sam_vit_h", "sam_vit_l"]
    assert list_models("sam_vit_*") == ["sam_vit_b", "sam_vit_h", "sam_vit_l"]
    assert list_models("nothing*") == []


@pytest.mark.parametrize("name", list_models())
def test_build_every_model(name):
    config = get_config(name)
    if name in OFFICIAL:
        with torch.device("meta"):
            model = create_model(name)
    else:
        model = create_model(name)
    assert isinstance(model, Sam)
    assert not model.training
    assert model.samantic_name == name and model.samantic_config == config
    assert model.image_encoder.img_size == config.img_size
    assert model.prompt_encoder.image_embedding_size == (config.image_embedding_size,) * 2
    assert model.prompt_encoder.mask_input_size == (config.low_res_size,) * 2
    assert model.mask_decoder.num_multimask_outputs == config.num_multimask_outputs


SHIPPED = [n for n in list_models() if (registry.get_model_entry(n).default_weights or "").startswith("pkg:")]
# every weights file in the package: the registered models' defaults and the SAM-CP head
SHIPPED_FILES = [registry.get_model_entry(n).default_weights for n in SHIPPED] + [
    "pkg:assets/samcp_nano_panoptic.safetensors"]


def test_the_shipped_models_are_the_embedded_ones():
    assert SHIPPED == ["sam_nano", "sam_nano_panoptic", "sam_nano_sum"]
    assets = resolve_checkpoint(SHIPPED_FILES[0]).parent
    assert sorted(f"pkg:assets/{p.name}" for p in assets.glob("*.safetensors")) == sorted(SHIPPED_FILES)


@pytest.mark.parametrize("ref", SHIPPED_FILES)
def test_model_card_names_the_shipped_file(ref):
    """Each weights file in the package has a model card NAME.md beside it that gives the file's full SHA-256."""
    import re

    path = resolve_checkpoint(ref)
    card = path.with_suffix(".md").read_text()
    named = re.search(r"SHA-256 `([0-9a-f]{64})`", card)
    assert named, f"the model card {path.with_suffix('.md').name} gives the shipped file's full SHA-256"
    assert named.group(1) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_load_across_models_of_one_architecture_only(tmp_path):
    """sam_nano and sam_nano_panoptic share an architecture: each loads the other's files; sam_nano_vit does not,
    and the error names the file, both models and why."""
    nano = create_model("sam_nano", pretrained=False)
    path = save_checkpoint(nano, tmp_path / "nano.safetensors")
    assert read_metadata(path)["model"] == "sam_nano"
    panoptic = create_model("sam_nano_panoptic", path)
    assert panoptic.samantic_name == "sam_nano_panoptic"
    assert all(torch.equal(a, b) for a, b in zip(nano.state_dict().values(), panoptic.state_dict().values()))
    back = save_checkpoint(panoptic, tmp_path / "panoptic.safetensors")
    assert create_model("sam_nano", back).samantic_name == "sam_nano"
    with pytest.raises(ValueError, match=r"nano.safetensors was saved for model 'sam_nano', not 'sam_nano_vit' "
                                         r"\(another architecture\)"):
        create_model("sam_nano_vit", path)
    # one architecture field changed: another architecture, even where the tensors would fit
    with pytest.raises(ValueError, match="another architecture"):
        create_model("sam_nano_panoptic", path, encoder_norm_eps=1e-5)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_architectures_match_segment_anything(name):
    with torch.device("meta"):
        ours = create_model(name).state_dict()
        reference = sam_model_registry[OFFICIAL[name]]().state_dict()
    assert list(ours) == list(reference)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def test_official_configs_use_the_shared_numbers():
    for name in OFFICIAL:
        config = get_config(name)
        assert (config.img_size, config.patch_size, config.prompt_embed_dim) == (1024, 16, 256)
        assert (config.image_embedding_size, config.low_res_size) == (64, 256)


def test_nano_config():
    config = get_config("sam_nano")
    assert (config.img_size, config.image_embedding_size, config.low_res_size) == (384, 48, 192)
    assert (config.encoder_type, config.patch_size) == ("conv", 8)  # v5: conv encoder at stride 8
    assert get_config("sam_nano_vit").encoder_global_attn_indexes == (2, 5)  # v1-v4


def test_unknown_model_suggests_close_match():
    with pytest.raises(ValueError, match="Did you mean: sam_vit_b") as info:
        create_model("sam_vit_bb")
    assert "sam_nano" in str(info.value)  # all known names are listed
    with pytest.raises(ValueError, match="Did you mean: sam_nano"):
        get_config("sam_nanp")


def test_register_model_hook_and_duplicates(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @register_model
    def sam_tiny_test() -> SamConfig:
        """Test model."""
        return get_config("sam_nano_vit", encoder_depth=2, encoder_global_attn_indexes=(1,))

    assert "sam_tiny_test" in list_models()
    assert registry.get_model_entry("sam_tiny_test").description == "Test model."
    assert len(create_model("sam_tiny_test").image_encoder.blocks) == 2
    with pytest.raises(ValueError, match="already registered"):
        register_model(sam_tiny_test)


# --------------------------------------------------------------------------- configs


def test_config_is_frozen_and_normalized():
    config = get_config("sam_nano")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.img_size = 1024  # type: ignore[misc]
    listed = SamConfig(
        encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1]
    )
    assert listed.encoder_global_attn_indexes == (1,)
    hash(listed)


def test_config_json_round_trip():
    config = get_config("sam_vit_h")
    assert SamConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["encoder_global_attn_indexes"] == [7, 15, 23, 31]
    with pytest.raises(ValueError, match="img_size"):
        SamConfig.from_dict({**config.to_dict(), "img_sise": 3})
    with pytest.raises(ValueError, match="missing required fields: encoder_depth"):
        SamConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "encoder_depth"})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"img_size": 500}, "multiple of patch_size"),
        ({"encoder_num_heads": 5}, "divisible by encoder_num_heads"),
        ({"encoder_global_attn_indexes": (2, 6)}, r"bad: \[6\]"),
        ({"prompt_embed_dim": 100}, "multiple of 8"),
        ({"mask_in_chans": 6}, "multiple of 4"),
        ({"pixel_mean": (1.0, 2.0)}, "3 values"),
        ({"encoder_depth": 0}, "positive int"),
    ],
)
def test_invalid_config_raises(change, message):
    with pytest.raises(ValueError, match=message):
        get_config("sam_nano_vit", **change)


def test_overrides():
    model = create_model("sam_nano_vit", img_size=256)
    assert model.image_encoder.img_size == 256
    assert model.samantic_config.low_res_size == 64
    with pytest.raises(ValueError, match="Did you mean: img_size"):
        create_model("sam_nano", img_sise=256)
    with pytest.raises(ValueError, match="shape mismatch"):
        create_model("sam_nano", encoder_widths=(16, 64, 128, 256))  # the default weights are loaded strictly
    # the conv encoder has no size-dependent weights: the shipped weights load at another input size
    assert create_model("sam_nano", img_size=256).samantic_config.low_res_size == 128


# --------------------------------------------------------------------------- sam_nano runs in segment-anything's tools


def test_nano_runs_in_sam_predictor(nano):
    image = np.random.default_rng(0).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    predictor = SamPredictor(nano)
    predictor.set_image(image)
    assert predictor.get_image_embedding().shape == (1, 128, 48, 48)
    masks, scores, low_res = predictor.predict(
        point_coords=np.array([[64.0, 48.0]]), point_labels=np.array([1]), multimask_output=True
    )
    assert masks.shape == (3, 96, 128) and masks.dtype == bool
    assert scores.shape == (3,)
    assert low_res.shape == (3, 192, 192)  # 4 * img_size / patch_size


def test_nano_runs_in_automatic_mask_generator(nano):
    image = np.random.default_rng(1).integers(0, 256, size=(80, 120, 3), dtype=np.uint8)
    # Thresholds at 0 keep every mask of the untrained model so the outputs can be checked.
    generator = SamAutomaticMaskGenerator(
        nano, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    records = generator.generate(image)
    assert len(records) > 0
    for record in records:
        assert record["segmentation"].shape == (80, 120)
        assert len(record["bbox"]) == 4
        assert record["area"] == int(record["segmentation"].sum())


# --------------------------------------------------------------------------- checkpoints


def test_pth_round_trip(nano, nano_pth):
    fresh = create_model("sam_nano", pretrained=False)
    assert not _state_equal(fresh, nano)
    loaded = create_model("sam_nano", nano_pth)
    assert _state_equal(loaded, nano)
    assert not loaded.training


def test_safetensors_round_trip_with_metadata(nano, tmp_path):
    path = save_checkpoint(nano, tmp_path / "deep" / "nano.safetensors", metadata={"step": 7, "note": "x"})
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    header = read_metadata(path)
    assert header["model"] == "sam_nano" and header["format"] == "samantic"
    assert SamConfig.from_json(header["config"]) == get_config("sam_nano")
    assert (header["step"], header["note"]) == ("7", "x")
    assert _state_equal(create_model("sam_nano", str(path)), nano)


def test_conv_weights_load_at_the_side_they_were_saved_at(nano, tmp_path, nano_pth):
    """A conv encoder's weights fit any side, so the side lives in the file's header: create_model builds the
    model there unless told another (every caller with checkpoint=FILE: segment, Segmenter, train, bundles)."""
    at_256 = create_model("sam_nano", nano_pth, img_size=256)
    path = save_checkpoint(at_256, tmp_path / "at256.safetensors")
    assert recorded_input_size(path) == 256
    loaded = create_model("sam_nano", str(path))
    assert loaded.samantic_config == get_config("sam_nano", img_size=256)
    assert loaded.image_encoder.img_size == 256 and loaded.prompt_encoder.input_image_size == (256, 256)
    grid = get_config("sam_nano", img_size=256).image_embedding_size
    assert loaded.prompt_encoder.image_embedding_size == (grid, grid) and _state_equal(loaded, nano)
    # the recorded side runs: a 256 px image gives the 256 grid's embedding
    with torch.no_grad():
        assert loaded.image_encoder(torch.zeros(1, 3, 256, 256)).shape[-2:] == (grid, grid)
    assert create_model("sam_nano", str(path), img_size=320).image_encoder.img_size == 320  # an explicit side wins
    # the config's side, a .pth (no header) and a header without a config keep the config's side
    assert recorded_input_size(save_checkpoint(nano, tmp_path / "at384.safetensors")) == 384
    assert recorded_input_size(nano_pth) is None
    assert create_model("sam_nano", nano_pth).image_encoder.img_size == 384
    bare = save_checkpoint(dict(nano.state_dict()), tmp_path / "bare.safetensors")
    assert recorded_input_size(bare) is None and create_model("sam_nano", str(bare)).image_encoder.img_size == 384


def test_save_checkpoint_rejects_other_suffix(nano, tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        save_checkpoint(nano, tmp_path / "nano.pth")


def test_safetensors_saved_for_another_model(nano, tmp_path):
    """Another model's file is refused unless its recorded architecture is this model's (then see
    test_weights_load_across_models_of_one_architecture_only)."""
    other = get_config("sam_nano", encoder_norm_eps=1e-5).to_json()
    path = save_checkpoint(nano, tmp_path / "nano.safetensors", metadata={"model": "sam_other", "config": other})
    with pytest.raises(ValueError, match="saved for model 'sam_other'"):
        create_model("sam_nano", path)
    unknown = save_checkpoint(nano, tmp_path / "bare.safetensors", metadata={"model": "sam_other", "config": ""})
    with pytest.raises(ValueError, match="saved for model 'sam_other'"):
        create_model("sam_nano", unknown)


def test_wrapped_state_dict_is_accepted(nano, tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"model": nano.state_dict(), "epoch": 3}, path)
    assert _state_equal(create_model("sam_nano", path), nano)


def _save_modified(nano, path, edit):
    state = dict(nano.state_dict())
    edit(state)
    torch.save(state, path)
    return path


def test_missing_key_is_named(nano, tmp_path):
    path = _save_modified(nano, tmp_path / "m.pth", lambda s: s.pop("mask_decoder.iou_token.weight"))
    with pytest.raises(ValueError, match=r"1 missing key \(mask_decoder\.iou_token\.weight\)") as info:
        create_model("sam_nano", path)
    assert str(path) in str(info.value)
    assert "unexpected" not in str(info.value)


def test_unexpected_key_is_named(nano, tmp_path):
    path = _save_modified(nano, tmp_path / "u.pth", lambda s: s.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"1 unexpected key \(extra\.weight\)"):
        create_model("sam_nano", path)


def test_shape_mismatch_is_named(nano, tmp_path):
    key = "image_encoder.neck.0.weight"
    path = _save_modified(nano, tmp_path / "s.pth", lambda s: s.update({key: torch.zeros(128, 32, 1, 1)}))
    expected = rf"1 shape mismatch \({key}: checkpoint \[128, 32, 1, 1\] vs model \[128, 64, 1, 1\]\)"
    with pytest.raises(ValueError, match=expected):
        create_model("sam_nano", path)


def test_wrong_architecture_lists_are_truncated(nano, tmp_path):
    path = tmp_path / "nano.pth"
    torch.save(nano.state_dict(), path)
    n_nano = len(nano.state_dict())
    with torch.device("meta"):
        vit_b = create_model("sam_vit_b")
    with pytest.raises(ValueError) as info:
        load_checkpoint(vit_b, path)
    message = str(info.value)
    assert "model 'sam_vit_b'" in message
    assert "missing keys" in message and "shape mismatches" in message
    assert "more" in message and len(message) < 3000
    assert n_nano > 20  # long lists to truncate


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model("sam_nano", missing)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        create_model("sam_nano", "nope.safetensors")


def test_unsafe_or_bad_files_are_value_errors(tmp_path):
    pickled = tmp_path / "code.pth"
    torch.save({"weight": torch.zeros(1), "fn": sys.exit}, pickled)  # needs code execution to load
    with pytest.raises(ValueError, match="weights_only=True"):
        create_model("sam_nano", pickled)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        create_model("sam_nano", garbage)
    odd = tmp_path / "weights.ckpt.zip"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint suffix"):
        create_model("sam_nano", odd)


def test_tag_for_another_model_is_refused():
    # Refused before any download is attempted.
    with pytest.raises(ValueError, match="'sam_vit_b.sa1b' are for model 'sam_vit_b', not 'sam_nano'"):
        create_model("sam_nano", "sam_vit_b.sa1b")


def test_pretrained_flags(nano_pth, monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @register_model
    def sam_untrained() -> SamConfig:
        return get_config("sam_nano")

    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("sam_untrained", pretrained=True)
    with pytest.raises(ValueError, match="pass one or the other"):
        create_model("sam_nano", nano_pth, pretrained=False)


def test_default_weights_hook(nano, nano_pth, monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @register_model(default_weights=str(nano_pth))
    def sam_nano_shipped() -> SamConfig:
        return get_config("sam_nano")

    assert _state_equal(create_model("sam_nano_shipped"), nano)
    assert _state_equal(create_model("sam_nano_shipped", pretrained=True), nano)
    assert not _state_equal(create_model("sam_nano_shipped", pretrained=False), nano)


def test_packaged_weights_missing(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @register_model(default_weights="pkg:assets/not_there.safetensors")
    def sam_nano_pkg() -> SamConfig:
        return get_config("sam_nano")

    with pytest.raises(FileNotFoundError, match="not_there.safetensors"):
        create_model("sam_nano_pkg")
    assert isinstance(create_model("sam_nano_pkg", pretrained=False), Sam)


def test_load_into_meta_model(nano, nano_pth):
    with torch.device("meta"):
        model = create_model("sam_nano")
    load_checkpoint(model, nano_pth)
    assert not any(p.is_meta for p in model.parameters())
    assert _state_equal(model, nano)


def test_weight_tag_downloads_verifies_and_loads(nano, nano_pth, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTIC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_WEIGHTS", dict(weights._WEIGHTS))
    data = nano_pth.read_bytes()
    with FileServer(data, "nano.pth") as server:
        weights.register_weight(
            weights.WeightSpec(
                tag="sam_nano.test",
                model="sam_nano",
                filename="nano.pth",
                url=server.url,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        loaded = create_model("sam_nano", "sam_nano.test", progress=False)
        again = create_model("sam_nano", pretrained=True, progress=False)  # the model's default tag, cached
        assert len(server.requests) == 1
    assert _state_equal(loaded, nano) and _state_equal(again, nano)
    assert (tmp_path / "cache" / "weights" / "nano.pth").is_file()
