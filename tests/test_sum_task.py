"""SUM's task prompt (issue 18, item 4): the task table on a Sam, in every decoder, in export and runtimes.

A zero table must be the base model exactly; a trained row must change its own task only; the
table survives save/load and export, and a bundle without the ``task`` input still runs.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from typer.testing import CliRunner

from samantic.models import (TASKS, attach_task_prompt, create_model, load_checkpoint, read_state_dict,
                             resolve_checkpoint, save_checkpoint, task_index, task_name)
from samantic.models.tasks import TaskPrompt, add_task
from samantic.pipeline import AmgConfig, AutomaticMaskGenerator, Predictor
from samantic.pipeline.decoder import PromptMaskDecoder
from samantic.runtime import Bundle, Segmenter

from conftest import BLOCK_TORCH, disk_image

# box NMS given too: the generator's default is segment-anything's, a Segmenter's the model's own
KW = dict(points_per_side=8, pred_iou_thresh=0.5, stability_score_thresh=0.6, box_nms_thresh=0.7)
TABLE_KEY = "task_prompt.embed.weight"
PART = TASKS.index("part")


@pytest.fixture(scope="module")
def nano():
    return create_model("sam_nano")  # shipped weights, no task table


@pytest.fixture(scope="module")
def zero_nano(nano):
    model = copy.deepcopy(nano)
    attach_task_prompt(model)
    return model


@pytest.fixture(scope="module")
def part_nano(nano):
    """Only the "part" row trained (random): every other task must stay the base model."""
    model = copy.deepcopy(nano)
    torch.manual_seed(3)
    with torch.no_grad():
        attach_task_prompt(model).embed.weight[PART] = 0.5 * torch.randn(model.prompt_encoder.embed_dim)
    return model


@pytest.fixture(scope="module")
def sum_nano(nano):
    """Every row trained (random), as a fine-tuned SUM model would have it."""
    model = copy.deepcopy(nano)
    torch.manual_seed(4)
    with torch.no_grad():
        attach_task_prompt(model).embed.weight.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def base_masks(nano):
    """The base model's segment-everything masks of the test image."""
    masks = AutomaticMaskGenerator(nano, **KW).generate_masks(disk_image(101))
    assert len(masks) > 0, "the fixture image must give masks"
    return masks


@pytest.fixture(scope="module")
def sum_bundle(sum_nano, tmp_path_factory):
    from samantic.export.bundle import export_bundle

    return export_bundle(sum_nano, tmp_path_factory.mktemp("bundle") / "sum", int8=False)


@pytest.fixture(scope="module")
def old_bundle(nano, tmp_path_factory):
    """A bundle as exported before task prompts: a three-input prompts graph and no ``tasks`` in the manifest."""
    from samantic.export.bundle import export_bundle, write_manifest
    from samantic.export.onnx import export_graph

    root = export_bundle(nano, tmp_path_factory.mktemp("bundle") / "old", int8=False)
    export_graph(nano, "prompts", root / "prompts.onnx", task_input=False)
    manifest = dict(Bundle.load(root, verify=False).manifest)
    del manifest["tasks"]
    write_manifest(root, manifest)
    return root


def _rles(masks):
    return masks.rles.to_dicts(compressed=True)


def _same(a, b):
    """Bit-identical mask sets: RLEs, scores, boxes."""
    return (len(a) == len(b) and _rles(a) == _rles(b) and np.array_equal(a.iou_preds, b.iou_preds)
            and np.array_equal(a.stability_score, b.stability_score) and np.array_equal(a.boxes, b.boxes))


def _matched(ref, ours, thresh=0.99):
    """Fraction of reference masks with a partner at mask IoU >= thresh (COCO RLE dicts)."""
    if not ref:
        return 1.0 if not ours else 0.0
    if not ours:
        return 0.0
    def enc(rles):
        return [{**r, "counts": r["counts"].encode() if isinstance(r["counts"], str) else r["counts"]} for r in rles]

    iou = np.atleast_2d(mask_utils.iou(enc(ours), enc(ref), [0] * len(ref)))
    return float(np.mean(iou.max(0) >= thresh))


def _decode(model, task, seed=0):
    torch.manual_seed(seed)
    emb = torch.randn(1, model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size)
    coords = torch.rand(5, 1, 2) * model.image_encoder.img_size
    out = PromptMaskDecoder(model).run(emb, coords, torch.ones(5, 1, dtype=torch.int), task=task)
    return out, emb, coords


# --- names ---------------------------------------------------------------------------------------


def test_task_names_indices_and_errors():
    assert TASKS == ("unspecified", "salient", "entity", "part")
    assert [task_index(t) for t in TASKS] == [0, 1, 2, 3] and task_index(np.int64(2)) == 2
    assert task_name(3) == "part" and AmgConfig(task=1).task == "salient"
    for bad in ("parts", "Part", -1, 4, True, 1.0, None):
        with pytest.raises(ValueError, match="unspecified, salient, entity, part"):
            task_index(bad)
    with pytest.raises(ValueError, match="Did you mean 'part'"):
        AmgConfig(task="parts")
    with pytest.raises(ValueError, match="unknown task"):
        Predictor(create_model("sam_nano", pretrained=False), task="object")


def test_task_names_are_importable_without_torch(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    code = ("from samantic.models.tasks import TASKS, task_index; from samantic.pipeline import AmgConfig; "
            "import samantic.runtime; print(TASKS[task_index('part')], AmgConfig(task=2).task)")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["part", "entity"]


# --- the module ------------------------------------------------------------------------------------


def test_task_prompt_starts_at_zero_and_adds_per_prompt():
    table = TaskPrompt(8)
    assert table.embed.weight.shape == (len(TASKS), 8) and not table.embed.weight.any()
    dense = torch.randn(3, 8, 4, 4)
    assert torch.equal(add_task(dense, torch.tensor([0, 3, 1]), table), dense)
    with torch.no_grad():
        table.embed.weight.copy_(torch.arange(4.0)[:, None].expand(4, 8))
    out = add_task(dense, torch.tensor([0, 3, 1]), table)
    assert torch.equal(out, dense + torch.tensor([0.0, 3.0, 1.0])[:, None, None, None])
    assert torch.equal(add_task(dense, "part", table), dense + 3.0)  # one task for all prompts
    assert add_task(dense[:1], torch.tensor([1, 2]), table).shape == (2, 8, 4, 4)  # a shared dense embedding
    assert add_task(dense, "part", None) is dense  # no table: the base model
    with pytest.raises(ValueError, match="1 or B=3"):
        add_task(dense, torch.tensor([0, 1]), table)
    # training: gradients reach the rows that were used, only those
    add_task(dense, torch.tensor([2, 2, 3]), table).square().sum().backward()
    used = table.embed.weight.grad.abs().sum(1) > 0
    assert used.tolist() == [False, False, True, True]


def test_attach_keeps_the_model_and_the_official_layout():
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        vit_b = create_model("sam_vit_b")
        reference = list(sam_model_registry["vit_b"]().state_dict())
    assert list(vit_b.state_dict()) == reference  # no table unless asked for
    table = attach_task_prompt(vit_b)
    assert attach_task_prompt(vit_b) is table and table.embed.weight.is_meta
    assert list(vit_b.state_dict()) == reference + [TABLE_KEY]
    assert tuple(vit_b.state_dict()[TABLE_KEY].shape) == (4, 256)


# --- torch: the base model and the trained row ------------------------------------------------------


def test_zero_table_is_the_base_model(nano, zero_nano, base_masks):
    base, _, _ = _decode(nano, 0)
    for task in TASKS:  # bit for bit, with a zero table and without a table
        for model in (zero_nano, nano):
            out, _, _ = _decode(model, task)
            assert torch.equal(out.iou_preds, base.iou_preds) and torch.equal(out.mask_tokens, base.mask_tokens)
            assert torch.equal(out.src, base.src)
    image = disk_image(101)
    assert _same(AutomaticMaskGenerator(zero_nano, task="part", **KW).generate_masks(image), base_masks)
    assert _same(AutomaticMaskGenerator(nano, task="entity", **KW).generate_masks(image), base_masks)


def test_zero_table_matches_segment_anythings_generator(zero_nano):
    image = disk_image(102, (199, 301))
    ref = SamAutomaticMaskGenerator(zero_nano, output_mode="coco_rle", **KW).generate(image)
    ours = AutomaticMaskGenerator(zero_nano, output_mode="coco_rle", task="part", **KW).generate(image)
    assert ref and abs(len(ours) - len(ref)) <= max(1, round(0.01 * len(ref)))
    assert _matched([r["segmentation"] for r in ref], [o["segmentation"] for o in ours]) >= 0.99
    assert np.allclose(sorted(r["predicted_iou"] for r in ref), sorted(o["predicted_iou"] for o in ours), atol=1e-3)


def test_zero_table_predictor_is_segment_anythings_predictor(zero_nano):
    image = disk_image(101)
    points, labels = np.array([[100.0, 120.0], [40.0, 60.0]]), np.array([1, 0])
    ref = SamPredictor(zero_nano)
    ref.set_image(image)
    expected = ref.predict(point_coords=points, point_labels=labels, return_logits=True)
    ours = Predictor(zero_nano)
    ours.set_image(image)
    for task in TASKS:
        got = ours.predict(point_coords=points, point_labels=labels, return_logits=True, task=task)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), task


def test_trained_row_changes_its_task_only(nano, part_nano, base_masks):
    base, _, _ = _decode(nano, 0)
    for k, task in enumerate(TASKS):
        out, _, _ = _decode(part_nano, task)
        same = torch.equal(out.iou_preds, base.iou_preds) and torch.equal(out.mask_tokens, base.mask_tokens)
        assert same == (k != PART), task
    part, _, _ = _decode(part_nano, "part")
    assert (part.iou_preds - base.iou_preds).abs().max() > 1e-2
    # through the generator (a task per call), the Segmenter (its own task, or the call's) and the predictor
    image = disk_image(101)
    part_masks = AutomaticMaskGenerator(part_nano, **KW).generate_masks(image, task="part")
    assert not _same(part_masks, base_masks)
    seg = Segmenter(part_nano, task="part", **KW)
    assert seg.config.task == "part" and _same(seg(image).masks, part_masks)
    assert _same(seg(image, task="unspecified").masks, base_masks)
    predictor = Predictor(part_nano, task="part")
    predictor.set_image(image)
    point = dict(point_coords=np.array([[100.0, 120.0]]), point_labels=np.array([1]))
    _, iou_part, _ = predictor.predict(**point)
    _, iou_base, _ = predictor.predict(**point, task="unspecified")
    assert predictor.task == "part" and not np.allclose(iou_part, iou_base)


def test_predictor_takes_one_task_per_prompt(sum_nano):
    predictor = Predictor(sum_nano)
    predictor.set_image(disk_image(101))
    coords = torch.tensor([[[100.0, 120.0]], [[30.0, 50.0]], [[200.0, 90.0]]])
    coords = torch.as_tensor(predictor.transform.apply_coords_torch(coords, predictor.original_size))
    labels = torch.ones(3, 1, dtype=torch.int)
    tasks = torch.tensor([3, 0, 1])
    _, iou, low = predictor.predict_torch(coords, labels, task=tasks)
    for i, t in enumerate(tasks.tolist()):
        _, iou_i, low_i = predictor.predict_torch(coords[i : i + 1], labels[i : i + 1], task=t)
        assert torch.allclose(iou[i], iou_i[0], atol=1e-5) and torch.allclose(low[i], low_i[0], atol=1e-4)


# --- checkpoints ----------------------------------------------------------------------------------


def test_table_round_trips_through_a_checkpoint(nano, sum_nano, tmp_path):
    path = save_checkpoint(sum_nano, tmp_path / "sum.safetensors")
    state = read_state_dict(path)
    assert torch.equal(state[TABLE_KEY], sum_nano.task_prompt.embed.weight)
    again = create_model("sam_nano", path)
    assert torch.equal(again.task_prompt.embed.weight, sum_nano.task_prompt.embed.weight)
    for task in TASKS:
        a, _, _ = _decode(again, task)
        b, _, _ = _decode(sum_nano, task)
        assert torch.equal(a.iou_preds, b.iou_preds) and torch.equal(a.mask_tokens, b.mask_tokens)
    # a model with a table loads weights without one (the shipped file): the table goes back to zeros
    load_checkpoint(again, "pkg:assets/sam_nano.safetensors")
    assert not again.task_prompt.embed.weight.any()
    # the shipped weights load as before: no table in the file, none on the model
    assert TABLE_KEY not in read_state_dict(resolve_checkpoint("pkg:assets/sam_nano.safetensors"))
    assert not hasattr(nano, "task_prompt") and TABLE_KEY not in nano.state_dict()


def test_a_failed_load_attaches_no_table(sum_nano, tmp_path):
    path = save_checkpoint(sum_nano, tmp_path / "sum.safetensors", metadata={"model": "sam_nano_conv"})
    other = create_model("sam_nano_conv", pretrained=False)  # another encoder: the file does not fit
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(other, path)
    assert not hasattr(other, "task_prompt")


def test_official_architecture_checkpoint_loads_without_a_table(tmp_path):
    """segment-anything's ViT modules (sam_nano_vit), saved as an official .pth: no table in the file."""
    torch.manual_seed(0)
    vit = create_model("sam_nano_vit", pretrained=False)
    path = tmp_path / "official_layout.pth"
    torch.save(vit.state_dict(), path)
    plain = create_model("sam_nano_vit", path)
    assert not hasattr(plain, "task_prompt") and list(plain.state_dict()) == list(vit.state_dict())
    with torch.device("meta"):  # a table on the meta device is materialised as zeros
        lazy = create_model("sam_nano_vit", pretrained=False)
        attach_task_prompt(lazy)
    load_checkpoint(lazy, path)
    weight = lazy.task_prompt.embed.weight
    assert not weight.is_meta and not weight.any()
    assert not any(t.is_meta for t in lazy.state_dict().values())


# --- export and runtimes --------------------------------------------------------------------------


def test_prompts_graph_takes_an_int32_task_and_the_manifest_names_the_tasks(sum_bundle):
    import onnx

    from samantic.export.tensorrt import check_trt
    from samantic.runtime.bundle import graph_input_shapes

    bundle = Bundle.load(sum_bundle)
    assert bundle.manifest["tasks"] == list(TASKS) and bundle.tasks == TASKS
    graph = onnx.load(str(bundle.graph("prompts")))
    (task,) = [i for i in graph.graph.input if i.name == "task"]
    assert task.type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert [d.dim_value for d in task.type.tensor_type.shape.dim] == [1]
    assert graph_input_shapes(bundle.manifest, "prompts", "max")["task"] == (1,)
    findings = check_trt(bundle)
    assert not [f for f in findings if f.severity == "error"], [str(f) for f in findings]
    notes = {(f.graph, f.kind): f.message for f in findings}
    assert "no graph input is a shape tensor" in notes[("prompts", "shape-tensor")]


def test_bundle_engines_feed_the_task_their_graph_takes(sum_bundle, old_bundle):
    """What the onnxruntime and TensorRT engines share (BundleEngine): the task input, or none."""
    from samantic.runtime.bundle import BundleEngine, BundleError

    engine = BundleEngine(Bundle.load(sum_bundle))
    engine.name = "tensorrt"
    engine._set_tasks(["image_embeddings", "point_coords", "point_labels", "task"])
    assert engine.tasks == TASKS
    feed = engine.task_feed(PART)
    assert feed.dtype == np.int32 and feed.tolist() == [PART]
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        engine.task_feed(4)
    old = BundleEngine(Bundle.load(old_bundle))
    old.name = "tensorrt"
    old._set_tasks(["image_embeddings", "point_coords", "point_labels"])
    assert old.tasks == () and old.task_feed(0) is None
    with pytest.raises(ValueError, match="task 'part' needs a task prompt, which the tensorrt engine"):
        old.task_feed(PART)
    with pytest.raises(BundleError, match="names no tasks"):  # a task input, but no names in the manifest
        old._set_tasks(["image_embeddings", "point_coords", "point_labels", "task"])


def test_onnxruntime_with_task_k_equals_torch_with_task_k(sum_nano, sum_bundle):
    from samantic.runtime.onnxruntime import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(Bundle.load(sum_bundle), device="cpu")
    assert engine.tasks == TASKS
    outs = []
    for k in range(len(TASKS)):
        ref, emb, coords = _decode(sum_nano, k, seed=k)
        engine.embedding = emb.numpy()
        out = engine.run_prompts(coords[:, 0].numpy(), task=k)
        assert np.abs(out.iou_preds - ref.iou_preds.numpy()).max() < 1e-4
        assert np.abs(out.mask_tokens[:] - ref.mask_tokens.numpy()).max() < 1e-4
        outs.append(out.iou_preds)
    # and the rows really differ in the graph: the same prompts, another task, other outputs
    ref, emb, coords = _decode(sum_nano, 0, seed=9)
    engine.embedding = emb.numpy()
    per_task = [engine.run_prompts(coords[:, 0].numpy(), task=k).iou_preds for k in range(len(TASKS))]
    assert all(np.abs(per_task[0] - p).max() > 1e-3 for p in per_task[1:])


@pytest.mark.parametrize("task", ["unspecified", "part"])
def test_onnxruntime_segmenter_matches_torch_per_task(sum_nano, sum_bundle, task):
    image = disk_image(101)
    ref = Segmenter(sum_nano, task=task, **KW)(image)
    ours = Segmenter.from_bundle(sum_bundle, backend="onnxruntime", device="cpu", **KW)(image, task=task)
    assert len(ref) > 0 and abs(len(ours) - len(ref)) <= max(1, round(0.01 * len(ref)))
    assert _matched(_rles(ref.masks), _rles(ours.masks)) >= 0.99


def test_old_bundle_without_task_input_still_runs(nano, old_bundle):
    import onnx

    from samantic.export.tensorrt import check_trt
    from samantic.runtime.bundle import graph_input_shapes

    bundle = Bundle.load(old_bundle)
    assert bundle.tasks == () and "tasks" not in bundle.manifest
    assert "task" not in {i.name for i in onnx.load(str(bundle.graph("prompts"))).graph.input}
    assert "task" not in graph_input_shapes(bundle.manifest, "prompts", "opt")
    assert not [f for f in check_trt(bundle) if f.severity == "error"]
    image = disk_image(101)
    seg = Segmenter.from_bundle(old_bundle, backend="onnxruntime", device="cpu", **KW)
    assert seg.engine.tasks == ()
    ref = Segmenter(nano, **KW)(image)
    for task in (None, "unspecified", 0):
        assert _matched(_rles(ref.masks), _rles(seg(image, task=task).masks)) >= 0.99
    with pytest.raises(ValueError, match="task 'part' needs a task prompt.*re-export"):
        seg(image, task="part")
    with pytest.raises(ValueError, match="task 'salient' needs a task prompt"):
        Segmenter.from_bundle(old_bundle, backend="onnxruntime", device="cpu", task="salient", **KW)
    with pytest.raises(ValueError, match="unknown task"):
        seg(image, task="parts")


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_task_flag_is_recorded_and_checked(tmp_path, old_bundle):
    from samantic.cli.main import app
    from samantic.cli.segment import Task

    assert tuple(t.value for t in Task) == TASKS
    runner = CliRunner()
    Image.fromarray(disk_image(101)).save(tmp_path / "disk.png")
    fast = ["--points-per-side", "4", "--no-progress"]
    r = runner.invoke(app, ["segment", str(tmp_path / "disk.png"), "--out", str(tmp_path / "out"), "--task", "part",
                            *fast])
    assert r.exit_code == 0, r.output
    assert "task part" in r.stdout and "has no trained task embeddings" in r.stderr
    assert json.loads((tmp_path / "out" / "disk.png.json").read_text())["settings"]["task"] == "part"
    r = runner.invoke(app, ["segment", str(tmp_path / "disk.png"), "--out", str(tmp_path / "bad"), "--task", "parts"])
    assert r.exit_code == 2 and "'parts' is not one of" in r.output and "'part'" in r.output
    r = runner.invoke(app, ["segment", str(tmp_path / "disk.png"), "--out", str(tmp_path / "old"), "--bundle",
                            str(old_bundle), "--backend", "onnxruntime", "--task", "entity", *fast])
    assert r.exit_code == 1 and "error: task 'entity' needs a task prompt" in r.stderr


def test_torch_free_cli_runs_a_task_on_a_bundle(sum_nano, sum_bundle, tmp_path):
    """`samantic segment --bundle ... --task part` where torch cannot be imported: torch's masks for that task."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_TORCH)
    image = disk_image(102, (199, 301))
    Image.fromarray(image).save(tmp_path / "disk.png")
    exe = str(Path(sys.executable).with_name("samantic"))
    flags = ["--points-per-side", "8", "--pred-iou-thresh", "0.5", "--stability-score-thresh", "0.6", "--box-nms-thresh",
             str(KW["box_nms_thresh"]), "--no-progress"]
    proc = subprocess.run([exe, "segment", str(tmp_path / "disk.png"), "--bundle", str(sum_bundle), "--backend",
                           "onnxruntime", "--task", "part", "--out", str(tmp_path / "out"), *flags],
                          env=dict(os.environ, PYTHONPATH=str(blocker)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "out" / "disk.png.json").read_text())
    assert result["settings"]["task"] == "part" and result["backend"] == "onnxruntime"
    ours = [a["segmentation"] for a in result["annotations"]]
    ref = _rles(Segmenter(sum_nano, task="part", **KW)(image).masks)
    base = _rles(Segmenter(sum_nano, **KW)(image).masks)
    assert ref and abs(len(ours) - len(ref)) <= max(1, round(0.01 * len(ref)))
    assert _matched(ref, ours) >= 0.99
    assert _matched(base, ours) < 1.0 or len(base) != len(ours)  # the task really changed the masks
