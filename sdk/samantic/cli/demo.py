"""``samantic demo``: the embedded default, runnable on any machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def demo(
    out: Annotated[Path, typer.Option(help="Directory for the COCO results JSON and the overlay PNG.")] = Path("runs/demo"),
    image: Annotated[Optional[Path], typer.Option(help="Image to use instead of the bundled demo scene.")] = None,
) -> None:
    from samantic.demo import run
    from samantic.io import ImageReadError

    try:
        r = run(out, image)
    except ImageReadError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(f"image: {r.image}" + ("" if image else " (bundled demo scene)"))
    typer.echo(f"masks: {r.n_masks} in {r.seconds * 1000:.1f} ms (kernel post-processing + NMS)")
    typer.echo(f"saved: {r.results_json} (COCO results, RLE) and {r.overlay}")
