"""``samantic eval``: held-out evaluation of SAM models (and, later, the semantic heads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Dict, List, Optional, Sequence, Tuple

import typer

app = typer.Typer(no_args_is_help=True, help="Evaluate models on held-out shapes-world scenes.")

Threads = Annotated[int, typer.Option(min=0, help="torch CPU threads (0: torch's default, all cores).")]


def _use_threads(threads: int) -> None:
    """Caps torch's CPU threads (0 leaves torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.callback()
def _group() -> None:
    """Evaluation commands."""


def parse_seeds(spec: str) -> range:
    """``A:B`` -> seeds A..B-1."""
    try:
        a, b = (int(v) for v in spec.split(":"))
    except ValueError:
        raise typer.BadParameter(f"seeds must look like START:STOP, got {spec!r}") from None
    if not 0 <= a < b:
        raise typer.BadParameter(f"seeds must satisfy 0 <= START < STOP, got {spec!r}")
    return range(a, b)


def input_size_override(model: str, side: Optional[int]) -> Dict[str, int]:
    """``create_model`` overrides that run ``model`` at input side ``side`` (``{}`` for None).

    Raises:
        ValueError: ``model``'s encoder is not convolutional (a ViT's position embeddings fix its side), or ``side``
        is not a positive multiple of 32.
    """
    from samantic.models import get_config

    if side is None:
        return {}
    config = get_config(model)
    if config.encoder_type != "conv":
        raise ValueError(f"{model}'s {config.encoder_type} encoder is built for {config.img_size} px inputs; another "
                         "input side needs a convolutional encoder")
    if side < 32 or side % 32:
        raise ValueError(f"the input side must be a positive multiple of 32, got {side}")
    return {"img_size": side}


def load_column(spec: str, model: str = "sam_nano") -> Tuple[str, str, Any]:
    """``NAME=WEIGHTS[@SIDE]`` (a registered model, or a file of ``model``'s) -> ``(name, weights, Sam)``.

    ``@SIDE`` runs the model at another input side (pixels, the longest image side after resizing) than its
    config's: a convolutional encoder's weights fit any side (a multiple of 32); a ViT's do not. ``weights`` is
    returned with the suffix, as given. A file whose own name ends in ``@digits`` is taken as a file. A file
    without ``@SIDE`` runs at the side its header records (``create_model``: weights fine-tuned with ``samantic
    train sum --input-size``).

    Raises:
        ValueError: not NAME=WEIGHTS[@SIDE], a SIDE the model cannot take. FileNotFoundError: WEIGHTS is neither a
        model nor a file.
    """
    from samantic.models import create_model, list_models

    name, sep, weights = spec.partition("=")
    name, weights = name.strip(), weights.strip()
    if not sep or not name or not weights:
        raise ValueError(f"--column must be NAME=WEIGHTS[@SIDE], got {spec!r}")
    source, at, side = weights.rpartition("@")
    overrides = {}
    if at and side.isdigit() and not Path(weights).is_file():
        try:
            overrides = input_size_override(source if source in list_models() else model, int(side))
        except ValueError as e:
            raise ValueError(f"--column {spec}: {e}") from None
    else:
        source = weights
    if source in list_models():
        return name, weights, create_model(source, **overrides)
    if Path(source).is_file():
        return name, weights, create_model(model, checkpoint=source, **overrides)
    raise FileNotFoundError(f"--column {spec}: {source!r} is neither a registered model nor a file")


def _thresholds(sam, pred_iou_thresh: Optional[float], stability_score_thresh: Optional[float],
                box_nms_thresh: Optional[float] = None) -> dict:
    """The model's recommended segment-everything thresholds (as `samantic segment` uses them), with the user's on top."""
    from samantic.models import recommended_thresholds

    amg = recommended_thresholds(sam)
    if pred_iou_thresh is not None:
        amg["pred_iou_thresh"] = pred_iou_thresh
    if stability_score_thresh is not None:
        amg["stability_score_thresh"] = stability_score_thresh
    if box_nms_thresh is not None:
        amg["box_nms_thresh"] = box_nms_thresh
    return amg


@app.command("sam", help="Point-prompt mIoU of a SAM on held-out scenes (1 point: top-scored and best of its masks; 3 corrective points) and its segment-everything recall.")
def eval_sam(
    model: Annotated[str, typer.Option(help="Registered model.")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="Weights to evaluate (default: the model's shipped weights).")] = None,
    seeds: Annotated[str, typer.Option(help="Held-out scene seeds for point prompts, START:STOP.")] = "0:100",
    amg_seeds: Annotated[str, typer.Option(help="Held-out scene seeds for segment-everything recall, START:STOP.")] = "0:50",
    out: Annotated[Path, typer.Option(help="Directory for eval_sam.json and eval_sam.md.")] = Path("runs/eval"),
    pred_iou_thresh: Annotated[Optional[float], typer.Option(help="Segment-everything setting for the recall \\[default: the model's recommended, else segment-anything's 0.88].")] = None,
    stability_score_thresh: Annotated[Optional[float], typer.Option(help="Segment-everything setting for the recall \\[default: the model's recommended, else segment-anything's 0.95].")] = None,
    box_nms_thresh: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Segment-everything's box NMS for the recall \\[default: the model's recommended, else segment-anything's 0.7].")] = None,
    ceiling: Annotated[bool, typer.Option("--ceiling/--no-ceiling", help="Also report the resolution ceiling: the mIoU of ideal low-res logits after the model's post-processing.")] = True,
    input_size: Annotated[Optional[int], typer.Option(help="Run the model at this input side in pixels (conv encoders; the recommended thresholds stay the shipped ones, chosen at the config's side) \\[default: the side --checkpoint's header records, else the config's].")] = None,
    threads: Threads = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    from samantic.io import atomic_write_bytes, atomic_write_json
    from samantic.models import create_model
    from samantic.train.metrics import evaluate_sam

    _use_threads(threads)
    point_seeds, recall_seeds = parse_seeds(seeds), parse_seeds(amg_seeds)
    try:
        sam = create_model(model, checkpoint=checkpoint, **input_size_override(model, input_size))
        amg = _thresholds(sam, pred_iou_thresh, stability_score_thresh, box_nms_thresh)
        result = evaluate_sam(sam, point_seeds, recall_seeds, progress=progress, amg_kwargs=amg, ceiling=ceiling)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    command = f"samantic eval sam --model {model}" + (f" --checkpoint {checkpoint}" if checkpoint else "") + \
        (f" --input-size {input_size}" if input_size else "") + f" --seeds {seeds} --amg-seeds {amg_seeds}"
    command += "".join(f" --{k.replace('_', '-')} {v}" for k, v in amg.items())
    payload = {"model": model, "checkpoint": checkpoint, "input_size": int(sam.image_encoder.img_size), "seeds": seeds,
               "amg_seeds": amg_seeds, "command": command,
               "segment_everything": amg, **result.to_dict()}
    atomic_write_json(out / "eval_sam.json", payload, indent=2)
    md = f"`{command}`\n\n{result.markdown()}\n"
    atomic_write_bytes(out / "eval_sam.md", md.encode())
    typer.echo(md)
    typer.echo(f"saved: {out / 'eval_sam.json'} and {out / 'eval_sam.md'} ({result.seconds:.0f} s)")


@app.command("thresholds")
def eval_thresholds(
    model: Annotated[str, typer.Option(help="Registered model.")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="Weights to calibrate (default: the model's shipped weights).")] = None,
    seeds: Annotated[str, typer.Option(help="Held-out scene seeds, START:STOP (keep them apart from the seeds you report on).")] = "500:560",
    pred_iou: Annotated[str, typer.Option(help="Comma-separated pred_iou_thresh values to try.")] = "0.3,0.4,0.5,0.6,0.7,0.8,0.88",  # = PRED_IOU_GRID
    stability: Annotated[str, typer.Option(help="Comma-separated stability_score_thresh values to try.")] = "0.7,0.8,0.9,0.92,0.93,0.94,0.95",  # = STABILITY_GRID
    box_nms: Annotated[str, typer.Option(help="Comma-separated box_nms_thresh values to try (segment-everything's box NMS: a lower one drops more second masks of one object).")] = "0.7,0.6,0.5,0.4,0.3",  # = BOX_NMS_GRID
    points_per_side: Annotated[int, typer.Option(min=1, help="Segment-everything grid: points per side.")] = 32,
    scenes: Annotated[str, typer.Option(help="v1: plain scenes, one mask per shape; v2: panoptic scenes, one mask per entity (thing or stuff region), for models trained on them; v2-part: panoptic scenes, one mask per part (a simple thing whole), for SUM's --task part \\[default: v2-part with --task part, else v1].")] = "",
    task: Annotated[str, typer.Option(help="SUM's task prompt segment-everything runs with (unspecified, salient, entity, part).")] = "unspecified",
    record: Annotated[bool, typer.Option("--record", help="Record the chosen thresholds for --task in --checkpoint's header (the file is rewritten atomically, tensors unchanged): `samantic segment`, Segmenter and bundles then use them when given no threshold flags.")] = False,
    out: Annotated[Path, typer.Option(help="Directory for eval_thresholds.json and eval_thresholds.md.")] = Path("runs/eval"),
    threads: Threads = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Segment-everything recall, precision and masks per image for a grid of thresholds; the best F1 is the
    model's recommended default (what a registry entry's `thresholds` should say, or, with --record, what a
    weights file records)."""
    from samantic.io import atomic_write_bytes, atomic_write_json
    from samantic.models import create_model, record_thresholds
    from samantic.models.tasks import task_name
    from samantic.train.metrics import calibrate_thresholds

    _use_threads(threads)
    try:
        task = task_name(task)
    except ValueError as e:
        typer.echo(f"error: --task: {e}", err=True)
        raise typer.Exit(1)
    scenes = scenes or ("v2-part" if task == "part" else "v1")
    if record and (checkpoint is None or not Path(checkpoint).is_file()):
        typer.echo("error: --record writes the thresholds into --checkpoint FILE (a .safetensors file); the shipped "
                   "weights' thresholds live in the model's registry entry" if checkpoint is None else
                   f"error: --record: checkpoint file not found: {checkpoint}", err=True)
        raise typer.Exit(1)
    if record and Path(checkpoint).suffix.lower() != ".safetensors":
        typer.echo(f"error: --record: thresholds are recorded in a .safetensors header; {checkpoint} is not one",
                   err=True)
        raise typer.Exit(1)
    try:
        grid_iou = [float(v) for v in pred_iou.split(",") if v.strip()]
        grid_stab = [float(v) for v in stability.split(",") if v.strip()]
        grid_nms = [float(v) for v in box_nms.split(",") if v.strip()]
    except ValueError:
        typer.echo("error: --pred-iou, --stability and --box-nms take comma-separated numbers", err=True)
        raise typer.Exit(1)
    if not grid_iou or not grid_stab or not grid_nms or not all(0 <= v <= 1 for v in grid_iou + grid_stab + grid_nms):
        typer.echo("error: --pred-iou, --stability and --box-nms need values in [0, 1]", err=True)
        raise typer.Exit(1)
    try:
        sam = create_model(model, checkpoint=checkpoint)
        result = calibrate_thresholds(sam, parse_seeds(seeds), grid_iou, grid_stab, points_per_side=points_per_side,
                                      box_nms_grid=grid_nms, scenes=scenes, task=task, progress=progress)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    command = f"samantic eval thresholds --model {model}" + (f" --checkpoint {checkpoint}" if checkpoint else "") + \
        f" --seeds {seeds} --pred-iou {pred_iou} --stability {stability} --box-nms {box_nms}" + \
        f" --points-per-side {points_per_side}" + \
        (f" --scenes {scenes}" if scenes != "v1" else "") + (f" --task {task}" if task != "unspecified" else "")
    atomic_write_json(out / "eval_thresholds.json", {"model": model, "checkpoint": checkpoint, "seeds": seeds,
                                                      "task": task, "command": command, **result.to_dict()}, indent=2)
    md = f"`{command}`\n\n{result.markdown()}\n"
    atomic_write_bytes(out / "eval_thresholds.md", md.encode())
    typer.echo(md)
    b = result.best
    chosen = {k: float(b[k]) for k in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")}
    typer.echo(f"recommended: pred_iou_thresh {b['pred_iou_thresh']}, stability_score_thresh "
               f"{b['stability_score_thresh']}, box_nms_thresh {b['box_nms_thresh']} (F1@0.5 {b['f1_50']:.3f}); "
               f"saved {out / 'eval_thresholds.md'}")
    if record:
        try:
            record_thresholds(checkpoint, chosen, task, source=command)
        except (ValueError, FileNotFoundError, OSError) as e:
            typer.echo(f"error: --record: {e}", err=True)
            raise typer.Exit(1)
        typer.echo(f"recorded in {checkpoint} for --task {task}: `samantic segment --checkpoint {checkpoint}"
                   + (f" --task {task}" if task != "unspecified" else "") + "` uses them when given no threshold flags")


@app.command("usam")
def eval_usam(
    head: Annotated[list[Path], typer.Option(help="U-SAM head file(s); several give one table row each (ablations).")],
    model: Annotated[str, typer.Option(help="Registered SAM the heads were trained on.")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="SAM weights (default: the model's shipped weights).")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Names to segment (default: the head's classes); superclass names use the head's groups.")] = None,
    seeds: Annotated[str, typer.Option(help="Held-out scene seeds, START:STOP.")] = "0:100",
    points_per_side: Annotated[int, typer.Option(min=1, help="Segment-everything grid: points per side.")] = 32,
    pred_iou_thresh: Annotated[Optional[float], typer.Option(help="\\[default: the model's recommended, else 0.88]")] = None,
    stability_score_thresh: Annotated[Optional[float], typer.Option(help="\\[default: the model's recommended, else 0.95]")] = None,
    box_nms_thresh: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="\\[default: the model's recommended, else 0.7]")] = None,
    score_thresh: Annotated[Optional[float], typer.Option(help="Class-probability threshold (default: the head's).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for eval_usam.json and eval_usam.md.")] = Path("runs/eval"),
    threads: Threads = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Semantic mIoU and mask mAP50 of class-name segmentation on held-out scenes."""
    from samantic.heads.usam import load_head
    from samantic.io import atomic_write_bytes, atomic_write_json
    from samantic.models import create_model
    from samantic.models.registry import SAM_BOX_NMS
    from samantic.runtime import Segmenter
    from samantic.train.data.shapes import SUPERCLASS_NAMES
    from samantic.train.metrics import evaluate_usam

    _use_threads(threads)
    scene_seeds = parse_seeds(seeds)
    rows = []
    try:
        sam = create_model(model, checkpoint=checkpoint)
        thresholds = _thresholds(sam, pred_iou_thresh, stability_score_thresh, box_nms_thresh)
        thresholds.setdefault("box_nms_thresh", SAM_BOX_NMS)  # segment-anything's, for a model that recommends none
        for path in head:
            h = load_head(path)
            h.check_model(sam, model, path)
            seg = Segmenter(sam, h, classes=classes, score_thresh=score_thresh, points_per_side=points_per_side,
                            **thresholds)
            level = "superclass" if all(n in SUPERCLASS_NAMES for n in seg.names) else "class"
            result = evaluate_usam(seg, scene_seeds, level, progress=progress)
            method = json.loads(h.info.extra.get("training", "{}")).get("method", "?")
            rows.append((path, method, result))
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    command = (f"samantic eval usam --model {model}" + (f" --checkpoint {checkpoint}" if checkpoint else "")
               + "".join(f" --head {p}" for p in head) + (f" --classes {classes}" if classes else "")
               + f" --seeds {seeds} --points-per-side {points_per_side}"
               + "".join(f" --{k.replace('_', '-')} {v}" for k, v in thresholds.items()))
    payload = {"model": model, "checkpoint": checkpoint, "seeds": seeds, "command": command,
               "heads": [{"head": str(p), "method": m, **r.to_dict()} for p, m, r in rows]}
    atomic_write_json(out / "eval_usam.json", payload, indent=2)
    md = [f"`{command}`", ""]
    if len(rows) > 1:
        md += ["| head | method | mIoU | mAP50 |", "|---|---|---|---|"]
        md += [f"| {p.name} | {m} | {r.miou:.4f} | {r.map50:.4f} |" for p, m, r in rows]
        md.append("")
    for p, m, r in rows:
        md += [f"**{p.name}** ({m}, {r.level} level, {r.n_scenes} scenes, {r.n_instances} instances)", "", r.markdown(), ""]
    text = "\n".join(md)
    atomic_write_bytes(out / "eval_usam.md", text.encode())
    typer.echo(text)
    typer.echo(f"saved: {out / 'eval_usam.json'} and {out / 'eval_usam.md'}")


@app.command("probe")
def eval_probe(
    model: Annotated[str, typer.Option(help="Registered SAM.")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="SAM weights (default: the model's shipped weights).")] = None,
    train_seeds: Annotated[str, typer.Option(help="Scenes the probe is fitted on, START:STOP (disjoint from --seeds).")] = "500000:500080",
    seeds: Annotated[str, typer.Option(help="Held-out scenes it is scored on, START:STOP.")] = "0:40",
    features: Annotated[str, typer.Option(help="Feature sets, comma-separated; join features with '+' (token, pooled, shape).")] = "token,pooled,shape,token+shape",
    points_per_side: Annotated[int, typer.Option(min=1, help="Segment-everything grid: points per side.")] = 16,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training data.")] = 30,
    out: Annotated[Path, typer.Option(help="Directory for eval_probe.json and eval_probe.md.")] = Path("runs/eval"),
    threads: Threads = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """The ceiling of a class head: a probe fitted on mask-level ground truth, per feature set."""
    from samantic.io import atomic_write_bytes, atomic_write_json
    from samantic.models import create_model
    from samantic.train.data.shapes import CLASSES
    from samantic.train.probe import collect_probe_data, parse_feature_sets, run_probe

    _use_threads(threads)
    fit_range, test_range = parse_seeds(train_seeds), parse_seeds(seeds)
    if max(fit_range.start, test_range.start) < min(fit_range.stop, test_range.stop):
        raise typer.BadParameter(f"--train-seeds {train_seeds} and --seeds {seeds} overlap")
    try:
        sets = parse_feature_sets(features)
        sam = create_model(model, checkpoint=checkpoint)
        train = collect_probe_data(sam, fit_range, points_per_side, progress)
        test = collect_probe_data(sam, test_range, points_per_side, progress)
        result = run_probe(train, test, sets, len(CLASSES), epochs=epochs)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    command = (f"samantic eval probe --model {model}" + (f" --checkpoint {checkpoint}" if checkpoint else "")
               + f" --train-seeds {train_seeds} --seeds {seeds} --features {features} --points-per-side {points_per_side}"
               + f" --epochs {epochs}")
    payload = {"model": model, "checkpoint": checkpoint, "command": command, **result.to_dict()}
    atomic_write_json(out / "eval_probe.json", payload, indent=2)
    md = (f"`{command}`\n\nClass accuracy of a probe fitted with mask-level labels on {result.n_train[1]} matched masks "
          f"({result.n_train[0]} in all), scored on {result.n_test[1]} matched held-out masks ({result.n_test[0]} in all).\n\n"
          f"{result.markdown()}\n")
    atomic_write_bytes(out / "eval_probe.md", md.encode())
    typer.echo(md)
    typer.echo(f"saved: {out / 'eval_probe.json'} and {out / 'eval_probe.md'}")


def _named_as(confusion: dict, row: int) -> str:
    """`` (b 3, c 1)``: the other classes a class's ground-truth segments were named as, most often first."""
    names, matrix = confusion.get("names", []), confusion.get("matrix", [])
    if row >= len(matrix):
        return ""
    others = sorted(((n, names[j]) for j, n in enumerate(matrix[row]) if j != row and n), key=lambda t: (-t[0], t[1]))
    return f" ({', '.join(f'{name} {n}' for n, name in others)})" if others else ""


@app.command("samcp")
def eval_samcp(
    samcp: Annotated[List[Path], typer.Option(help="SAM-CP head file(s) (repeatable: rows side by side, e.g. ablations).")],
    model: Annotated[Optional[str], typer.Option(help="Registered SAM whose patches the heads label. \\[default: the one the (first) head was trained on, else sam_nano]", show_default=False)] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="SAM weights (default: the model's shipped weights).")] = None,
    seeds: Annotated[str, typer.Option(help="Held-out v2 (panoptic) scene seeds, START:STOP.")] = "0:60",
    v1_seeds: Annotated[Optional[str], typer.Option(help="Held-out v1 scene seeds for things by class name, START:STOP ('' to skip).")] = "0:60",
    usam: Annotated[Optional[Path], typer.Option(help="A U-SAM head to score on the same v1 scenes, side by side.")] = None,
    cache: Annotated[Path, typer.Option(help="Patch cache root (shared with `samantic train samcp`).")] = Path("runs/cache/samcp"),
    score_thresh: Annotated[Optional[float], typer.Option(help="Segment score threshold (default 0.3).")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Heads also score the mirrored image, averaged (test-time augmentation) \\[default: as recorded with each head, else off].")] = None,
    oracle: Annotated[bool, typer.Option("--oracle/--no-oracle", help="Also a row for a perfect head (the training targets as scores, read from the cached overlaps with the ground truth): the ceiling the patches set.")] = False,
    out: Annotated[Path, typer.Option(help="Directory for eval_samcp.json and eval_samcp.md.")] = Path("runs/eval"),
    threads: Threads = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """PQ / SQ / RQ, mask AP and semantic mIoU of SAM-CP heads on held-out scenes (same patches for every head)."""
    from samantic.heads.samcp import load_samcp
    from samantic.io import atomic_write_bytes, atomic_write_json
    from samantic.models import create_model
    from samantic.pipeline.panoptic import SamcpPredictor
    from samantic.train.data.shapes import CLASSES
    from samantic.train.samcp_eval import OracleSamcpScorer, evaluate_samcp

    _use_threads(threads)

    def ablation(head) -> str:
        i = head.info
        parts = [f"{i.layers} layer{'s' if i.layers > 1 else ''}", "mask RoI" if i.mask_roi else "box RoI",
                 "affinity residual" if i.affinity_residual else "no residual"]
        return ", ".join(parts)

    v2_range = parse_seeds(seeds)
    v1_range = parse_seeds(v1_seeds) if v1_seeds else None
    rows = []
    opts = {} if score_thresh is None else {"score_thresh": score_thresh}
    head_opts = {**opts, **({} if flip is None else {"flip": flip})}
    oracle_opts = {**opts, "flip": False}  # the oracle scores patches, not the image: nothing to mirror
    try:
        loaded = [(path, load_samcp(path)) for path in samcp]
        model = loaded[0][1].sam_for(model, samcp[0])  # without --model: the SAM the first head learned from
        sam = create_model(model, checkpoint=checkpoint)
        patch_opts = None
        heads = []
        for path, head in loaded:  # every head checked before any is scored: a mismatch costs no evaluation
            head.check_model(model, path)
            mismatch = head.check_weights(sam, path)
            if mismatch:
                typer.echo(f"warning: {mismatch}", err=True)
            pred = SamcpPredictor(head, **head_opts)
            po = pred.patch_options()
            if patch_opts is None:
                patch_opts = po
            elif po != patch_opts:
                raise ValueError(f"{path}: trained on other patches ({po}) than {samcp[0]} ({patch_opts}); "
                                 "side-by-side rows need the same patches")
            heads.append((path, head, pred))
        for path, head, pred in heads:
            v2 = evaluate_samcp(pred, sam, v2_range, cache, kind="v2", progress=progress, **patch_opts)
            v1 = None
            if v1_range is not None:
                wanted = [n for n in head.info.classes if n in CLASSES]
                v1 = evaluate_samcp(SamcpPredictor(head, classes=wanted, **head_opts), sam, v1_range, cache, kind="v1",
                                    progress=progress, **patch_opts) if wanted else None
            rows.append((path.name, ablation(head) + (", test-time flip" if pred.flip else ""), str(path), v2, v1))
        if oracle:
            from samantic.train.data.panoptic import CATEGORIES
            from samantic.train.samcp_cache import PatchCache

            pc = PatchCache(cache, sam, **patch_opts)
            v2 = evaluate_samcp(SamcpPredictor(OracleSamcpScorer(pc, CATEGORIES), **oracle_opts), sam, v2_range, cache,
                                kind="v2", progress=progress, **patch_opts)
            v1 = None
            if v1_range is not None:
                v1_cats = [{"id": i + 1, "name": n, "isthing": 1} for i, n in enumerate(CLASSES)]
                v1 = evaluate_samcp(SamcpPredictor(OracleSamcpScorer(pc, v1_cats), **oracle_opts), sam, v1_range, cache,
                                    kind="v1", progress=progress, **patch_opts)
            rows.append(("oracle", "the training targets as scores (the patches' ceiling)", None, v2, v1))
        usam_row = None
        if usam is not None and v1_range is not None:
            from samantic.heads.usam import load_head
            from samantic.runtime import Segmenter
            from samantic.train.metrics import evaluate_usam

            h = load_head(usam)
            h.check_model(sam, model, usam)
            thresholds = _thresholds(sam, None, None)
            seg = Segmenter(sam, h, **thresholds)
            usam_row = evaluate_usam(seg, v1_range, "class", progress=progress)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    command = (f"samantic eval samcp --model {model}" + (f" --checkpoint {checkpoint}" if checkpoint else "")
               + "".join(f" --samcp {p}" for p in samcp) + f" --seeds {seeds}"
               + (f" --v1-seeds {v1_seeds}" if v1_seeds else " --v1-seeds ''") + (f" --usam {usam}" if usam else "")
               + (f" --score-thresh {score_thresh}" if score_thresh is not None else "")
               + ("" if flip is None else " --flip" if flip else " --no-flip") + (" --oracle" if oracle else ""))

    payload = {"model": model, "checkpoint": checkpoint, "seeds": seeds, "v1_seeds": v1_seeds, "command": command,
               "patches": patch_opts,
               "heads": [{"head": p if p is not None else name, "setting": setting, "v2": v2.to_dict(),
                          "v1": v1.to_dict() if v1 else None} for name, setting, p, v2, v1 in rows],
               "usam": usam_row.to_dict() if usam_row is not None else None}
    atomic_write_json(out / "eval_samcp.json", payload, indent=2)
    f = lambda v: f"{v:.3f}" if v == v else "-"  # noqa: E731
    md = [f"`{command}`", "", f"Patches: {patch_opts or 'the model defaults'}; v2 scenes {seeds}, v1 scenes {v1_seeds or '-'}.", "",
          "| head | setting | PQ | SQ | RQ | PQ things | PQ stuff | AP | AP50 | mIoU | v1 mIoU | v1 AP50 | patches / img | head s / img |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, setting, _, v2, v1 in rows:
        a, t, s = v2.pq.get("all", {}), v2.pq.get("things", {}), v2.pq.get("stuff", {})
        md.append(f"| {name} | {setting} | {f(a.get('pq', float('nan')))} | {f(a.get('sq', float('nan')))} | "
                  f"{f(a.get('rq', float('nan')))} | {f(t.get('pq', float('nan')))} | {f(s.get('pq', float('nan')))} | "
                  f"{f(v2.ap)} | {f(v2.ap50)} | {f(v2.miou)} | {f(v1.miou) if v1 else '-'} | "
                  f"{f(v1.ap50) if v1 else '-'} | {v2.patches_per_image:.1f} | {v2.head_seconds_per_image:.3f} |")
    if usam_row is not None:
        md.append(f"| {usam.name} (U-SAM) | classifier on mask tokens | - | - | - | - | - | - | - | - | "
                  f"{f(usam_row.miou)} | {f(usam_row.map50)} | - | - |")
    md.append("")
    intervals = [f"{name} {f(v2.pq_interval['all'][0])}-{f(v2.pq_interval['all'][1])}" for name, _, _, v2, _ in rows
                 if v2.pq_interval.get("all")]
    if intervals:
        md += ["PQ, 95% bootstrap interval over the v2 scenes (1,000 resamples of the scenes; how far another draw "
               "of as many scenes could move it): " + "; ".join(intervals) + ".", ""]
    for name, _, _, v2, v1 in rows:
        md += [f"**{name}** per class (v2): PQ / SQ / RQ, IoU, AP50, and the errors: ground-truth segments missed "
               "(no prediction at IoU > 0.5) or misnamed (a prediction of another class at IoU > 0.5, as which), "
               "spurious predictions (on no segment)", "",
               "| class | PQ | SQ | RQ | IoU | AP50 | TP | missed | misnamed (as) | spurious |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        confusion = v2.pq.get("confusion", {})
        for k, (cls, r) in enumerate(v2.pq.get("per_class", {}).items()):
            if r.get("tp", 0) + r.get("fp", 0) + r.get("fn", 0) == 0:
                continue
            md.append(f"| {cls} | {f(r['pq'])} | {f(r['sq'])} | {f(r['rq'])} | "
                      f"{f(v2.semantic.get('per_class', {}).get(cls, float('nan')))} | "
                      f"{f(v2.ap50_per_class.get(cls, float('nan')))} | {r['tp']} | {r['missed']} | "
                      f"{r['misnamed']}{_named_as(confusion, k)} | {r['spurious']} |")
        md.append("")
    text = "\n".join(md)
    atomic_write_bytes(out / "eval_samcp.md", text.encode())
    typer.echo(text)
    typer.echo(f"saved: {out / 'eval_samcp.json'} and {out / 'eval_samcp.md'}")


def _own_thresholds_recall(sam, calib_seeds, recall_seeds, progress: bool, shared: dict, at_shared: dict,
                           stability_grid: Optional[Sequence[float]] = None) -> dict:
    """Segment-everything recall of ``sam`` at its own thresholds, chosen on ``calib_seeds`` as
    ``samantic eval thresholds`` chooses them: a fine-tuned model's scores shift, and one setting for
    every column measures that shift along with the segmentation. ``at_shared``: its metrics at the
    ``shared`` setting, reused when its own pair is that one. ``stability_grid``: the stability
    thresholds tried (default: ``samantic eval thresholds``' grid)."""
    from samantic.train.metrics import SAM_BOX_NMS, STABILITY_GRID, calibrate_thresholds, evaluate_sam

    nms = float(shared.get("box_nms_thresh", SAM_BOX_NMS))  # the pair calibrated at the shared setting's box NMS
    cal = calibrate_thresholds(sam, calib_seeds, stability_grid=stability_grid or STABILITY_GRID, box_nms_grid=(nms,),
                               progress=progress)
    own = {k: float(cal.best[k]) for k in ("pred_iou_thresh", "stability_score_thresh")}
    if "box_nms_thresh" in shared:
        own["box_nms_thresh"] = nms
    if own == {k: float(shared[k]) for k in own} and set(shared) <= set(own):
        metrics = at_shared
    else:
        metrics = evaluate_sam(sam, [], recall_seeds, progress=progress, amg_kwargs=own).metrics
    return {"own_thresholds": own,
            "own_calibration": {k: float(cal.best[k]) for k in ("recall_50", "precision_50", "masks_per_image", "f1_50")},
            **{f"{k}_own": metrics[k] for k in ("recall_50", "recall_75", "masks_per_image")}}


@app.command("sum")
def eval_sum(
    column: Annotated[Optional[List[str]], typer.Option(help="NAME=WEIGHTS\\[@SIDE] (repeatable, in column order): WEIGHTS a registered model name (its shipped weights) or a checkpoint file of --model's architecture; @SIDE runs it at that input side in pixels (conv encoders; e.g. sum=runs/sum.safetensors@768); a file fine-tuned with `train sum --input-size` runs at that side unless @SIDE says otherwise.")] = None,
    model: Annotated[str, typer.Option(help="Architecture of checkpoint files given in --column.")] = "sam_nano",
    seeds: Annotated[str, typer.Option(help="Held-out v2 (panoptic) scene seeds, START:STOP.")] = "0:40",
    points: Annotated[str, typer.Option(help="Numbers of point prompts after which masks are scored, comma-separated.")] = "1,3,5",
    unspecified: Annotated[bool, typer.Option("--unspecified/--no-unspecified", help="For every column with a task table, also a column asking every mask as 'unspecified' (what the task prompt adds).")] = True,
    forgetting_seeds: Annotated[str, typer.Option(help="Held-out plain (v1) scenes for single-point mIoU before and after, START:STOP ('' to skip).")] = "0:60",
    amg_seeds: Annotated[str, typer.Option(help="Held-out v1 scenes for segment-everything recall before and after, START:STOP ('' to skip).")] = "0:30",
    forgetting: Annotated[str, typer.Option(help="Columns measured for forgetting, comma-separated (default: the first and the last).")] = "",
    pred_iou_thresh: Annotated[Optional[float], typer.Option(help="Segment-everything setting of the forgetting recall, the same for every column \\[default: --model's recommended, else segment-anything's 0.88].")] = None,
    stability_score_thresh: Annotated[Optional[float], typer.Option(help="Segment-everything setting of the forgetting recall \\[default: --model's recommended, else 0.95].")] = None,
    calibration_seeds: Annotated[str, typer.Option(help="Held-out v1 scenes, START:STOP, disjoint from --amg-seeds: each forgetting column's own thresholds are chosen on them by `samantic eval thresholds`' rule (best F1 at IoU 0.5) and its recall is measured again at them ('' to skip).")] = "",
    calibration_stability: Annotated[str, typer.Option(help="Comma-separated stability_score_thresh values the --calibration-seeds search tries (a fine-tune trained for stability scores above the default grid needs more) \\[default: `samantic eval thresholds`' grid].")] = "",
    out: Annotated[Path, typer.Option(help="Directory for eval_sum.json and eval_sum.md.")] = Path("runs/eval"),
    threads: Threads = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """SUM's ablation: interactive mIoU and boundary IoU per task (salient, entity, part, unspecified) at 1/3/5 points, and forgetting on plain scenes."""
    from samantic.io import atomic_write_bytes, atomic_write_json
    from samantic.models import get_model_entry
    from samantic.models.registry import SAM_THRESHOLDS
    from samantic.train.metrics import evaluate_sam
    from samantic.train.sum_eval import evaluate_sum, sum_table

    _use_threads(threads)
    if not column:
        typer.echo("error: give the columns: --column NAME=WEIGHTS, repeated (e.g. --column base=sam_nano "
                   "--column sum=runs/sum/sum.safetensors from `samantic train sum`)", err=True)
        raise typer.Exit(1)
    specs = column
    try:
        point_list = [int(p) for p in points.split(",") if p.strip()]
        if not point_list or min(point_list) < 1:
            raise ValueError
    except ValueError:
        typer.echo(f"error: --points must be numbers >= 1 separated by commas, got {points!r}", err=True)
        raise typer.Exit(1)
    v2_seeds = parse_seeds(seeds)
    v1_seeds = parse_seeds(forgetting_seeds) if forgetting_seeds else range(0)
    recall_seeds = parse_seeds(amg_seeds) if amg_seeds else range(0)
    calib_seeds = parse_seeds(calibration_seeds) if calibration_seeds else range(0)
    models, sources = {}, {}
    try:
        if len(calib_seeds) and not len(recall_seeds):
            raise ValueError("--calibration-seeds needs --amg-seeds (the scenes the calibrated thresholds are measured on)")
        try:
            stab_grid = [float(v) for v in calibration_stability.split(",") if v.strip()]
        except ValueError:
            stab_grid = [-1.0]
        if not all(0 <= v <= 1 for v in stab_grid) or (calibration_stability.strip() and not stab_grid):
            raise ValueError(f"--calibration-stability takes comma-separated numbers in [0, 1], got {calibration_stability!r}")
        if stab_grid and not len(calib_seeds):
            raise ValueError("--calibration-stability needs --calibration-seeds (the scenes the grid is searched on)")
        if set(calib_seeds) & set(recall_seeds):
            raise ValueError(f"--calibration-seeds {calibration_seeds} overlaps --amg-seeds {amg_seeds}: thresholds chosen "
                             "on the scenes they are measured on overstate the recall")
        for spec in specs:
            name, weights, sam = load_column(spec, model)
            if name in models:
                raise ValueError(f"--column {name!r} given twice")
            models[name] = sam
            sources[name] = weights
        base_name = next(iter(models))
        # one setting for every column (before and after): --model's recommendation, not each file's
        amg = dict(get_model_entry(model).thresholds or SAM_THRESHOLDS)
        if pred_iou_thresh is not None:
            amg["pred_iou_thresh"] = pred_iou_thresh
        if stability_score_thresh is not None:
            amg["stability_score_thresh"] = stability_score_thresh
        columns = {}
        for name, sam in models.items():
            has_table = getattr(sam, "task_prompt", None) is not None
            columns[name] = (sam, True)
            if has_table and unspecified:
                columns[f"{name}, unspecified prompt"] = (sam, False)
        result = evaluate_sum(columns, v2_seeds, point_list, progress=progress)
        forget_cols = [c.strip() for c in forgetting.split(",") if c.strip()] or \
            list(dict.fromkeys([base_name, list(models)[-1]]))
        unknown = [c for c in forget_cols if c not in models]
        if unknown:
            raise ValueError(f"--forgetting names no --column: {', '.join(unknown)}")
        if len(v1_seeds) or len(recall_seeds):
            for name in forget_cols:
                r = evaluate_sam(models[name], v1_seeds, recall_seeds, progress=progress, amg_kwargs=amg)
                result.forgetting[name] = {k: r.metrics[k] for k in ("miou_1pt_top", "miou_3pt", "recall_50", "recall_75",
                                                                     "masks_per_image")}
                if len(calib_seeds):
                    result.forgetting[name].update(_own_thresholds_recall(models[name], calib_seeds, recall_seeds, progress,
                                                                           amg, r.metrics, stab_grid))
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    command = "samantic eval sum " + " ".join(f"--column {s}" for s in specs) + \
        (f" --model {model}" if model != "sam_nano" else "") + f" --seeds {seeds} --points {points}" + \
        f" --forgetting-seeds '{forgetting_seeds}' --amg-seeds '{amg_seeds}'" + \
        "".join(f" --{k.replace('_', '-')} {v}" for k, v in amg.items()) + \
        (f" --calibration-seeds {calibration_seeds}" if calibration_seeds else "") + \
        (f" --calibration-stability {','.join(repr(v) for v in stab_grid)}" if stab_grid else "")  # repr: exact
    payload = {"command": command, "columns": sources, "segment_everything": amg, **result.to_dict()}
    atomic_write_json(out / "eval_sum.json", payload, indent=2)
    md = [f"`{command}`", "",
          f"Held-out v2 scenes {seeds}; masks per task: " + ", ".join(
              f"{t} {v[point_list[0]]['masks']}" for t, v in result.metrics[next(iter(result.metrics))].items()
              if t != "average") + ".", "", "### mIoU", "", sum_table(result, "miou"), "",
          "### mean boundary IoU", "", sum_table(result, "mbiou")]
    if result.forgetting:
        md += ["", f"### Forgetting: plain (v1) scenes, point prompts {forgetting_seeds}, segment-everything "
               f"{amg_seeds} at {amg}", "",
               "| column | 1-point mIoU | 3-point mIoU | recall @ 0.5 | recall @ 0.75 | masks / image |",
               "|---|---|---|---|---|---|"]
        for name, m in result.forgetting.items():
            md.append(f"| {name} | {m['miou_1pt_top']:.4f} | {m['miou_3pt']:.4f} | {m['recall_50']:.4f} | "
                      f"{m['recall_75']:.4f} | {m['masks_per_image']:.1f} |")
        own = {n: m for n, m in result.forgetting.items() if "own_thresholds" in m}
        if own:
            md += ["", f"Segment-everything on {amg_seeds} at each column's own thresholds, chosen on v1 scenes "
                   f"{calibration_seeds} (best F1 at IoU 0.5; recall / precision / masks per image there):", "",
                   "| column | pred_iou / stability | recall @ 0.5 | recall @ 0.75 | masks / image | on the calibration scenes |",
                   "|---|---|---|---|---|---|"]
            for name, m in own.items():
                t, c = m["own_thresholds"], m["own_calibration"]
                md.append(f"| {name} | {t['pred_iou_thresh']:.2f} / {t['stability_score_thresh']:.2f} | "
                          f"{m['recall_50_own']:.4f} | {m['recall_75_own']:.4f} | {m['masks_per_image_own']:.1f} | "
                          f"{c['recall_50']:.3f} / {c['precision_50']:.3f} / {c['masks_per_image']:.1f} |")
    text = "\n".join(md) + "\n"
    atomic_write_bytes(out / "eval_sum.md", text.encode())
    typer.echo(text)
    typer.echo(f"saved: {out / 'eval_sum.json'} and {out / 'eval_sum.md'} ({result.seconds:.0f} s)")
