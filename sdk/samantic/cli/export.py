"""``samantic export``: bundles (ONNX + manifest), TensorRT engines, TensorRT blocker checks."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, List, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Export bundles for the runtime: ONNX graphs, manifest, TensorRT engines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_out = Console()
_err = Console(stderr=True)


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


def _fail(error: BaseException) -> NoReturn:
    from rich.markup import escape

    _err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _human(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} KB"


@app.command("bundle")
def bundle(
    model: Annotated[str, typer.Option(help="Registered model (see `samantic weights list`).")] = "sam_nano",
    out: Annotated[Path, typer.Option(help="Bundle directory to write.")] = Path("bundle"),
    checkpoint: Annotated[Optional[str], typer.Option(help="Weights file or tag (default: the model's shipped weights).")] = None,
    head: Annotated[Optional[Path], typer.Option(help="Semantic head (.safetensors) to put into the prompt graph.")] = None,
    samcp: Annotated[Optional[Path], typer.Option(help="SAM-CP head (.safetensors from `samantic train samcp`): adds "
                                                       "its backbone, patch-encoder and decoder graphs, class "
                                                       "queries and vocabulary; segment-everything defaults to the "
                                                       "patches it was trained on.")] = None,
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="Also write onnxruntime dynamic-INT8 graphs.")] = True,
    torch_weights: Annotated[bool, typer.Option("--torch-weights", help="Also store the SAM weights (backend='torch').")] = False,
    max_prompts: Annotated[int, typer.Option(min=1, help="Largest prompt batch of the TensorRT profiles.")] = 128,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle in --out.")] = False,
) -> None:
    """Export a model (and head) to a bundle directory: ONNX graphs + manifest.json with SHA-256 of every file."""
    from samantic.export.bundle import export_bundle
    from samantic.runtime.bundle import Bundle, BundleError

    if head is not None and not head.is_file():
        raise typer.BadParameter(f"{head}: no such head file", param_hint="--head")
    if samcp is not None and not samcp.is_file():
        raise typer.BadParameter(f"{samcp}: no such SAM-CP head file", param_hint="--samcp")
    if head is not None and samcp is not None:
        raise typer.BadParameter("give --head (U-SAM) or --samcp (SAM-CP), not both", param_hint="--samcp")
    try:
        path = export_bundle(model, out, checkpoint=checkpoint, head=head, int8=int8, torch_weights=torch_weights,
                             max_prompts=max_prompts, overwrite=overwrite, samcp=samcp)
        loaded = Bundle.load(path)
    except (ValueError, FileNotFoundError, ImportError, BundleError, OSError) as e:
        _fail(e)
    if checkpoint is None:
        _err.print(f"note: no --checkpoint: {model} was exported with its default weights (random if none are shipped)")
    table = Table(title=f"bundle {path}")
    for col in ("file", "size", "sha256"):
        table.add_column(col)
    for rel, entry in loaded.manifest["files"].items():
        table.add_row(rel, _human(entry["size"]), entry["sha256"][:16] + "…")
    _out.print(table)
    head_txt = f", head classes {', '.join(loaded.head['classes'])}" if loaded.head else ""
    if loaded.samcp:
        sc = loaded.samcp
        head_txt = (f", SAM-CP things {', '.join(sc['classes'])}" + (f"; stuff {', '.join(sc['stuff'])}" if sc['stuff']
                                                                     else ""))
    _out.print(f"model {model}, input {loaded.img_size}px, opset {loaded.manifest['onnx']['opset']}{head_txt}; "
               f"saved to {path}", soft_wrap=True)


@app.command("trt")
def trt(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (engines are added to it).")],
    precision: Annotated[Precision, typer.Option(help="Engine precision.")] = Precision.fp16,
    timing_cache: Annotated[Optional[Path], typer.Option(help="Timing cache file, read and updated.")] = None,
    workspace_mb: Annotated[int, typer.Option(min=64, help="Builder workspace limit (MB).")] = 2048,
    calib_images: Annotated[Optional[List[Path]], typer.Option(help="INT8 calibration images (TensorRT 10).")] = None,
    device: Annotated[int, typer.Option(min=0, help="CUDA device index.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if engines for this GPU/TensorRT/precision exist.")] = False,
) -> None:
    """Build TensorRT engines for this GPU, TensorRT version and precision into the bundle."""
    from samantic.export.tensorrt import build_engines
    from samantic.runtime.bundle import BundleError

    images = []
    if calib_images:
        from samantic.io import ImageReadError, read_image

        try:
            images = [read_image(p) for p in calib_images]
        except (ImageReadError, OSError) as e:
            _fail(e)
    try:
        entry = build_engines(bundle, precision.value, timing_cache=timing_cache, workspace_mb=workspace_mb,
                              calib_images=images, device=device, force=force)
    except (ImportError, RuntimeError, ValueError, BundleError, OSError) as e:
        _fail(e)
    _out.print(f"engines {entry['key']} in {bundle}: {', '.join(entry['files'].values())}", soft_wrap=True)


@app.command("check-trt")
def check_trt(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    include_int8: Annotated[bool, typer.Option("--include-int8", help="Also check the onnxruntime INT8 graphs.")] = False,
) -> None:
    """Inspect the bundle's ONNX graphs on the CPU for TensorRT blockers; exit 1 if any error is found.

    Also says what it found: the prompts graph's dynamic prompt axis, shape-tensor
    inputs (TensorRT needs INT32) and the ops that fp16 engines keep in FP32.
    """
    from rich.markup import escape

    from samantic.export.tensorrt import check_trt as run_check
    from samantic.runtime.bundle import BundleError

    try:
        findings = run_check(bundle, ("fp32", "int8") if include_int8 else ("fp32",))
    except (BundleError, ImportError, OSError) as e:
        _fail(e)
    found = [f for f in findings if f.severity == "info"]
    problems = [f for f in findings if f.severity != "info"]
    errors = [f for f in problems if f.severity == "error"]
    if found:
        _out.print(f"TensorRT check of {bundle}:", soft_wrap=True)
        for f in found:
            _out.print(escape(f"  {f.graph}: {f.message}"), soft_wrap=True, highlight=False)
    if not problems:
        _out.print(f"{bundle}: no TensorRT blockers found", soft_wrap=True)
        return
    table = Table(title=f"TensorRT blockers in {bundle}")
    for col in ("severity", "graph", "kind", "problem"):
        table.add_column(col)
    for f in problems:
        table.add_row(f.severity, f.graph, f.kind, escape(f.message))
    _out.print(table)
    _out.print(f"{len(errors)} error(s), {len(problems) - len(errors)} warning(s)")
    if errors:
        raise typer.Exit(1)
