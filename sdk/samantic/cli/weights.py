"""``samantic weights``: list, download and verify the official SAM checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from samantic.models import weights as sdk
from samantic.models.loading import PACKAGE_PREFIX

app = typer.Typer(
    help="Registered models and official SAM checkpoints: list, download, verify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_out = Console()
_err = Console(stderr=True)

# What the SDK raises for bad input, bad files or network trouble: one line, exit 1.
_SDK_ERRORS = (ValueError, FileNotFoundError, sdk.DownloadError, OSError)


def _fail(error: BaseException) -> NoReturn:
    _err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


@app.command("list")
def list_cmd(
    dest: Annotated[
        Optional[Path], typer.Option("--dest", help="Folder to look in instead of the cache.")
    ] = None,
) -> None:
    """Show the registered models (the names `--model` takes) and every known checkpoint, cached or not."""
    _out.print(_models_table())
    folder = dest if dest is not None else sdk.weights_dir()
    table = Table(title="SAM checkpoints", caption=f"cache: {folder}")
    for column in ("tag", "model", "file", "size", "cached"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for spec in sdk.list_weights():
        cached = sdk.cached_path(spec, folder) is not None
        table.add_row(
            spec.tag,
            spec.model,
            spec.filename,
            _human(spec.size),
            "[green]yes[/green]" if cached else "no",
        )
    _out.print(table)


def _models_table() -> Table:
    """The registry: each model's weights (shipped in the package, a download, or none) and the
    segment-everything thresholds used when a command is given none."""
    from samantic.models import get_model_entry, list_models, list_weights
    from samantic.models.registry import SAM_BOX_NMS, SAM_THRESHOLDS

    table = Table(title="Models (--model)", caption="default thresholds: pred_iou_thresh / stability_score_thresh / box_nms_thresh")
    for column in ("model", "weights", "default thresholds", "description"):
        table.add_column(column)
    for name in list_models():
        entry = get_model_entry(name)
        tags = [spec.tag for spec in list_weights(model=name)]
        if entry.default_weights and entry.default_weights.startswith(PACKAGE_PREFIX):
            weights = "shipped"
        elif entry.default_weights:
            weights = entry.default_weights
        elif tags:
            weights = f"download: {', '.join(tags)}"
        else:
            weights = "none (architecture only)"
        thresholds = entry.thresholds or SAM_THRESHOLDS
        table.add_row(name, weights, f"{thresholds['pred_iou_thresh']:g} / {thresholds['stability_score_thresh']:g}"
                      f" / {thresholds.get('box_nms_thresh', SAM_BOX_NMS):g}", entry.description)
    return table


@app.command("download")
def download_cmd(
    name: Annotated[str, typer.Argument(help='Weight tag ("sam_vit_b.sa1b") or model name ("sam_vit_b").')],
    dest: Annotated[
        Optional[Path], typer.Option("--dest", help="Target folder (default: the samantic cache).")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Download a checkpoint (resuming a partial one), verify its SHA-256, print its path."""
    try:
        spec = sdk.get_weight(name)
        if dest is None:
            _err.print(f"no --dest given: using the cache {sdk.weights_dir()}", highlight=False)
        path = sdk.download(spec, dest_dir=dest, progress=progress)
    except _SDK_ERRORS as e:
        _fail(e)
    _err.print(f"{spec.tag}: verified, saved to", highlight=False)
    _out.print(str(path), highlight=False, soft_wrap=True)


@app.command("verify")
def verify_cmd(
    path: Annotated[Path, typer.Argument(help="Checkpoint file to check.")],
    tag: Annotated[
        Optional[str],
        typer.Option("--tag", help="Weight tag, model name or SHA-256 to check against (default: by file name)."),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Check a file's size and full SHA-256; exit 1 if it does not match."""
    try:
        result = sdk.verify(path, tag, progress=progress)
    except _SDK_ERRORS as e:
        _fail(e)
    against = result.tag or "the given sha256"
    if result:
        _out.print(f"OK {path} matches {against} (sha256 {result.sha256})", highlight=False, soft_wrap=True)
        return
    _err.print(f"[red]FAILED[/red] {path} does not match {against}: {result.reason}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)
