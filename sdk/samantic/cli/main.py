"""Builds the ``samantic`` Typer app from one module per command group."""

from __future__ import annotations

import typer

from samantic.cli import data as _data
from samantic.cli import demo as _demo
from samantic.cli import doctor as _doctor
from samantic.cli import eval as _eval
from samantic.cli import export as _export
from samantic.cli import samcp as _samcp
from samantic.cli import segment as _segment
from samantic.cli import train as _train
from samantic.cli import weights as _weights

app = typer.Typer(
    name="samantic",
    help="Segment images by class names with Segment Anything.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("doctor", help="Versions, compiled kernel backends and what is usable now.")(_doctor.doctor)
app.command("segment", help="Segment everything in images, folders or globs, or in a video file, camera or stream.")(_segment.segment)
app.command("demo", help="Run the embedded default on the bundled demo image.")(_demo.demo)
app.add_typer(_data.app, name="data", help="Datasets: the procedural shapes world.")
app.add_typer(_eval.app, name="eval", help="Evaluate models on held-out scenes.")
app.add_typer(_export.app, name="export", help="Export bundles (ONNX), TensorRT engines, TensorRT checks.")
app.add_typer(_samcp.app, name="samcp", help="SAM-CP head files: tune inference thresholds, add class names to an open-vocabulary head.")
app.add_typer(_train.app, name="train", help="Train SAM and samantic's heads.")
app.add_typer(_weights.app, name="weights", help="Registered models and official SAM checkpoints: list, download, verify.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
