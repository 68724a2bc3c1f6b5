"""U-SAM: class-name checks, example sources, the feature cache, MIL training, the head file and scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samantic.heads.usam import HeadInfo, HeadScorer, UsamHead, check_class_names, load_head, parse_groups
from samantic.train.sources import DiffusersSource, FolderSource, ShapesSource, open_source
from samantic.train.usam import (Bags, BagFeatures, FeatureCache, FeatureExtractor, UsamTrainConfig, bag_losses,
                                 expand_groups, train_head)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("bad, msg", [("", "empty"), (" , ", "empty"), ("circle,,star", "empty name"),
                                      ("circle,star,circle", "circle more than once"), ([], "empty")])
def test_bad_class_lists_are_rejected(bad, msg):
    with pytest.raises(ValueError, match=msg):
        check_class_names(bad)


def test_class_list_parsing():
    assert check_class_names(" circle, star ") == ("circle", "star")
    assert parse_groups(["round=circle,ring"]) == {"round": ("circle", "ring")}
    with pytest.raises(ValueError, match="NAME=class1"):
        parse_groups(["round"])
    with pytest.raises(ValueError, match="given twice"):
        parse_groups(["a=circle", "a=ring"])
    assert expand_groups(["round", "star"], {"round": ("circle", "ring")}) == [
        ("round", "circle"), ("round", "ring"), ("star", "star")]


# ---------------------------------------------------------------- sources


def test_shapes_source_is_deterministic_and_rejects_unknown_classes():
    src = ShapesSource()
    a = list(src.examples(["circle", "star"], 2, seed=5))
    b = list(src.examples(["circle", "star"], 2, seed=5))
    assert [e.label for e in a] == ["circle", "circle", "star", "star"]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert a[0].key == "shapes:circle:5"
    with pytest.raises(ValueError, match="triangle"):  # the message lists the known classes
        src.check(["dog"])


def test_folder_source_reads_classes_and_skips_bad_files(tmp_path):
    import cv2

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            cv2.imwrite(str(tmp_path / c / f"{i}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
    (tmp_path / "dog" / "0_broken.jpg").write_bytes(b"not an image")
    src = open_source("folder", str(tmp_path))
    got = list(src.examples(["cat", "dog"], 5))
    assert [e.label for e in got] == ["cat", "cat", "dog", "dog"]
    assert got[0].image.shape == (20, 30, 3)
    assert len(src.failures()) == 1 and "0_broken.jpg" in src.failures()[0][0]
    with pytest.raises(ValueError, match=r"no folder for 'bird' \(class folders present: cat, dog\)"):
        src.check(["bird"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .* 'empty'"):
        src.check(["empty"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderSource(tmp_path / "nope")
    with pytest.raises(ValueError, match="needs --images"):
        open_source("folder")
    with pytest.raises(ValueError, match="unknown source"):
        open_source("web")


def test_diffusers_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DiffusersSource(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        DiffusersSource(tmp_path, templates=["a photo"])


def test_diffusers_source_plumbing_with_a_stand_in_pipeline():
    class FakePipe:
        def __init__(self):
            self.prompts = []

        def __call__(self, prompt, num_inference_steps, guidance_scale, height, width, generator, output_type):
            self.prompts.append(prompt)
            v = torch.rand((), generator=generator).item()

            class Out:
                images = [np.full((height, width, 3), v, np.float32)]
            return Out()

    pipe = FakePipe()
    src = DiffusersSource(pipeline=pipe, size=32, templates=["a photo of a {}", "a {} drawing"])
    got = list(src.examples(["red_circle"], 2, seed=3))
    assert pipe.prompts == ["a photo of a red circle", "a red circle drawing"]
    assert got[0].image.dtype == np.uint8 and got[0].image.shape == (32, 32, 3)
    assert got[0].key == "diffusers:red_circle:3"


# ---------------------------------------------------------------- MIL on synthetic bags


def synthetic_bags(n_per_class=40, n_classes=3, dim=32, seed=0):
    """Bags with one object instance (a class prototype + noise) among shared background instances."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(n_classes, dim)) * 2
    backgrounds = rng.normal(size=(6, dim)) * 2  # recur in bags of every class
    feats, labels = [], []
    for c in range(n_classes):
        for _ in range(n_per_class):
            obj = protos[c] + rng.normal(size=dim) * 0.5
            bg = backgrounds[rng.choice(6, 4)] + rng.normal(size=(4, dim)) * 0.5
            tokens = np.concatenate([obj[None], bg]).astype(np.float16)
            feats.append(BagFeatures(tokens, np.ones(len(tokens), np.float32)))
            labels.append(c)
    return Bags.build(feats, labels, [str(i) for i in range(len(labels))], 0.5), protos, backgrounds


def instance_accuracy(head, protos, backgrounds, seed=1):
    rng = np.random.default_rng(seed)
    objs = protos[:, None] + rng.normal(size=(len(protos), 50, protos.shape[1])) * 0.5
    bgs = backgrounds[rng.choice(len(backgrounds), 100)] + rng.normal(size=(100, protos.shape[1])) * 0.5
    with torch.no_grad():
        obj_pred = head(torch.tensor(objs.reshape(-1, protos.shape[1]), dtype=torch.float32)).argmax(1).numpy()
        bg_pred = head(torch.tensor(bgs, dtype=torch.float32)).argmax(1).numpy()
    obj_acc = float((obj_pred == np.repeat(np.arange(len(protos)), 50)).mean())
    bg_none = float((bg_pred == len(protos)).mean())
    return obj_acc, bg_none


@pytest.mark.parametrize("method", ["mil", "mil_ud"])
def test_mil_learns_objects_and_background_from_image_labels(method):
    bags, protos, backgrounds = synthetic_bags()
    info = HeadInfo(classes=("a", "b", "c"), token_dim=32)
    cfg = UsamTrainConfig(method=method, epochs=30, hidden_dim=64, lr=3e-3)
    result = train_head(bags, info, cfg, progress=False)
    obj_acc, bg_none = instance_accuracy(result.head, protos, backgrounds)
    assert obj_acc > 0.95, obj_acc  # chance: 1/3
    assert bg_none > 0.9, bg_none  # background masks learned as "none" without any mask-level label
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    if method == "mil_ud":
        assert "ud" in result.history[-1] and "ud" not in result.history[0]


def test_naive_labels_teach_background_to_be_objects():
    bags, protos, backgrounds = synthetic_bags()
    info = HeadInfo(classes=("a", "b", "c"), token_dim=32)
    result = train_head(bags, info, UsamTrainConfig(method="naive", epochs=30, hidden_dim=64, lr=3e-3), progress=False)
    obj_acc, bg_none = instance_accuracy(result.head, protos, backgrounds)
    assert obj_acc > 0.9
    assert bg_none == 0.0  # the naive head never says "none": the reason MIL exists


def test_bag_losses_shapes_and_values():
    logits = torch.tensor([[5.0, -5.0, -5.0], [-5.0, -5.0, 5.0], [-5.0, 5.0, -5.0]])  # classes a, b + none
    bag = torch.tensor([0, 0, 1])
    labels = torch.tensor([0, 1])
    terms = bag_losses(logits, bag, labels, "mil", lse_r=5.0)
    assert terms["mil_excl"] < 0.01  # every instance is its bag's label or none
    wrong = bag_losses(logits, bag, torch.tensor([1, 0]), "mil", lse_r=5.0)
    assert wrong["mil_excl"] > 3 and wrong["mil_pos"] > terms["mil_pos"]
    with pytest.raises(ValueError, match="method"):
        UsamTrainConfig(method="max")


# ---------------------------------------------------------------- head file and scorer


def test_head_round_trip_and_scorer(tmp_path):
    info = HeadInfo(classes=("circle", "ring", "star"), groups={"round": ("circle", "ring")}, token_dim=16, hidden_dim=8,
                    model="sam_nano")
    head = UsamHead(info)
    path = head.save(tmp_path / "h.safetensors")
    loaded = load_head(path)
    assert loaded.info.classes == info.classes and loaded.info.groups == info.groups
    x = torch.randn(5, 16)
    assert torch.allclose(loaded(x), head(x))
    scorer = HeadScorer(loaded, ["round", "star"], score_thresh=0.0)
    verdict = scorer(x, torch.ones(5))
    assert set(verdict.fields) == {"category_id", "class_score"}
    assert set(np.unique(verdict.fields["category_id"])) <= {1, 2}
    with pytest.raises(ValueError, match="knows: circle, ring, star, round"):
        HeadScorer(loaded, ["dog"])
    with pytest.raises(ValueError, match="more than once"):
        HeadScorer(loaded, ["star", "star"])


def test_load_head_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such head file"):
        load_head(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="bad.safetensors: not a readable"):
        load_head(bad)
    from samantic.models import save_checkpoint

    other = save_checkpoint({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a samantic U-SAM head"):
        load_head(other)


# ---------------------------------------------------------------- features on a real (briefly trained) SAM


def test_feature_cache_computes_once_and_recovers_from_damage(structured_nano, tmp_path):
    from conftest import disk_image

    extractor = FeatureExtractor(structured_nano, points_per_side=4)
    cache = FeatureCache(tmp_path, extractor)
    image = disk_image(0)
    first = cache.get(image)
    assert first.tokens.shape == (4 * 4 * 3, structured_nano.prompt_encoder.embed_dim)
    assert first.iou.shape == (48,)
    again = cache.get(image)
    assert (cache.misses, cache.hits) == (1, 1)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    entry = next(cache.dir.glob("*.npz"))
    entry.write_bytes(b"garbage")
    third = cache.get(image)
    assert cache.misses == 2
    np.testing.assert_array_equal(first.tokens, third.tokens)
    # the tokens are the decoder's: same numbers as the pipeline's decoder on the same prompts
    assert np.isfinite(first.tokens.astype(np.float32)).all()


def test_train_usam_cli_end_to_end(structured_nano, tmp_path):
    from typer.testing import CliRunner

    from samantic.cli.main import app
    from samantic.models import save_checkpoint

    ckpt = save_checkpoint(structured_nano, tmp_path / "nano.safetensors")
    out = tmp_path / "head.safetensors"
    args = ["train", "usam", "--classes", "round,star", "--group", "round=circle,ring", "--source", "shapes",
            "--checkpoint", str(ckpt), "--per-class", "2", "--epochs", "2", "--points-per-side", "4",
            "--cache", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    head = load_head(out)
    assert head.info.classes == ("round", "star") and head.info.groups == {"round": ("circle", "ring")}
    assert head.info.model == "sam_nano" and head.info.token_dim == structured_nano.prompt_encoder.embed_dim
    assert len((tmp_path / "head.safetensors.log.jsonl").read_text().splitlines()) == 2
    assert json.loads(head.info.extra["training"])["method"] == "mil_ud"
    # a fine head with an inference-time superclass
    fine = tmp_path / "fine.safetensors"
    res = CliRunner().invoke(app, [*args[:2], "--classes", "circle,ring,star", "--group", "round=circle,ring",
                                   *args[6:-3], "--out", str(fine), "--no-progress"])
    assert res.exit_code == 0, res.output
    fine_head = load_head(fine)
    assert fine_head.info.classes == ("circle", "ring", "star") and fine_head.info.groups == {"round": ("circle", "ring")}
    assert HeadScorer(fine_head, ["round", "star"]).names == ("round", "star")
    # errors: unknown class, duplicate, group not in classes
    for bad, msg in [(["--classes", "dog"], "triangle"), (["--classes", "star,star"], "more than once"),
                     (["--classes", "star", "--group", "round=circle"], "circle not in --classes")]:
        res = CliRunner().invoke(app, ["train", "usam", *bad, "--checkpoint", str(ckpt), "--out", str(out)])
        assert res.exit_code == 1 and msg in res.output, res.output


# ---------------------------------------------------------------- evaluation (against an oracle and a wrong segmenter)


_SCENES = {}


def _scenes():
    from samantic.train.data.shapes import render_scene

    if not _SCENES:
        for s in range(3, 9):
            sc = render_scene(s)
            _SCENES[sc.image.tobytes()] = sc
    return _SCENES


class SceneOracle:
    """A stand-in segmenter answering with a scene's ground truth (optionally relabelled or dropped)."""

    def __init__(self, names, level="class", relabel=None, drop=False):
        self.names = tuple(names)
        self.level = level
        self.relabel = relabel or {}
        self.drop = drop

    def __call__(self, image):
        from samantic.ops import rle_encode
        from samantic.pipeline.generator import MaskSet
        from samantic.pipeline.amg import masks_to_boxes
        from samantic.runtime import Result
        from samantic.train.metrics import _gt_level

        scene = _scenes()[image.tobytes()]
        _, inst_names = _gt_level(scene, self.level)
        keep = [i for i, n in enumerate(inst_names) if self.relabel.get(n, n) in self.names and not self.drop]
        masks = scene.masks[keep] if keep else np.zeros((0,) + image.shape[:2], bool)
        n = len(keep)
        ms = MaskSet(rle_encode(masks), masks_to_boxes(masks), np.ones(n, np.float32), np.zeros((n, 2)),
                     np.ones(n, np.float32), np.zeros((n, 4), np.int64),
                     {"category_id": np.array([self.names.index(self.relabel.get(inst_names[i], inst_names[i])) + 1
                                               for i in keep], np.int64),
                      "class_score": np.ones(n, np.float32)})
        return Result(ms, [], self.names, image)


def test_usam_metrics_perfect_wrong_and_empty():
    from samantic.train.metrics import evaluate_usam

    names = ("circle", "square", "star")
    perfect = evaluate_usam(SceneOracle(names), range(3, 9), progress=False)
    assert perfect.n_instances > 0
    assert perfect.miou > 0.99 and perfect.map50 > 0.99, perfect.to_dict()
    swapped = evaluate_usam(SceneOracle(names, relabel={"circle": "square", "square": "circle"}), range(3, 9),
                            progress=False)
    assert swapped.iou["star"] > 0.99 and swapped.iou["circle"] < 0.01 and swapped.ap50["circle"] < 0.01
    empty = evaluate_usam(SceneOracle(names, drop=True), range(3, 9), progress=False)
    assert empty.miou == 0.0 and empty.map50 == 0.0
    sup = evaluate_usam(SceneOracle(("round", "angular"), level="superclass"), range(3, 9), "superclass", progress=False)
    assert sup.miou > 0.99
    with pytest.raises(ValueError, match="training seed"):
        evaluate_usam(SceneOracle(names), [2_000_000], progress=False)
    with pytest.raises(ValueError, match="shapes-world class names"):
        evaluate_usam(SceneOracle(("dog",)), range(1), progress=False)


# ---------------------------------------------------------------- segment --classes


def test_segment_by_class_names_cli(structured_nano, tmp_path):
    import cv2
    from PIL import Image
    from pycocotools import mask as mask_utils
    from typer.testing import CliRunner

    from conftest import disk_image
    from samantic.cli.main import app
    from samantic.models import save_checkpoint

    ckpt = save_checkpoint(structured_nano, tmp_path / "nano.safetensors")
    torch.manual_seed(0)
    head = UsamHead(HeadInfo(classes=("circle", "star", "ring"), token_dim=128, model="sam_nano"))
    with torch.no_grad():  # an untrained head that calls everything a circle, so masks survive
        head.mlp[-1].bias.copy_(torch.tensor([8.0, 0.0, 0.0, -8.0]))
    head_path = head.save(tmp_path / "head.safetensors")
    images = tmp_path / "in"
    images.mkdir()
    for i in range(2):
        cv2.imwrite(str(images / f"{i}.png"), disk_image(i)[:, :, ::-1])
    (images / "broken.png").write_bytes(b"")
    out = tmp_path / "out"
    base = ["segment", str(images), "--out", str(out), "--checkpoint", str(ckpt), "--points-per-side", "8",
            "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--no-progress"]
    res = CliRunner().invoke(app, base + ["--head", str(head_path), "--classes", "circle,star", "--score-thresh", "0"])
    assert res.exit_code == 1, res.output  # the broken file fails, the others are done
    assert "broken.png" in res.output and "empty" in res.output
    data = json.loads((out / "0.png.json").read_text())
    assert data["categories"] == [{"id": 1, "name": "circle"}, {"id": 2, "name": "star"}]
    anns = data["annotations"]
    assert anns, "the head calls every mask a circle"
    assert {a["category_id"] for a in anns} == {1}
    assert all(a["category"] in ("circle", "star") and 0 <= a["score"] <= 1 for a in anns)
    assert mask_utils.decode(anns[0]["segmentation"]).shape == disk_image(0).shape[:2]
    sem = Image.open(out / "0.png.semantic.png")
    assert sem.mode == "P" and sem.getpalette()[3:6] == [128, 0, 0]  # VOC: label 1 is dark red
    labels = np.asarray(sem)
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels > 0).any()
    assert (out / "0.png.overlay.png").exists()
    # errors
    for extra, msg in [(["--classes", "circle"], "--classes needs --head"),
                       (["--head", str(head_path), "--classes", "dog"], "knows: circle, star, ring"),
                       (["--head", str(head_path), "--classes", "star,star"], "more than once")]:
        res = CliRunner().invoke(app, base + ["--overwrite", *extra])
        assert res.exit_code == 1 and msg in res.output, res.output
    wrong = UsamHead(HeadInfo(classes=("a",), token_dim=256, model="sam_vit_b")).save(tmp_path / "vitb_head.safetensors")
    res = CliRunner().invoke(app, base + ["--overwrite", "--head", str(wrong)])
    assert res.exit_code == 1 and "trained on sam_vit_b" in res.output, res.output


def test_voc_palette_and_label_png(tmp_path):
    from PIL import Image

    from samantic.io.writers import voc_palette, write_label_png

    pal = voc_palette(4)
    assert pal.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    lm = np.array([[0, 1], [2, 3]], np.uint8)
    write_label_png(tmp_path / "a.png", lm)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), lm)
    big = np.array([[0, 300]], np.uint16)
    write_label_png(tmp_path / "b.png", big)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), big)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        write_label_png(tmp_path / "c.png", np.zeros((2, 2, 3)))


def test_eval_usam_cli_runs_segment_everything_at_the_models_own_thresholds(tmp_path):
    """`eval usam` measures at what `segment` would use: the shipped model's recommended pair and box NMS unless
    flags say otherwise; the command it records says all three."""
    import json

    from typer.testing import CliRunner

    from samantic.cli.main import app
    from samantic.models import get_model_entry

    head = UsamHead(HeadInfo(classes=("circle", "star"), token_dim=128, model="sam_nano"))
    head_path = head.save(tmp_path / "head.safetensors")
    own = get_model_entry("sam_nano").thresholds
    base = ["eval", "usam", "--head", str(head_path), "--seeds", "0:1", "--points-per-side", "4", "--no-progress"]
    for flags, want in (([], own), (["--box-nms-thresh", "0.6"], dict(own, box_nms_thresh=0.6))):
        res = CliRunner().invoke(app, [*base, *flags, "--out", str(tmp_path / "e")])
        assert res.exit_code == 0, res.output
        command = json.loads((tmp_path / "e" / "eval_usam.json").read_text())["command"]
        assert all(f"--{k.replace('_', '-')} {v}" in command for k, v in want.items()), command
