"""``samantic samcp``: work on SAM-CP head files (the open vocabulary of text-embedding heads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="SAM-CP head files: add class names to an open-vocabulary head.")


@app.callback()
def _group() -> None:
    """SAM-CP head commands."""


@app.command("add-classes")
def add_classes(
    head: Annotated[Path, typer.Argument(help="SAM-CP head (.safetensors) trained with --text-encoder.")],
    names: Annotated[str, typer.Option(help="Comma-separated new class names, e.g. 'kite,boat'.")],
    stuff: Annotated[bool, typer.Option("--stuff", help="Add them as stuff classes (default: things).")] = False,
    text_encoder: Annotated[Optional[str], typer.Option(help="open_clip:MODEL[:PRETRAINED] (default: the encoder the head records; it must reproduce the head's stored embeddings).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the head here (default: replace HEAD, atomically).")] = None,
    device: Annotated[str, typer.Option(help="Where the text encoder runs: cpu, cuda, ...")] = "cpu",
) -> None:
    """Encode new class names with the head's text encoder and append them to its vocabulary."""
    from samantic.heads._files import read_head_file
    from samantic.heads.samcp import TEXT_ENCODER_KEY, SamcpInfo, add_samcp_classes

    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise typer.BadParameter(f"no class names in {names!r}", param_hint="--names")
    if out is not None and out.suffix != ".safetensors":
        raise typer.BadParameter(f"must end in .safetensors, got {out}", param_hint="--out")
    try:
        written = add_samcp_classes(head, wanted, stuff=stuff, text_encoder=text_encoder, out=out, device=device)
        info = SamcpInfo.from_metadata(read_head_file(written, "SAM-CP head")[1], str(written))
    except (ValueError, FileNotFoundError, ImportError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    kind = "stuff" if stuff else "thing"
    typer.echo(f"added {len(wanted)} {kind} class(es): {', '.join(wanted)}")
    typer.echo(f"vocabulary: {len(info.classes)} things ({', '.join(info.classes)}), {len(info.stuff)} stuff "
               f"({', '.join(info.stuff) or 'none'}); text encoder {info.extra.get(TEXT_ENCODER_KEY)}")
    typer.echo(f"saved: {written}")

