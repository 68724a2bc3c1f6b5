"""Weight-space blends of a fine-tune with its base (``samantic train blend``, WiSE-FT; issue 18).

Alpha 0 must be the base model and alpha 1 the fine-tune, bit for bit, task table included; a blend
loads wherever the fine-tune does; a file that is not a fine-tune of the base is refused by name.
"""

import copy
import json
import subprocess

import pytest
import torch

from samantic.models import (attach_task_prompt, create_model, read_metadata, read_state_dict, resolve_checkpoint,
                             save_checkpoint)
from samantic.models.registry import get_model_entry
from samantic.train.blend import blend_checkpoint, blend_state_dicts

from cli_helpers import cli_env, samantic_exe

TABLE_KEY = "task_prompt.embed.weight"


@pytest.fixture(scope="module")
def base_path():
    return resolve_checkpoint(get_model_entry("sam_nano").default_weights, "sam_nano")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A stand-in SUM fine-tune of sam_nano: every weight moved, a task table added."""
    model = copy.deepcopy(create_model("sam_nano"))
    attach_task_prompt(model)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = save_checkpoint(model, tmp_path_factory.mktemp("ft") / "ft.safetensors", metadata={"steps": 7})
    return path


def test_ends_are_exact_and_the_middle_is_between(base_path, tuned, tmp_path):
    base, ft = read_state_dict(base_path), read_state_dict(tuned)
    zero = read_state_dict(blend_checkpoint(tuned, 0.0, tmp_path / "a0.safetensors"))
    one = read_state_dict(blend_checkpoint(tuned, 1.0, tmp_path / "a1.safetensors"))
    half = read_state_dict(blend_checkpoint(tuned, 0.5, tmp_path / "a5.safetensors"))
    assert set(zero) == set(one) == set(half) == set(ft)
    moved = 0
    for k, t in ft.items():
        b = base.get(k, torch.zeros_like(t)).to(t.dtype)  # the task table blends with zeros; shipped in fp16
        assert torch.equal(zero[k], b), k
        assert torch.equal(one[k], t), k
        if t.is_floating_point():
            assert torch.allclose(half[k], (b + t) / 2, atol=1e-6), k
            moved += int(not torch.equal(b, t))
        else:
            assert torch.equal(half[k], t), k
    assert moved > 10 and not zero[TABLE_KEY].any() and one[TABLE_KEY].any()


def test_a_blend_loads_and_alpha_zero_decodes_as_the_base(base_path, tuned, tmp_path):
    from samantic.pipeline import Predictor

    path = blend_checkpoint(tuned, 0.0, tmp_path / "a0.safetensors")
    meta = read_metadata(path)
    assert meta["model"] == "sam_nano" and meta["steps"] == "7"  # the fine-tune's header is kept
    assert json.loads(meta["blend"]) == {"alpha": 0.0, "fine_tune": str(tuned), "base": str(base_path)}
    blended, plain = create_model("sam_nano", path), create_model("sam_nano")
    image = (torch.rand(96, 128, 3) * 255).to(torch.uint8).numpy()
    coords = torch.tensor([[[40.0, 30.0]]])
    labels = torch.ones(1, 1, dtype=torch.int)
    got, want = Predictor(blended), Predictor(plain)
    got.set_image(image)
    want.set_image(image)
    for task in ("unspecified", "part"):  # a zero table row decodes every task as the base model
        _, iou_a, low_a = got.predict_torch(got.transform.apply_coords_torch(coords, image.shape[:2]), labels, task=task)
        _, iou_b, low_b = want.predict_torch(want.transform.apply_coords_torch(coords, image.shape[:2]), labels)
        assert torch.allclose(iou_a, iou_b, atol=1e-6) and torch.allclose(low_a, low_b, atol=1e-5)


def test_bad_inputs_are_refused_by_name(base_path, tuned, tmp_path):
    base, ft = read_state_dict(base_path), read_state_dict(tuned)
    with pytest.raises(ValueError, match="alpha must be in"):
        blend_state_dicts(base, ft, 1.5)
    name = next(k for k, t in base.items() if t.ndim == 2)
    cut = dict(ft, **{name: ft[name][:1]})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        blend_state_dicts(base, cut, 0.5)
    with pytest.raises(ValueError, match="lacks 1 of"):
        blend_state_dicts(base, {k: v for k, v in ft.items() if k != name}, 0.5)
    other = save_checkpoint(create_model("sam_nano_conv", pretrained=False), tmp_path / "conv.safetensors")
    with pytest.raises(ValueError, match="not its base"):
        blend_checkpoint(tuned, 0.5, tmp_path / "x.safetensors", base=str(other))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        blend_checkpoint(tmp_path / "missing.safetensors", 0.5, tmp_path / "x.safetensors")
    anonymous = save_checkpoint(read_state_dict(tuned), tmp_path / "anon.safetensors")  # no model in the header
    with pytest.raises(ValueError, match="names no registered model"):
        blend_checkpoint(anonymous, 0.5, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_cli(tuned, tmp_path):
    out = tmp_path / "b.safetensors"
    r = subprocess.run([samantic_exe(), "train", "blend", str(tuned), "--alpha", "0.8", "--out", str(out)],
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(read_metadata(out)["blend"])["alpha"] == 0.8 and str(out) in r.stdout
    r = subprocess.run([samantic_exe(), "train", "blend", str(tmp_path / "nope.safetensors"), "--alpha", "0.8",
                        "--out", str(tmp_path / "c.safetensors")], capture_output=True, text=True, env=cli_env(),
                       timeout=300)
    assert r.returncode == 1 and "nope.safetensors" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([samantic_exe(), "train", "blend", str(tuned), "--alpha", "1.2", "--out",
                        str(tmp_path / "c.safetensors")], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 2 and not (tmp_path / "c.safetensors").exists()


def test_two_fine_tunes_average_into_a_soup(tuned, tmp_path):
    """--base another fine-tune of the same model: alpha 0.5 is the mean of the two, task tables included."""
    ft = read_state_dict(tuned)
    torch.manual_seed(6)
    other = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ft.items()}
    other_path = save_checkpoint(other, tmp_path / "other.safetensors", metadata={"model": "sam_nano"})
    soup = read_state_dict(blend_checkpoint(tuned, 0.5, tmp_path / "soup.safetensors", base=str(other_path)))
    for k, v in ft.items():
        want = (v + other[k]) / 2 if v.is_floating_point() else v  # counters: the fine-tune's
        assert soup[k].dtype == v.dtype and torch.allclose(soup[k].double(), want.double(), atol=1e-6), k
    assert not torch.equal(soup[TABLE_KEY], ft[TABLE_KEY])
    create_model("sam_nano", tmp_path / "soup.safetensors")  # loads
