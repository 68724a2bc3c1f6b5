"""``samantic demo``: the embedded default, runnable on any machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer


def demo(
    out: Annotated[Path, typer.Option(help="Directory for NAME.json (COCO results) and NAME.overlay.png per scene.")] = Path("runs/demo"),
    image: Annotated[Optional[List[Path]], typer.Option(help="Image(s) to use instead of the bundled demo scenes.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="sam_nano weights instead of the shipped ones.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Segment everything in the bundled shapes-world scenes with the shipped sam_nano."""
    from samantic.cli.main import app
    from samantic.demo import segment_args

    args = segment_args(out, image, checkpoint) + ([] if progress else ["--no-progress"])
    typer.echo("samantic " + " ".join(args))
    code = app(args, standalone_mode=False)
    if code:
        raise typer.Exit(code)
