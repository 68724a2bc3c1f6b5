"""``samantic eval``: held-out evaluation of SAM models (and, later, the semantic heads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Evaluate models on held-out shapes-world scenes.")


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


@app.command("sam")
def eval_sam(
    model: Annotated[str, typer.Option(help="Registered model.")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="Weights to evaluate (default: the model's shipped weights).")] = None,
    seeds: Annotated[str, typer.Option(help="Held-out scene seeds for point prompts, START:STOP.")] = "0:100",
    amg_seeds: Annotated[str, typer.Option(help="Held-out scene seeds for segment-everything recall, START:STOP.")] = "0:50",
    out: Annotated[Path, typer.Option(help="Directory for eval_sam.json and eval_sam.md.")] = Path("runs/eval"),
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    from samantic.io import atomic_write_bytes, atomic_write_json
    from samantic.models import create_model
    from samantic.train.metrics import evaluate_sam

    point_seeds, recall_seeds = parse_seeds(seeds), parse_seeds(amg_seeds)
    try:
        sam = create_model(model, checkpoint=checkpoint)
        result = evaluate_sam(sam, point_seeds, recall_seeds, progress=progress)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    command = f"samantic eval sam --model {model}" + (f" --checkpoint {checkpoint}" if checkpoint else "") + \
        f" --seeds {seeds} --amg-seeds {amg_seeds}"
    payload = {"model": model, "checkpoint": checkpoint, "seeds": seeds, "amg_seeds": amg_seeds, "command": command,
               **result.to_dict()}
    atomic_write_json(out / "eval_sam.json", payload, indent=2)
    md = f"`{command}`\n\n{result.markdown()}\n"
    atomic_write_bytes(out / "eval_sam.md", md.encode())
    typer.echo(md)
    typer.echo(f"saved: {out / 'eval_sam.json'} and {out / 'eval_sam.md'} ({result.seconds:.0f} s)")
