"""``samantic data``: procedural datasets (the shapes world), written as COCO; SAM-CP's patch cache."""

from __future__ import annotations

import json
import time
from collections import Counter
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Procedural datasets (the shapes world) and SAM-CP's patch cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_out = Console()
_err = Console(stderr=True)

DEFAULT_N = 100
DEFAULT_SEED = 0


class Kind(str, Enum):
    single = "single"
    scenes = "scenes"
    panoptic = "panoptic"


@app.callback()
def data() -> None:
    """Procedural datasets (the shapes world) and SAM-CP's patch cache."""
    # A callback keeps ``shapes`` a sub-command even while it is the group's only one.


def _fail(error: BaseException) -> NoReturn:
    _err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command("shapes")
def shapes_cmd(
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to write (created if missing).")],
    kind: Annotated[
        Optional[Kind],
        typer.Option(
            "--kind",
            help="single: one object per image (U-SAM training data); scenes: 0-8 overlapping objects "
            "with distractor blobs; panoptic: v2 scenes with stuff regions, composite things with parts and "
            "one salient thing (COCO panoptic + instance, part, entity and salient masks). Default: scenes.",
        ),
    ] = None,
    classes: Annotated[
        Optional[str],
        typer.Option(
            "--classes", help='Comma-separated class names, e.g. "circle,ring" (single, scenes). Default: all.'
        ),
    ] = None,
    n: Annotated[Optional[int], typer.Option("--n", help=f"Number of images in total. Default: {DEFAULT_N}.")] = None,
    seed: Annotated[
        Optional[int], typer.Option("--seed", help=f"Base seed; image i uses seed + i. Default: {DEFAULT_SEED}.")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Render shapes-world images and write them as a COCO dataset (RLE masks; semantic or panoptic PNGs)."""
    if n is not None and n < 1:
        raise typer.BadParameter(f"must be at least 1, got {n}", param_hint="--n")
    if seed is not None and seed < 0:
        raise typer.BadParameter(f"must be non-negative, got {seed}", param_hint="--seed")
    if kind is Kind.panoptic and classes is not None:
        raise typer.BadParameter("panoptic scenes always use all classes; drop --classes", param_hint="--classes")
    from samantic.train.data import shapes as sdk

    defaults = []
    if kind is None:
        kind = Kind.scenes
        defaults.append(f"--kind {kind.value}")
    if n is None:
        n = DEFAULT_N
        defaults.append(f"--n {n}")
    if seed is None:
        seed = DEFAULT_SEED
        defaults.append(f"--seed {seed}")
    if kind is Kind.panoptic:
        _panoptic(out, n, seed, progress, defaults)
        return
    try:
        if classes is None:
            names = sdk.CLASSES
            defaults.append("--classes " + ",".join(names))
        else:
            names = sdk.check_classes(classes)
        if defaults:
            _err.print("defaults used: " + "  ".join(defaults), highlight=False, soft_wrap=True)
        start = time.perf_counter()
        path = sdk.make_dataset(out, kind.value, names, n, seed, progress=progress)
    except (ValueError, OSError) as e:
        _fail(e)
    _summary(path, kind.value, seed, time.perf_counter() - start)


def _summary(path: Path, kind: str, seed: int, seconds: float) -> None:
    dataset = json.loads(path.read_text())
    images, annotations = dataset["images"], dataset["annotations"]
    per_category = Counter(a["category_id"] for a in annotations)
    heights = [im["height"] for im in images]
    widths = [im["width"] for im in images]
    table = Table(title=f"shapes dataset ({kind})")
    table.add_column("class")
    table.add_column("superclass")
    table.add_column("instances", justify="right")
    for category in dataset["categories"]:
        table.add_row(category["name"], category["supercategory"], str(per_category[category["id"]]))
    table.add_row("[bold]total[/bold]", "", f"[bold]{len(annotations)}[/bold]")
    _out.print(table)
    _out.print(
        f"{len(images)} images (height {min(heights)}-{max(heights)}, width {min(widths)}-{max(widths)}), "
        f"{len(annotations)} instances, seeds {seed}-{seed + len(images) - 1}, "
        f"{seconds:.1f} s ({seconds / len(images) * 1000:.0f} ms/image)",
        highlight=False,
        soft_wrap=True,
    )
    _out.print(
        f"saved: {path} (COCO, RLE masks) with images/, semantic/ and superclass/ beside it",
        highlight=False,
        soft_wrap=True,
    )


def _panoptic(out: Path, n: int, seed: int, progress: bool, defaults: list) -> None:
    from samantic.train.data import panoptic as sdk

    if defaults:
        _err.print("defaults used: " + "  ".join(defaults), highlight=False, soft_wrap=True)
    try:
        start = time.perf_counter()
        path = sdk.make_panoptic_dataset(out, n, seed, progress=progress)
    except (ValueError, OSError) as e:
        _fail(e)
    seconds = time.perf_counter() - start
    dataset = json.loads(path.read_text())
    images = dataset["images"]
    per_category = Counter(s["category_id"] for a in dataset["annotations"] for s in a["segments_info"])
    parts = json.loads((path.parent / "parts.json").read_text())["annotations"]
    per_part = Counter(p["category_id"] for p in parts)
    table = Table(title="shapes dataset (panoptic)")
    table.add_column("id", justify="right")
    table.add_column("category")
    table.add_column("supercategory")
    table.add_column("segments", justify="right")
    for category in dataset["categories"]:
        count = per_category[category["id"]]
        table.add_row(str(category["id"]), category["name"], category["supercategory"], str(count))
    for category in sdk.PART_CATEGORIES:
        count = per_part[category["id"]]
        table.add_row(f"part {category['id']}", category["name"], category["supercategory"], str(count))
    table.add_row("", "[bold]total[/bold]", "", f"[bold]{sum(per_category.values())}[/bold]")
    _out.print(table)
    things = sum(v for k, v in per_category.items() if k <= len(sdk.THING_CLASSES))
    _out.print(
        f"{len(images)} images, {things} things ({len(images)} salient), "
        f"{sum(per_category.values()) - things} stuff regions, {len(parts)} parts, "
        f"seeds {seed}-{seed + len(images) - 1}, {seconds:.1f} s ({seconds / len(images) * 1000:.0f} ms/image)",
        highlight=False,
        soft_wrap=True,
    )
    _out.print(
        f"saved: {path} (COCO panoptic, PNGs in panoptic/) with instances.json, parts.json, entities.json, "
        "salient.json (RLE masks) and images/ beside it",
        highlight=False,
        soft_wrap=True,
    )


@app.command("patches")
def patches_cmd(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Panoptic dataset DIR (from `samantic data shapes --kind panoptic`), shapes-panoptic:SEED[:N] "
            "to render N v2 scenes on the fly (default N 100), shapes:SEED[:N] for N v1 scenes (things only), "
            "or several joined by commas.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Cache root; entries go to OUT/<model key>/<image sha256>.npz.")],
    model: Annotated[Optional[str], typer.Option("--model", help="Registered SAM. Default: sam_nano.")] = None,
    checkpoint: Annotated[
        Optional[str], typer.Option("--checkpoint", help="Weights file or tag (default: the model's shipped weights).")
    ] = None,
    points_per_side: Annotated[
        Optional[int], typer.Option("--points-per-side", help="Prompt grid side. Default: 32.")
    ] = None,
    pred_iou_thresh: Annotated[
        Optional[float],
        typer.Option("--pred-iou-thresh", help="Keep patches with predicted IoU at least this. Default: the model's."),
    ] = None,
    stability_score_thresh: Annotated[
        Optional[float],
        typer.Option(
            "--stability-score-thresh", help="Keep patches with stability at least this. Default: the model's."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Cache SAM's grid-prompted patches of a panoptic dataset and their overlaps with its segments (SAM-CP)."""
    if points_per_side is not None and points_per_side < 1:
        raise typer.BadParameter(f"must be at least 1, got {points_per_side}", param_hint="--points-per-side")
    for value, hint in ((pred_iou_thresh, "--pred-iou-thresh"), (stability_score_thresh, "--stability-score-thresh")):
        if value is not None and not 0.0 <= value <= 1.0:
            raise typer.BadParameter(f"must be in [0, 1], got {value}", param_hint=hint)
    from samantic.models import create_model
    from samantic.train import samcp_cache as sdk

    defaults = []
    if model is None:
        model = "sam_nano"
        defaults.append(f"--model {model}")
    if points_per_side is None:
        points_per_side = 32
        defaults.append(f"--points-per-side {points_per_side}")
    try:
        dataset = sdk.open_panoptic(data)
        sam = create_model(model, checkpoint=checkpoint)
        cache = sdk.PatchCache(out, sam, points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                               stability_score_thresh=stability_score_thresh, checkpoint=checkpoint)
    except (ValueError, OSError, ImportError) as e:
        _fail(e)
    meta = cache.metadata
    if pred_iou_thresh is None:
        defaults.append(f"--pred-iou-thresh {meta['pred_iou_thresh']:g} (the model's)")
    if stability_score_thresh is None:
        defaults.append(f"--stability-score-thresh {meta['stability_score_thresh']:g} (the model's)")
    if "," not in data and data.startswith((sdk.STREAM_PREFIX, sdk.V1_STREAM_PREFIX)) and data.count(":") == 1:
        defaults.append(f"N {len(dataset)}")
    _err.print("defaults used: " + "  ".join(defaults), highlight=False, soft_wrap=True)

    def report_error(source: str, reason: str) -> None:
        _err.print(f"[red]error:[/red] skipped {source}: {reason}", highlight=False, soft_wrap=True)

    try:
        report = sdk.build_patch_cache(
            sam, dataset, out, points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh, checkpoint=checkpoint, progress=progress,
            on_error=report_error,
        )
    except (ValueError, OSError) as e:
        _fail(e)
    done = report.computed + report.reused
    table = Table(title=f"SAM-CP patch cache ({report.key})")
    table.add_column("images", justify="right")
    table.add_column("computed", justify="right")
    table.add_column("reused", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("patches", justify="right")
    table.add_column("per image", justify="right")
    table.add_row(str(len(dataset)), str(report.computed), str(report.reused), str(len(report.failed)),
                  str(report.patches), f"{report.patches / max(done, 1):.1f}")
    _out.print(table)
    _out.print(
        f"model {meta['model']} (weights sha256 {meta['weights_sha256'][:16]}), grid {meta['grid']}, "
        f"pred_iou_thresh {meta['pred_iou_thresh']:g}, stability_score_thresh {meta['stability_score_thresh']:g}, "
        f"{report.seconds:.1f} s",
        highlight=False,
        soft_wrap=True,
    )
    entries = "entry" if done == 1 else "entries"
    _out.print(f"saved: {report.dir} ({done} {entries}, metadata in meta.json)", highlight=False, soft_wrap=True)
    if report.failed:
        _err.print(f"[red]error:[/red] {len(report.failed)} of {len(dataset)} images failed: "
                   + ", ".join(source for source, _ in report.failed), highlight=False, soft_wrap=True)
        raise typer.Exit(1)
