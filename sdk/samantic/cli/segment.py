"""``samantic segment``: segment files, folders and globs; results per image, resumable."""

from __future__ import annotations

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


# the per-image work lives in samantic.batch (shared with the Ray engine); these names stay importable here
from samantic.batch import Job, collect_inputs, write_samcp_outputs  # noqa: E402,F401


class Engine(str, Enum):
    local = "local"
    ray = "ray"


def segment(
    paths: Annotated[Optional[List[str]], typer.Argument(help="Image files, folders (searched recursively) or glob patterns; or one video file (.mp4, .avi, .mov, .mkv, .webm, ...) or stream URL (rtsp://, http(s)://...m3u8, ...).", show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="Output folder: NAME.json (COCO results, RLE) and NAME.overlay.png per image; with --head also NAME.semantic.png; with --samcp also NAME.semantic.png, NAME.panoptic.png and NAME.panoptic.json (COCO panoptic). For a video, camera or stream: NAME.jsonl (a line per frame) and NAME.summary.json.")] = ...,
    model: Annotated[Optional[str], typer.Option(help="Registered model (see `samantic weights list`). \\[default: sam_nano, or the SAM a --samcp head was trained on]", show_default=False)] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Weights file or tag (default: the model's shipped weights).")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="Run an exported bundle (`samantic export bundle`) instead of --model: no torch needed with the onnxruntime backend.")] = None,
    backend: Annotated[str, typer.Option(help="With --bundle: auto, onnxruntime, tensorrt or torch.")] = "auto",
    precision: Annotated[str, typer.Option(help="With --bundle: fp32, int8 (onnxruntime dynamic INT8 / TensorRT) or fp16 (TensorRT).")] = "fp32",
    points_per_side: Annotated[Optional[int], typer.Option(min=1, help="\\[default: 32, or the grid a --samcp head was trained with]")] = None,
    points_per_batch: Annotated[int, typer.Option(min=1, help="Prompts decoded together (memory against speed; the masks are the same).")] = 64,
    pred_iou_thresh: Annotated[Optional[float], typer.Option(help="\\[default: the model's recommended (`samantic weights list` shows them), the bundle's, or segment-anything's 0.88]")] = None,
    stability_score_thresh: Annotated[Optional[float], typer.Option(help="\\[default: the model's recommended, the bundle's, or segment-anything's 0.95]")] = None,
    stability_score_offset: Annotated[float, typer.Option(min=0.0, help="Logit offset of the stability score (segment-everything's stability_score_offset).")] = 1.0,
    box_nms_thresh: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Box IoU above which the lower-scored of two masks is dropped \\[default: the model's recommended, the bundle's, or segment-anything's 0.7].")] = None,
    crop_n_layers: Annotated[int, typer.Option(min=0, help="Also segment crops of the image, in this many layers (0: whole image only).")] = 0,
    crop_nms_thresh: Annotated[float, typer.Option(min=0.0, max=1.0, help="Box IoU for the NMS between masks of different crops.")] = 0.7,
    crop_overlap_ratio: Annotated[float, typer.Option(min=0.0, help="Overlap of neighbouring crops, as a fraction of the crop size.")] = 512 / 1500,
    crop_n_points_downscale_factor: Annotated[int, typer.Option(min=1, help="Crop layer n is prompted by points_per_side / factor**n points per side.")] = 1,
    min_mask_region_area: Annotated[int, typer.Option(min=0, help="Remove holes and islands smaller than this many pixels (0: off).")] = 0,
    task: Annotated[Task, typer.Option(help="SUM's task prompt: which granularity of mask every point asks for (salient object, entity or part; unspecified: SAM's behaviour). Models without trained task embeddings give the same masks for every task; bundles exported before task prompts run unspecified only.")] = Task.unspecified,
    classes: Annotated[Optional[str], typer.Option(help="Segment only these class names (needs --head or --samcp), e.g. 'circle,star'; group names of a U-SAM head work too.")] = None,
    head: Annotated[Optional[Path], typer.Option(help="U-SAM head file (from `samantic train usam`): masks get class names.")] = None,
    score_thresh: Annotated[Optional[float], typer.Option(help="Minimum class probability (default: the head's; with --samcp 0.3).")] = None,
    samcp: Annotated[Optional[Path], typer.Option(help="SAM-CP head file (from `samantic train samcp`): SAM's patches labelled and merged into named instances, stuff regions and a panoptic map.")] = None,
    adaptive: Annotated[bool, typer.Option("--adaptive", help="Prompt coarse to fine: refine only around points whose masks came close to --pred-iou-thresh, skip points inside confident masks (faster, not exact).")] = False,
    adaptive_margin: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="With --adaptive: how far below --pred-iou-thresh a coarse point's best predicted IoU may lie and still get its neighbours prompted. \\[default: 0.15]")] = None,
    mask_pngs: Annotated[bool, typer.Option("--mask-pngs", help="Also write NAME.masks/ with one PNG per mask and metadata.csv.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images whose results exist.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]: where the model (torch) and the post-processing kernels run.")] = "cpu",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    camera: Annotated[Optional[int], typer.Option(help="Segment a camera (OpenCV index) instead of files.", show_default=False)] = None,
    overlay_video: Annotated[bool, typer.Option("--overlay-video", help="Video, camera or stream: also write NAME.overlay.mp4.")] = False,
    max_frames: Annotated[Optional[int], typer.Option(min=1, help="Video, camera or stream: stop after reading this many frames.", show_default=False)] = None,
    queue_size: Annotated[int, typer.Option(min=1, help="Video, camera or stream: frames queued between reading and segmenting.")] = 2,
    live: Annotated[Optional[bool], typer.Option("--live/--no-live", help="Drop the oldest queued frame when the source is faster than the model, rather than waiting. \\[default: live for cameras and stream URLs, not for video files]", show_default=False)] = None,
    engine: Annotated[Engine, typer.Option(help="Where images are segmented: local (this process) or ray (Ray Data actors, one Segmenter each; needs samantic\\[ray]). Both write the same files; ray also writes OUT/index.parquet.")] = Engine.local,
    address: Annotated[Optional[str], typer.Option(help="With --engine ray: a running cluster, 'auto' or ray://HOST:PORT. \\[default: $RAY_ADDRESS, else a local Ray started for this run]", show_default=False)] = None,
    workers: Annotated[int, typer.Option(min=1, help="With --engine ray: actors, each with its own model.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0.0, help="With --engine ray: GPUs per actor (fractions share a GPU); post-processing then runs on cuda.")] = 0.0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch / onnxruntime threads per process (with --engine ray: per actor). \\[default: the libraries' own; with ray: cores / workers]", show_default=False)] = None,
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from samantic.batch import SegmentOptions, prepare

    err = Console(stderr=True)
    console = Console()
    ray_flags = [flag for flag, given in (("--address", address is not None), ("--workers", workers != 1),
                                          ("--gpus-per-worker", gpus_per_worker != 0.0)) if given]
    if adaptive_margin is not None and not adaptive:
        raise typer.BadParameter("only means something with --adaptive", param_hint="--adaptive-margin")
    if engine is Engine.local and ray_flags:
        typer.echo(f"error: {', '.join(ray_flags)} only mean(s) something with --engine ray", err=True)
        raise typer.Exit(2)
    options = SegmentOptions(
        model=model, checkpoint=checkpoint, bundle=None if bundle is None else str(bundle), backend=backend,
        precision=precision, points_per_side=points_per_side, points_per_batch=points_per_batch,
        pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
        stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh, crop_n_layers=crop_n_layers,
        crop_nms_thresh=crop_nms_thresh, crop_overlap_ratio=crop_overlap_ratio,
        crop_n_points_downscale_factor=crop_n_points_downscale_factor, min_mask_region_area=min_mask_region_area,
        task=task.value, classes=classes, head=None if head is None else str(head), score_thresh=score_thresh,
        samcp=None if samcp is None else str(samcp), adaptive=adaptive, adaptive_margin=adaptive_margin,
        mask_pngs=mask_pngs, device=device, threads=threads)
    if engine is Engine.ray:
        if not paths or camera is not None:
            typer.echo("error: --engine ray segments image files and folders; give PATHS (videos, cameras and "
                       "streams run with --engine local)", err=True)
            raise typer.Exit(2)
        raise typer.Exit(_segment_ray(paths, out, options, overwrite=overwrite, address=address, workers=workers,
                                      gpus_per_worker=gpus_per_worker, progress=progress))

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

    try:
        prepared = prepare(options)
    except (ValueError, FileNotFoundError, ImportError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    for note in prepared.notes:
        typer.echo(note, err=True)
    segmenter, names = prepared.segmenter, prepared.names
    console.print(_banner(prepared, adaptive) + (f"; {escape(stream.label)} -> {out}" if stream is not None
                                                 else f"; {len(jobs)} image(s) -> {out}"))
    if stream is not None:
        from samantic.cli.stream import run_stream

        info = {"model": prepared.model, "checkpoint": checkpoint, "weights": str(prepared.weights),
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)], "settings": prepared.settings}
        if prepared.head_name is not None:
            info["head"] = str(prepared.head_name)
        raise typer.Exit(run_stream(stream, capture, segmenter, out, overlay_video=overlay_video,
                                    queue_size=queue_size, max_frames=max_frames, progress=progress, info=info))

    from samantic.batch import segment_file

    done = skipped = n_masks = 0
    seconds = 0.0
    warnings: List[Tuple[str, str]] = []
    try:
        with _progress_bar(err, progress) as bar, _sigterm_as_interrupt():
            row = bar.add_task("segment", total=len(jobs), name="")
            for job in jobs:
                bar.update(row, name=job.name)
                notes: List[str] = []
                rec = segment_file(prepared, out, job, overwrite=overwrite, warnings=notes)
                warnings.extend((str(job.source), n) for n in notes)
                if rec["status"] == "skipped":
                    skipped += 1
                elif rec["status"] == "failed":
                    failures.append((str(job.source), rec["error"]))
                else:
                    done += 1
                    n_masks += rec["masks"]
                    seconds += rec["seconds"]
                bar.advance(row)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {done} image(s) finished and saved in {out}; run again to continue", err=True)
        raise typer.Exit(130)

    table = Table(title="samantic segment")
    for col in ("images", "segmented", "skipped (done before)", "failed",
                "segments" if prepared.panoptic else "masks", "s / image"):
        table.add_column(col)
    table.add_row(str(len(jobs) + len(missing)), str(done), str(skipped), str(len(failures)), str(n_masks),
                  f"{seconds / done:.2f}" if done else "-")
    console.print(table)
    _report(console, prepared, out, done, skipped, n_masks, warnings, failures)
    if failures:
        raise typer.Exit(1)


def _banner(prepared, adaptive: bool) -> str:
    from rich.markup import escape

    config, names = prepared.config, prepared.classes
    return (f"model {prepared.model} ({escape(str(prepared.weights))}), {config.points_per_side}x{config.points_per_side} "
            f"points, pred_iou_thresh {config.pred_iou_thresh}, stability_score_thresh {config.stability_score_thresh}"
            + (f", adaptive prompting (margin {config.adaptive_margin})" if adaptive else "")
            + (f", task {config.task}" if config.task != "unspecified" else "")
            + (f", classes {','.join(names)} ({escape(str(prepared.head_name))})" if names else ""))


def _progress_bar(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("segment"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[name]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=not enabled)


class _sigterm_as_interrupt:
    """Inside the block SIGTERM (a scheduler, `kill`, a container stop) ends the run as Ctrl-C does: the
    image in progress is abandoned (no partial file: every write is atomic), everything finished stays."""

    def __enter__(self):
        import signal
        import threading

        self._old = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise KeyboardInterrupt

            self._old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def _report(console, prepared, out: Path, done: int, skipped: int, n_masks: int, warnings, failures) -> None:
    """Where the results are, a note when every mask was filtered out, then one line per warning and failure."""
    config = prepared.config
    if done or skipped:
        if prepared.panoptic:
            console.print(f"results in {out}/ (NAME.json: COCO results with category names and RLE masks; "
                          "NAME.semantic.png: VOC-palette label map, 0 = unlabelled, k = category k; NAME.panoptic.png + "
                          "NAME.panoptic.json: COCO panoptic; NAME.overlay.png)")
        else:
            console.print(f"results in {out}/ (NAME.json: COCO results with RLE masks; NAME.overlay.png"
                          + ("; NAME.semantic.png: label map, 0 = background, k = category k)" if prepared.names else ")"))
    if done and not n_masks and prepared.panoptic:
        typer.echo(f"note: no segments in {done} image(s): the head scored none above --score-thresh "
                   f"{prepared.segmenter.samcp.score_thresh}; lower it, or check that the images resemble what the "
                   "head was trained on.", err=True)
    if done and not n_masks and not prepared.names:
        # a silent empty result is the most confusing outcome for a new user: say which filter to loosen
        typer.echo(f"note: no masks kept in {done} image(s): the filters (--pred-iou-thresh {config.pred_iou_thresh}, "
                   f"--stability-score-thresh {config.stability_score_thresh}) removed every mask; lower them to "
                   "keep less confident masks.", err=True)
    # one unwrapped line per file, so scripts can grep them
    for path, note in warnings:
        typer.echo(f"note: {path}: {note}", err=True)
    for path, reason in failures:
        typer.echo(f"failed: {path}: {reason}", err=True)


def _segment_ray(paths: List[str], out: Path, options, *, overwrite: bool, address: Optional[str], workers: int,
                 gpus_per_worker: float, progress: bool) -> int:
    """``--engine ray``: the same files through Ray Data actors, plus OUT/index.parquet. Returns the exit code."""
    from rich.console import Console
    from rich.table import Table

    from samantic.batch import INDEX_NAME, collect_inputs, import_ray, segment_dataset

    err = Console(stderr=True)
    console = Console()
    try:
        import_ray()
    except ImportError as e:
        typer.echo(f"error: {e}", err=True)
        return 1
    jobs, missing = collect_inputs(paths)
    if not jobs:
        for path, reason in missing:
            typer.echo(f"error: {path}: {reason}", err=True)
        typer.echo("error: no images to segment", err=True)
        return 1
    try:
        import logging

        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # ours below counts images
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # (and Ray Data's note that its bars are off)
    except (ImportError, AttributeError):
        pass
    checked: List = []

    def on_checked(prepared):  # the Segmenter was built once on the driver while Ray started: options are good
        checked.append(prepared)
        for note in prepared.notes:
            typer.echo(note, err=True)
        console.print(_banner(prepared, options.adaptive) + f"; {len(jobs)} image(s) -> {out} on Ray Data, "
                      f"{workers} worker(s)" + (f", {gpus_per_worker} GPU each" if gpus_per_worker else ""))

    report = None
    try:
        with _progress_bar(err, progress) as bar, _sigterm_as_interrupt():
            row = bar.add_task("segment", total=len(jobs), name="")

            def on_row(r):
                bar.update(row, name=r["name"])
                bar.advance(row)

            report = segment_dataset(jobs, out, options, workers=workers, gpus_per_worker=gpus_per_worker,
                                     address=address, overwrite=overwrite, on_row=on_row, on_checked=on_checked)
    except KeyboardInterrupt:
        done = sum(1 for j in jobs if (out / f"{j.name}.json").exists())
        typer.echo(f"interrupted: {done} image(s) finished and saved in {out} (index: {out / INDEX_NAME}); "
                   "run again to continue", err=True)
        return 130
    except Exception as e:  # noqa: BLE001 - Ray's own errors (cluster unreachable, actors that cannot start)
        if not checked and isinstance(e, (ValueError, FileNotFoundError, ImportError)):
            typer.echo(f"error: {e}", err=True)  # the driver's check: a bad option or file, one clear error
        else:
            typer.echo(f"error: the Ray job failed: {type(e).__name__}: {e}", err=True)
        return 1
    prepared = checked[0]
    done = [r for r in report.rows if r["status"] == "ok"]
    failed = report.failed + missing  # inputs that matched nothing were never sent to Ray
    table = Table(title="samantic segment (ray)")
    for col in ("images", "segmented", "skipped (done before)", "failed", "segments" if prepared.panoptic else "masks",
                "s / image", "images / s"):
        table.add_column(col)
    seconds = sum(r["seconds"] for r in done)
    table.add_row(str(len(jobs) + len(missing)), str(len(done)), str(report.count("skipped")), str(len(failed)),
                  str(sum(r["masks"] for r in done)), f"{seconds / len(done):.2f}" if done else "-",
                  f"{len(done) / report.seconds:.2f}" if done else "-")
    console.print(table)
    _report(console, prepared, out, len(done), report.count("skipped"), sum(r["masks"] for r in done), [], failed)
    console.print(f"index: {report.index}")
    return 1 if failed else 0
