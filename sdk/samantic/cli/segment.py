"""``samantic segment``: segment files, folders and globs; results per image, resumable."""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional, Tuple

import typer


class Task(str, Enum):
    """SUM's task prompts (``samantic.models.tasks.TASKS``, same order)."""

    unspecified = "unspecified"
    salient = "salient"
    entity = "entity"
    part = "part"


@dataclass
class Job:
    source: Path
    name: str  # output name relative to --out, e.g. "sub/a.jpg"


def collect_inputs(paths: List[str]) -> Tuple[List[Job], List[Tuple[str, str]]]:
    """Files, folders (recursive, by image extension) and globs -> jobs, plus (path, reason) of inputs that match nothing."""
    from samantic.io.images import IMAGE_EXTENSIONS

    jobs: List[Job] = []
    missing: List[Tuple[str, str]] = []
    seen = set()

    def add(path: Path, name: str) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            jobs.append(Job(path, name))

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                missing.append((raw, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder"))
            for f in found:
                add(f, f.relative_to(p).as_posix())
        elif p.exists():
            add(p, p.name)  # given explicitly: tried whatever its extension
        elif any(ch in raw for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(raw, recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                missing.append((raw, "the pattern matches no image files"))
            for f in files:
                add(f, f.name)
        else:
            missing.append((raw, "no such file or folder"))
    names: dict = {}
    for j in jobs:  # two inputs with one output name: keep both apart
        if j.name in names:
            names[j.name] += 1
            stem = Path(j.name)
            j.name = str(stem.with_name(f"{stem.stem}-{names[j.name]}{stem.suffix}"))
        else:
            names[j.name] = 0
    return jobs, missing


def segment(
    paths: Annotated[Optional[List[str]], typer.Argument(help="Image files, folders (searched recursively) or glob patterns; or one video file (.mp4, .avi, .mov, .mkv, .webm, ...) or stream URL (rtsp://, http(s)://...m3u8, ...).", show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="Output folder: NAME.json (COCO results, RLE) and NAME.overlay.png per image; with --head also NAME.semantic.png; with --samcp also NAME.semantic.png, NAME.panoptic.png and NAME.panoptic.json (COCO panoptic). For a video, camera or stream: NAME.jsonl (a line per frame) and NAME.summary.json.")] = ...,
    model: Annotated[str, typer.Option(help="Registered model (see `samantic weights list`).")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="Weights file or tag (default: the model's shipped weights).")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="Run an exported bundle (`samantic export bundle`) instead of --model: no torch needed with the onnxruntime backend.")] = None,
    backend: Annotated[str, typer.Option(help="With --bundle: auto, onnxruntime, tensorrt or torch.")] = "auto",
    precision: Annotated[str, typer.Option(help="With --bundle: fp32, int8 (onnxruntime dynamic INT8 / TensorRT) or fp16 (TensorRT).")] = "fp32",
    points_per_side: Annotated[Optional[int], typer.Option(min=1, help="[default: 32, or the grid a --samcp head was trained with]")] = None,
    points_per_batch: Annotated[int, typer.Option(min=1)] = 64,
    pred_iou_thresh: Annotated[Optional[float], typer.Option(help="[default: the model's recommended (sam_nano: 0.6), the bundle's, or segment-anything's 0.88]")] = None,
    stability_score_thresh: Annotated[Optional[float], typer.Option(help="[default: the model's recommended (sam_nano: 0.95), the bundle's, or segment-anything's 0.95]")] = None,
    stability_score_offset: Annotated[float, typer.Option(min=0.0)] = 1.0,
    box_nms_thresh: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.7,
    crop_n_layers: Annotated[int, typer.Option(min=0)] = 0,
    crop_nms_thresh: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.7,
    crop_overlap_ratio: Annotated[float, typer.Option(min=0.0)] = 512 / 1500,
    crop_n_points_downscale_factor: Annotated[int, typer.Option(min=1)] = 1,
    min_mask_region_area: Annotated[int, typer.Option(min=0)] = 0,
    task: Annotated[Task, typer.Option(help="SUM's task prompt: which granularity of mask every point asks for (salient object, entity or part; unspecified: SAM's behaviour). Models without trained task embeddings give the same masks for every task; bundles exported before task prompts run unspecified only.")] = Task.unspecified,
    classes: Annotated[Optional[str], typer.Option(help="Segment only these class names (needs --head or --samcp), e.g. 'circle,star'; group names of a U-SAM head work too.")] = None,
    head: Annotated[Optional[Path], typer.Option(help="U-SAM head file (from `samantic train usam`): masks get class names.")] = None,
    score_thresh: Annotated[Optional[float], typer.Option(help="Minimum class probability (default: the head's; with --samcp 0.3).")] = None,
    samcp: Annotated[Optional[Path], typer.Option(help="SAM-CP head file (from `samantic train samcp`): SAM's patches labelled and merged into named instances, stuff regions and a panoptic map.")] = None,
    adaptive: Annotated[bool, typer.Option("--adaptive", help="Prompt coarse to fine: refine only around points whose masks came close to --pred-iou-thresh, skip points inside confident masks (faster, not exact).")] = False,
    adaptive_margin: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="With --adaptive: how far below --pred-iou-thresh a coarse point's best predicted IoU may lie and still get its neighbours prompted. [default: 0.15]")] = None,
    mask_pngs: Annotated[bool, typer.Option("--mask-pngs", help="Also write NAME.masks/ with one PNG per mask and metadata.csv.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images whose results exist.")] = False,
    device: Annotated[str, typer.Option(help="Where the post-processing kernels run: cpu or cuda[:N].")] = "cpu",
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    camera: Annotated[Optional[int], typer.Option(help="Segment a camera (OpenCV index) instead of files.", show_default=False)] = None,
    overlay_video: Annotated[bool, typer.Option("--overlay-video", help="Video, camera or stream: also write NAME.overlay.mp4.")] = False,
    max_frames: Annotated[Optional[int], typer.Option(min=1, help="Video, camera or stream: stop after reading this many frames.", show_default=False)] = None,
    queue_size: Annotated[int, typer.Option(min=1, help="Video, camera or stream: frames queued between reading and segmenting.")] = 2,
    live: Annotated[Optional[bool], typer.Option("--live/--no-live", help="Drop the oldest queued frame when the source is faster than the model, rather than waiting. [default: live for cameras and stream URLs, not for video files]", show_default=False)] = None,
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    err = Console(stderr=True)
    console = Console()
    from samantic.cli.stream import prepare_stream

    # a video file, camera or stream URL (opened now, before the model loads) takes the video path below
    stream, capture = prepare_stream(paths, camera, out, live=live, overwrite=overwrite, mask_pngs=mask_pngs,
                                     overlay_video=overlay_video, max_frames=max_frames, queue_size=queue_size)
    jobs, missing = collect_inputs(paths) if stream is None else ([], [])
    failures: List[Tuple[str, str]] = list(missing)
    if not jobs and stream is None:
        for path, reason in failures:
            typer.echo(f"error: {path}: {reason}", err=True)
        typer.echo("error: no images to segment", err=True)
        raise typer.Exit(1)

    from samantic.io import ImageReadError, atomic_write_image, overlay_masks, read_image
    from samantic.io.writers import coco_results, write_label_png, write_mask_pngs, write_results_json
    from samantic.ops import rle_decode
    from samantic.pipeline import AmgConfig
    from samantic.runtime import Segmenter

    try:
        if adaptive_margin is not None and not adaptive:
            raise typer.BadParameter("only means something with --adaptive", param_hint="--adaptive-margin")
        if classes is not None and head is None and bundle is None and samcp is None:
            raise ValueError("--classes needs --head (a U-SAM head from `samantic train usam`), --samcp (a SAM-CP head "
                             "from `samantic train samcp`) or a --bundle with a head")
        if samcp is not None and (head is not None or bundle is not None):
            raise ValueError("--samcp runs on --model (torch); leave out --head and --bundle (a bundle exported with "
                             "--samcp brings its SAM-CP head)")
        samcp_head = None
        if samcp is not None:
            from samantic.heads.samcp import load_samcp
            from samantic.pipeline.panoptic import patch_options

            samcp_head = load_samcp(samcp)
            samcp_head.check_model(model, samcp)
            if classes is not None:
                samcp_head.check_classes([n.strip() for n in classes.split(",") if n.strip()])
        if classes is not None:
            from samantic.pipeline.scoring import check_class_names

            check_class_names(classes, what="--classes list")
        from samantic.models.registry import SAM_THRESHOLDS, get_model_entry

        thresholds = dict(SAM_THRESHOLDS)
        if bundle is None and checkpoint is None and get_model_entry(model).thresholds:
            thresholds.update(get_model_entry(model).thresholds)  # the shipped weights' calibrated defaults
        if bundle is not None:
            from samantic.runtime import Bundle

            if head is not None or checkpoint is not None:
                raise ValueError("--bundle brings its own weights and head; leave out --head/--checkpoint")
            bundle_info = Bundle.load(bundle, verify=False)  # verified once, by from_bundle
            thresholds.update({k: v for k, v in bundle_info.thresholds.items() if k in thresholds})
            if classes is not None and bundle_info.samcp:
                from samantic.pipeline.panoptic import check_names

                sc = bundle_info.samcp
                check_names(list(sc["classes"]) + list(sc["stuff"]), [n.strip() for n in classes.split(",") if n.strip()],
                            f"the SAM-CP head of {bundle}")
        trained = {}
        if samcp_head is not None:  # the patches the head was trained on: its grid and thresholds
            trained = patch_options(samcp_head.info)
        elif bundle is not None and bundle_info.samcp:
            trained = dict(bundle_info.samcp.get("patches") or {})
        thresholds.update({k: v for k, v in trained.items() if k in thresholds})
        if points_per_side is None:
            points_per_side = int(trained.get("points_per_side", 32))
        if pred_iou_thresh is not None:
            thresholds["pred_iou_thresh"] = pred_iou_thresh
        if stability_score_thresh is not None:
            thresholds["stability_score_thresh"] = stability_score_thresh
        config = AmgConfig(
            points_per_side=points_per_side, points_per_batch=points_per_batch, **thresholds,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh, crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio, crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            min_mask_region_area=min_mask_region_area, output_mode="coco_rle", adaptive=adaptive,
            **({"adaptive_margin": adaptive_margin} if adaptive_margin is not None else {}), device=device,
            task=task.value,
        )
        if bundle is not None:
            wanted = classes
            if bundle_info.samcp and classes is not None:
                wanted = [n.strip() for n in classes.split(",") if n.strip()]
            segmenter = Segmenter.from_bundle(bundle_info, backend=backend, precision=precision, classes=wanted,
                                              score_thresh=score_thresh, config=config)
            model = bundle_info.model_id
            weights = f"bundle {bundle}, {segmenter.engine.name} {precision}"
        else:
            from samantic.models import create_model, get_model_entry

            head_module = None
            if head is not None:
                from samantic.heads.usam import load_head

                head_module = load_head(head)
            sam = create_model(model, checkpoint=checkpoint)
            table = getattr(sam, "task_prompt", None)
            if task is not Task.unspecified and (table is None or not table.embed.weight.any()):
                typer.echo(f"note: {model} ({checkpoint or 'shipped weights'}) has no trained task embeddings: "
                           f"--task {task.value} gives the masks of --task unspecified", err=True)
            if head_module is not None:
                head_module.check_model(sam, model, head)
            if samcp_head is not None:
                wanted = [n.strip() for n in classes.split(",") if n.strip()] if classes is not None else None
                segmenter = Segmenter(sam, samcp=samcp_head, classes=wanted, config=config,
                                      samcp_options={} if score_thresh is None else {"score_thresh": score_thresh})
            else:
                segmenter = Segmenter(sam, head_module, classes=classes, score_thresh=score_thresh, config=config)
            if checkpoint:
                weights = checkpoint
            elif get_model_entry(model).default_weights:
                weights = "shipped weights"
            else:
                weights = "RANDOM weights: no trained weights are shipped for this model, pass --checkpoint"
                typer.echo(f"warning: {model} has no trained weights; its masks will be meaningless (pass --checkpoint)",
                           err=True)
    except (ValueError, FileNotFoundError, ImportError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    names = segmenter.names
    head_name = samcp if samcp is not None else (head if head is not None else (bundle if names else None))
    panoptic = segmenter.samcp is not None
    run_extra = {"bundle": str(bundle), "backend": segmenter.engine.name} if bundle is not None else {}
    console.print(f"model {model} ({escape(str(weights))}), {points_per_side}x{points_per_side} points, "
                  f"pred_iou_thresh {config.pred_iou_thresh}, stability_score_thresh {config.stability_score_thresh}"
                  + (f", adaptive prompting (margin {config.adaptive_margin})" if adaptive else "")
                  + (f", task {config.task}" if task is not Task.unspecified else "")
                  + (f", classes {','.join(names)} ({escape(str(head_name))})" if names else "")
                  + (f"; {escape(stream.label)} -> {out}" if stream is not None else f"; {len(jobs)} image(s) -> {out}"))
    if stream is not None:
        from samantic.cli.stream import run_stream

        info = {"model": model, "checkpoint": checkpoint, "weights": str(weights),
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
                "settings": {k: v for k, v in vars(config).items() if k != "point_grids"}}
        if head_name is not None:
            info["head"] = str(head_name)
        raise typer.Exit(run_stream(stream, capture, segmenter, out, overlay_video=overlay_video,
                                    queue_size=queue_size, max_frames=max_frames, progress=progress, info=info))

    done = skipped = n_masks = 0
    seconds = 0.0
    warnings: List[Tuple[str, str]] = []
    columns = [TextColumn("segment"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[name]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    try:
        with Progress(*columns, console=err, disable=not progress) as bar:
            row = bar.add_task("segment", total=len(jobs), name="")
            for job in jobs:
                bar.update(row, name=job.name)
                result_path = out / f"{job.name}.json"
                if result_path.exists() and not overwrite:
                    skipped += 1
                    bar.advance(row)
                    continue
                notes: List[str] = []
                try:
                    image = read_image(job.source, notes=notes)
                except ImageReadError as e:
                    failures.append((str(job.source), str(e).split(": ", 1)[-1]))
                    bar.advance(row)
                    continue
                warnings.extend((str(job.source), n) for n in notes)
                t0 = time.perf_counter()
                result = segmenter(image)
                records = result.instances
                seconds += time.perf_counter() - t0
                h, w = image.shape[:2]
                if panoptic:
                    write_samcp_outputs(out, job, image, result, model, checkpoint, head_name, config, extra=run_extra)
                    done += 1
                    n_masks += len(records)
                    bar.advance(row)
                    continue
                # step: overlay and mask PNGs first, the results JSON last (it marks the image as done)
                masks = rle_decode(result.masks.rles) if records else None  # the batch, not the records' strings
                labels = [r["category"] for r in records] if names else None
                if masks is not None:
                    atomic_write_image(out / f"{job.name}.overlay.png", overlay_masks(image, masks, labels))
                else:
                    atomic_write_image(out / f"{job.name}.overlay.png", image)
                if names:
                    write_label_png(out / f"{job.name}.semantic.png", result.semantic_map)
                if mask_pngs and masks is not None:
                    write_mask_pngs(out / f"{job.name}.masks", masks, records)
                extra = {"bundle": str(bundle), "backend": segmenter.engine.name} if bundle is not None else {}
                if names:
                    extra.update(head=str(head_name), categories=[{"id": i + 1, "name": n} for i, n in enumerate(names)])
                    for r in records:
                        r["score"] = r["class_score"]
                write_results_json(result_path, {"file_name": str(job.source), "height": h, "width": w},
                                   coco_results(records), model=model, checkpoint=checkpoint,
                                   settings={k: v for k, v in vars(config).items() if k != "point_grids"}, **extra)
                done += 1
                n_masks += len(records)
                bar.advance(row)
    except KeyboardInterrupt:
        err.print(f"interrupted: {done} image(s) finished and saved in {out}; run again to continue")
        raise typer.Exit(130)

    table = Table(title="samantic segment")
    for col in ("images", "segmented", "skipped (done before)", "failed", "segments" if panoptic else "masks", "s / image"):
        table.add_column(col)
    table.add_row(str(len(jobs) + len(missing)), str(done), str(skipped), str(len(failures)), str(n_masks),
                  f"{seconds / done:.2f}" if done else "-")
    console.print(table)
    if done or skipped:
        if panoptic:
            console.print(f"results in {out}/ (NAME.json: COCO results with category names and RLE masks; "
                          "NAME.semantic.png: VOC-palette label map, 0 = unlabelled, k = category k; NAME.panoptic.png + "
                          "NAME.panoptic.json: COCO panoptic; NAME.overlay.png)")
        else:
            console.print(f"results in {out}/ (NAME.json: COCO results with RLE masks; NAME.overlay.png"
                          + ("; NAME.semantic.png: label map, 0 = background, k = category k)" if names else ")"))
    if done and not n_masks and not names:
        # a silent empty result is the most confusing outcome for a new user: say which filter to loosen
        typer.echo(f"note: no masks kept in {done} image(s): the filters (--pred-iou-thresh {config.pred_iou_thresh}, "
                   f"--stability-score-thresh {config.stability_score_thresh}) removed every mask; lower them to "
                   "keep less confident masks.", err=True)
    # one unwrapped line per file, so scripts can grep them
    for path, note in warnings:
        typer.echo(f"note: {path}: {note}", err=True)
    for path, reason in failures:
        typer.echo(f"failed: {path}: {reason}", err=True)
    if failures:
        raise typer.Exit(1)


def write_samcp_outputs(out: Path, job: Job, image, result, model: str, checkpoint: Optional[str], samcp: Path,
                        config, extra: Optional[dict] = None) -> None:
    """A SAM-CP result's files; the results JSON is written last (it marks the image as done)."""
    from samantic.io import atomic_write_image
    from samantic.io.panoptic import write_panoptic, write_semantic_png
    from samantic.io.writers import write_results_json

    h, w = image.shape[:2]
    things = result.output.things
    categories = [{"id": i + 1, "name": n, "isthing": int(i < things), "supercategory": "thing" if i < things else "stuff"}
                  for i, n in enumerate(result.names)]
    atomic_write_image(out / f"{job.name}.overlay.png", result.overlay())
    write_semantic_png(out / f"{job.name}.semantic.png", result.semantic_map)
    png = out / f"{job.name}.panoptic.png"
    write_panoptic(png, out / f"{job.name}.panoptic.json", result.panoptic_map, result.segments_info,
                   {"id": 1, "file_name": str(job.source), "height": h, "width": w}, categories)
    write_results_json(out / f"{job.name}.json", {"file_name": str(job.source), "height": h, "width": w},
                       result.to_coco(), model=model, checkpoint=checkpoint, samcp=str(samcp), categories=categories,
                       settings={k: v for k, v in vars(config).items() if k != "point_grids"}, **(extra or {}))
