"""Open-vocabulary SAM-CP: class names encoded by a CLIP text tower (samantic.heads.text), stored in
the head file, ``train samcp --text-encoder``, ``samcp add-classes``, and inference without open_clip.

No pretrained CLIP can be downloaded here: the encoder is a tiny, randomly initialised (seeded)
open_clip model registered from a config, so these tests check the plumbing, not accuracy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from safetensors import safe_open
from typer.testing import CliRunner

from samantic.cli.main import app
from samantic.heads.samcp import SamcpHead, SamcpInfo, add_samcp_classes, load_samcp, save_samcp
from samantic.heads.text import DEFAULT_TEMPLATE, TextEncoderSpec, check_template, open_text_encoder
from samantic.train.data.panoptic import STUFF_CLASSES, THING_CLASSES, render_panoptic

TINY = "samantic-tiny-clip"
# a few layers, width 32; the vocabulary must be CLIP's (the tokenizer's ids)
TINY_CFG = {"embed_dim": 24,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
TINY_SPEC = f"open_clip:{TINY}"
SIZE = (96, 128)
GRID = 8
LOW = {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.5}
SMALL = dict(d_model=32, heads=2, layers=2, encoder_layers=1, ffn_dim=64, roi_channels=8,
             backbone_channels=(8, 16, 16, 32), input_size=128)
runner = CliRunner()


@pytest.fixture(autouse=True)
def _tiny_models_one_thread(one_thread):
    """these models are tiny: on a shared CPU, intra-op threads cost far more than they bring"""


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Registers the tiny config (``open_clip:samantic-tiny-clip``) and writes the same model, with
    its (seeded random) weights, as a ``local-dir`` folder a subprocess can use too."""
    root = tmp_path_factory.mktemp("tiny_clip")
    (root / "configs").mkdir()
    (root / "configs" / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(root / "configs")
    enc = open_text_encoder(TINY_SPEC)
    local = root / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    torch.save(enc.model.state_dict(), local / "open_clip_pytorch_model.bin")
    other = root / "other"  # same architecture, other weights: not the encoder a head was trained with
    shutil.copytree(local, other)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        torch.save(open_clip.create_model(TINY).state_dict(), other / "open_clip_pytorch_model.bin")
    return {"local": f"open_clip:local-dir:{local}", "other": f"open_clip:local-dir:{other}"}


def small_text_head(names=(("circle", "star"), ("wall",))) -> SamcpHead:
    enc = open_text_encoder(TINY_SPEC)
    info = SamcpInfo(classes=names[0], stuff=names[1], text_dim=enc.dim,
                     extra={"text_encoder": TINY_SPEC, "text_template": DEFAULT_TEMPLATE}, **SMALL)
    torch.manual_seed(0)
    return SamcpHead(info, text_embeddings=enc.encode(info.names)).eval()


def patches(n=5, size=SIZE, seed=0):
    """Random rectangles as patches: (RLE dicts, XYXY inclusive boxes, image)."""
    rng = np.random.default_rng(seed)
    h, w = size
    m = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        m[i, y:y + rng.integers(8, 20), x:x + rng.integers(8, 20)] = 1
    rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode()
    boxes = np.array([[x, y, x + bw - 1, y + bh - 1] for x, y, bw, bh in mask_utils.toBbox(rles).astype(int)])
    return rles, boxes, (rng.random((h, w, 3)) * 255).astype(np.uint8)


# ---------------------------------------------------------------- the encoder


def test_encoding_is_normalised_prompted_and_reproducible(tiny_clip, monkeypatch):
    enc = open_text_encoder(TINY_SPEC)
    assert enc.dim == TINY_CFG["embed_dim"] and not enc.pretrained
    emb = enc.encode(["circle", "star", "wall"])
    assert emb.shape == (3, 24) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # the prompt is what gets encoded: the template's output, not the bare name
    ref = F.normalize(enc.model.encode_text(enc.tokenizer(["a photo of a star."])).float(), dim=-1)
    assert torch.allclose(emb[1], ref[0], atol=1e-5)
    assert not torch.allclose(enc.encode(["star"], "{name}")[0], emb[1], atol=1e-3)
    assert enc.encode([]).shape == (0, 24)
    # a tower without pretrained weights is seeded: a second process (or instance) gets the same embeddings
    assert torch.equal(open_text_encoder(TINY_SPEC).encode(["circle", "star", "wall"]), emb)
    # the same weights from a local folder (what a checkpoint path or local-dir gives)
    local = open_text_encoder(tiny_clip["local"])
    assert local.pretrained and torch.allclose(local.encode(["circle", "star", "wall"]), emb, atol=1e-5)
    assert not torch.allclose(open_text_encoder(tiny_clip["other"]).encode(["star"])[0], emb[1], atol=1e-2)
    # the spec a head records names local files by absolute path
    folder = Path(tiny_clip["local"].split("local-dir:", 1)[1])
    monkeypatch.chdir(folder.parent)
    assert str(open_text_encoder("open_clip:local-dir:local").spec) == f"open_clip:local-dir:{folder.resolve()}"
    ckpt = open_text_encoder(f"{TINY_SPEC}:local/open_clip_pytorch_model.bin")
    assert ckpt.pretrained and ckpt.spec.pretrained == str((folder / "open_clip_pytorch_model.bin").resolve())


def test_spec_and_template_parsing():
    s = TextEncoderSpec.parse("open_clip:ViT-B-32:/models/clip.bin")
    assert (s.kind, s.model, s.pretrained, s.schema) == ("open_clip", "ViT-B-32", "/models/clip.bin", None)
    assert str(s) == "open_clip:ViT-B-32:/models/clip.bin"
    assert TextEncoderSpec.parse("open_clip:ViT-B-32").pretrained == ""
    d = TextEncoderSpec.parse("open_clip:local-dir:/a:b/c")  # a schema keeps the whole rest (colons included)
    assert (d.model, d.pretrained, d.schema) == ("local-dir:/a:b/c", "", "local-dir")
    for bad in ("clip:ViT-B-32", "open_clip", "open_clip:", "ViT-B-32"):
        with pytest.raises(ValueError, match=r"open_clip:MODEL\[:PRETRAINED\]"):
            TextEncoderSpec.parse(bad)
    assert check_template("a photo of a {name}.") == "a photo of a {name}."
    for bad in ("a photo", "a {name} {x}", "{0} {name}", "{name"):
        with pytest.raises(ValueError, match="prompt template"):
            check_template(bad)


def test_clear_errors(tiny_clip, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown open_clip model 'samantic-tiny-clp'.*did you mean: samantic-tiny-clip"):
        open_text_encoder("open_clip:samantic-tiny-clp")
    with pytest.raises(ValueError, match=r"no such checkpoint file '/nowhere/clip.bin'.*available locally.*PRETRAINED"):
        open_text_encoder(f"{TINY_SPEC}:/nowhere/clip.bin")
    with pytest.raises(ValueError, match="neither a checkpoint file nor a pretrained tag of ViT-B-32 \\(tags: openai"):
        open_text_encoder("open_clip:ViT-B-32:laion9")
    with pytest.raises(ValueError, match="no such folder"):
        open_text_encoder(f"open_clip:local-dir:{tmp_path / 'none'}")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"could not load the checkpoint file .*junk.bin \(UnpicklingError.*open_clip "
                                         r"weights of samantic-tiny-clip"):
        open_text_encoder(f"{TINY_SPEC}:{junk}")

    # a known tag whose download fails (no network): what failed, and where weights can come from
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': Name or service not known")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(ValueError, match=r"open_clip:ViT-B-32:openai: could not load the pretrained weights "
                                         r"\(RuntimeError: Failed to download.*must be available locally"):
        open_text_encoder("open_clip:ViT-B-32:openai")
    # the extra is not installed
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r"pip install 'samantic\[clip\]'"):
        open_text_encoder(TINY_SPEC)
    r = runner.invoke(app, ["train", "samcp", "--data", "shapes-panoptic:1000000:1", "--out",
                            str(tmp_path / "h.safetensors"), "--text-encoder", TINY_SPEC, "--no-progress"])
    assert r.exit_code == 1 and "pip install 'samantic[clip]'" in r.output


# ---------------------------------------------------------------- the head


def test_text_head_queries_and_the_class_queries_contract(tiny_clip):
    head = small_text_head()
    c, d = head.info.num_classes, head.info.d_model
    assert head.class_embed is None and head.text_embeddings.shape == (c, 24)
    # class_queries() with no argument: [C, D] of the head's own vocabulary (what an exporter reads)
    q = head.class_queries()
    assert q.shape == (c, d)
    assert torch.allclose(q, head.text_proj(head.text_embeddings))
    assert torch.equal(q, head.class_queries(head.text_embeddings))
    # forward's default is that vocabulary
    images = torch.rand(1, 3, *SIZE)
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 40.0], [50.0, 20.0, 90.0, 60.0]])]
    masks = [torch.ones(2, 7, 7)]
    with torch.no_grad():
        a = head(images, boxes, masks)
        b = head(images, boxes, masks, class_embeddings=head.text_embeddings)
        other = head(images, boxes, masks, class_embeddings=torch.randn(c, 24))
    assert a.num_classes == c and torch.equal(a.affinity[-1], b.affinity[-1])
    assert not torch.allclose(a.class_logits[-1], other.class_logits[-1])
    # a head with learned class embeddings: unchanged (no text buffer, class_queries() is class_embed)
    learned = SamcpHead(SamcpInfo(classes=("circle",), **SMALL))
    assert learned.text_embeddings is None and learned.class_queries() is learned.class_embed
    assert "class_embed" in learned.state_dict() and "text_embeddings" not in learned.state_dict()
    with pytest.raises(ValueError, match=r"text_embeddings must be \[3, 24\]"):
        SamcpHead(head.info, text_embeddings=torch.randn(2, 24))
    with pytest.raises(ValueError, match="text_dim > 0"):
        SamcpHead(SamcpInfo(classes=("circle",), **SMALL), text_embeddings=torch.randn(1, 24))


def test_head_file_holds_the_embeddings_and_reloads(tiny_clip, tmp_path):
    head = small_text_head()
    path = save_samcp(head, tmp_path / "t.safetensors")
    with safe_open(str(path), "pt") as f:
        assert "text_embeddings" in f.keys() and "class_embed" not in f.keys()
        meta = f.metadata()
    assert meta["text_encoder"] == TINY_SPEC and meta["text_template"] == DEFAULT_TEMPLATE
    back = load_samcp(path)
    assert torch.equal(back.text_embeddings, head.text_embeddings)
    assert torch.equal(back.class_queries(), head.class_queries())
    assert back.info.extra["text_encoder"] == TINY_SPEC


# ---------------------------------------------------------------- train, add classes, infer


@pytest.fixture(scope="module")
def trained(tiny_clip, tmp_path_factory):
    """``samantic train samcp --text-encoder open_clip:<tiny>`` for a few steps on two small v2 scenes."""
    from samantic.train.data.panoptic import write_panoptic

    data = tmp_path_factory.mktemp("pdata")
    write_panoptic(data, [render_panoptic(1_000_000 + i, size=SIZE) for i in range(2)], progress=False)
    out = tmp_path_factory.mktemp("head") / "samcp.safetensors"
    r = runner.invoke(app, ["train", "samcp", "--data", str(data), "--out", str(out), "--cache",
                            str(tmp_path_factory.mktemp("cache")), "--points-per-side", str(GRID),
                            "--pred-iou-thresh", str(LOW["pred_iou_thresh"]), "--stability-score-thresh",
                            str(LOW["stability_score_thresh"]), "--steps", "3", "--images-per-step", "2",
                            "--layers", "1", "--threads", "1", "--text-encoder", TINY_SPEC, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"class names encoded by {TINY_SPEC} (24-d" in r.output and "text tower is random" in r.output
    return out


def test_training_with_a_text_encoder_stores_the_names_embeddings(trained):
    head = load_samcp(trained)
    names = THING_CLASSES + STUFF_CLASSES
    assert head.info.names == names and head.info.text_dim == 24 and head.class_embed is None
    assert head.info.extra["text_encoder"] == TINY_SPEC and head.info.extra["text_template"] == DEFAULT_TEMPLATE
    assert head.info.extra["steps_done"] == "3"
    expected = open_text_encoder(TINY_SPEC).encode(names)
    assert torch.allclose(head.text_embeddings, expected, atol=1e-6)
    # the projection was trained, the embeddings were not
    assert not torch.allclose(head.class_queries(), SamcpHead(head.info, text_embeddings=expected).class_queries())


@pytest.fixture(scope="module")
def extended(trained, tiny_clip, tmp_path_factory):
    """``samcp add-classes``: two things into a new file, then one stuff class in place."""
    out = tmp_path_factory.mktemp("ext") / "open.safetensors"
    r = runner.invoke(app, ["samcp", "add-classes", str(trained), "--names", "kite, boat", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "added 2 thing class(es): kite, boat" in r.output and f"saved: {out}" in r.output
    # the recorded encoder is a registered name; a folder with the same weights reproduces it too
    r = runner.invoke(app, ["samcp", "add-classes", str(out), "--names", "sky", "--stuff", "--text-encoder",
                            tiny_clip["local"]])
    assert r.exit_code == 0, r.output
    return out


def test_add_classes_grows_the_vocabulary_and_keeps_old_queries(trained, extended):
    old, new = load_samcp(trained), load_samcp(extended)
    assert new.info.classes == THING_CLASSES + ("kite", "boat")
    assert new.info.stuff == STUFF_CLASSES + ("sky",)
    assert json.loads(new.info.extra["added_classes"]) == ["kite", "boat", "sky"]
    assert new.info.extra["text_encoder"] == TINY_SPEC  # the recorded encoder stays
    qo, qn = old.class_queries(), new.class_queries()
    assert qn.shape == (old.info.num_classes + 3, old.info.d_model)
    for i, name in enumerate(old.info.names):
        j = new.info.names.index(name)
        # bit for bit: the stored rows are not normalised again (which moved their last bit on an AMD EPYC)
        assert torch.equal(old.text_embeddings[i], new.text_embeddings[j]), name
        assert torch.equal(qo[i], qn[j]), name
    enc = open_text_encoder(TINY_SPEC)
    for name in ("kite", "boat", "sky"):
        assert torch.allclose(new.text_embeddings[new.info.names.index(name)], enc.encode([name])[0], atol=1e-6)
    # every weight but the vocabulary is the trained head's
    so, sn = old.state_dict(), new.state_dict()
    assert set(so) == set(sn)
    for k in so:
        if k != "text_embeddings":
            assert torch.equal(so[k], sn[k]), k
    assert not list(extended.parent.glob(".*tmp"))  # written atomically: no temporary file left


def test_predictions_carry_the_new_names(extended):
    from samantic.pipeline.panoptic import SamcpPredictor

    head = load_samcp(extended)
    rles, boxes, image = patches(6)
    for wanted in ("kite", "sky"):
        pred = SamcpPredictor(head, classes=[wanted], score_thresh=0.0, instance_thresh=0.0, min_area=0,
                              overlap_thresh=0.0)
        out = pred(image, rles, boxes)
        assert out.segments_info, wanted
        for s in out.segments_info:
            assert s["category_name"] == wanted and head.info.names[s["category_id"] - 1] == wanted
            assert s["isthing"] == (wanted == "kite")


def test_add_classes_refusals_leave_the_file_alone(trained, tiny_clip, tmp_path):
    head = tmp_path / "h.safetensors"
    shutil.copy(trained, head)
    before = head.read_bytes()
    r = runner.invoke(app, ["samcp", "add-classes", str(head), "--names", "star,kite"])
    assert r.exit_code == 1 and "already known: ['star']" in r.output
    # an encoder that is not the head's (other weights, same width) gives other embeddings of its names
    r = runner.invoke(app, ["samcp", "add-classes", str(head), "--names", "kite", "--text-encoder", tiny_clip["other"]])
    assert r.exit_code == 1 and "is not the text encoder this head was trained with" in r.output
    r = runner.invoke(app, ["samcp", "add-classes", str(head), "--names", " , "])
    assert r.exit_code != 0 and "no class names" in r.output
    assert head.read_bytes() == before
    # in Python: the same refusals
    with pytest.raises(ValueError, match="repeated: \\['kite'\\]"):
        add_samcp_classes(head, ["kite", "kite"])
    loaded = load_samcp(head)
    with pytest.raises(ValueError, match=r"embeddings of the new names must be \[1, 24\]"):
        loaded.add_classes(["kite"], torch.randn(1, 8))


def test_learned_head_cannot_take_new_names(tmp_path):
    learned = SamcpHead(SamcpInfo(classes=("circle",), stuff=("wall",), **SMALL))
    path = save_samcp(learned, tmp_path / "learned.safetensors")
    with pytest.raises(ValueError, match="learned class embeddings.*cannot take new class names without retraining"):
        learned.add_classes(["kite"], torch.randn(1, 24))
    with pytest.raises(ValueError, match="learned.safetensors.*without retraining"):
        add_samcp_classes(path, ["kite"])
    # the installed command, in a real process
    exe = Path(sys.executable).parent / "samantic"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "samantic.cli.main"]
    r = subprocess.run(cmd + ["samcp", "add-classes", str(path), "--names", "kite"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "without retraining" in r.stderr, r.stdout + r.stderr
    assert load_samcp(path).info.names == ("circle", "wall")  # untouched, and old-style files still load


_BLOCKED = """
import sys
sys.modules["open_clip"] = None  # `import open_clip` now raises ImportError
from samantic.cli.main import main
sys.argv = ["samantic"] + sys.argv[1:]
try:
    main()
finally:
    assert sys.modules.get("open_clip") is None, "inference imported open_clip"
"""


def test_inference_needs_no_text_encoder(extended, tmp_path):
    from PIL import Image

    src = tmp_path / "a.png"
    Image.fromarray(render_panoptic(21, size=SIZE).image).save(src)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _BLOCKED, "segment", str(src), "--out", str(out), "--samcp",
                        str(extended), "--score-thresh", "0", "--no-progress"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "a.png.json").read_text())
    names = [c["name"] for c in sorted(res["categories"], key=lambda c: c["id"])]
    assert names == list(THING_CLASSES + ("kite", "boat") + STUFF_CLASSES + ("sky",))
