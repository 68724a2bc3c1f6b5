"""``samantic samcp``: work on SAM-CP head files (the open vocabulary of text-embedding heads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="SAM-CP head files: add class names to an open-vocabulary head, tune inference thresholds.")


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



def _cell(v) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else f"{v:g}"


@app.command("tune")
def tune(
    head: Annotated[Path, typer.Argument(help="SAM-CP head (.safetensors).")],
    seeds: Annotated[str, typer.Option(help="Validation v2 scene seeds START:STOP: held out from training, and kept "
                                            "apart from the seeds you report with `samantic eval samcp`.")] = "100:140",
    model: Annotated[Optional[str], typer.Option(help="Registered SAM whose patches the head labels. \\[default: the one the head was trained on, else sam_nano]", show_default=False)] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="SAM weights (default: the model's shipped weights).")] = None,
    cache: Annotated[Path, typer.Option(help="Patch cache root (shared with `samantic train samcp`).")] = Path("runs/cache/samcp"),
    metric: Annotated[str, typer.Option(help="Chosen by: pq, miou, ap50 or mean (of the three).")] = "pq",
    score_thresh: Annotated[Optional[str], typer.Option(help="Values to try, comma-separated \\[default: 0.15,0.25,0.35,0.5].")] = None,
    affinity_thresh: Annotated[Optional[str], typer.Option(help="Values to try \\[default: 0.3,0.5,0.7].")] = None,
    overlap_thresh: Annotated[Optional[str], typer.Option(help="Values to try \\[default: 0.3,0.5].")] = None,
    try_flip: Annotated[bool, typer.Option("--try-flip", help="Also try test-time flip (the head scores the mirrored image too, averaged; twice the head's cost).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the head here (default: update HEAD, atomically).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Also write samcp_tune.json and samcp_tune.md into this folder.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Sweep inference thresholds on validation scenes; record the best in the head (its new defaults)."""
    from rich.console import Console
    from rich.table import Table

    from samantic.heads.samcp import load_samcp
    from samantic.models import create_model
    from samantic.train.samcp_tune import DEFAULT_GRID, METRICS, grid_edges, score_of, tune_samcp, write_inference

    def values(raw: Optional[str], key: str, hint: str):
        if raw is None:
            return DEFAULT_GRID[key]
        try:
            got = tuple(float(v) for v in raw.split(",") if v.strip())
        except ValueError:
            raise typer.BadParameter(f"comma-separated numbers, got {raw!r}", param_hint=hint) from None
        if not got or any(not 0.0 <= v <= 1.0 for v in got):
            raise typer.BadParameter(f"numbers in [0, 1], got {raw!r}", param_hint=hint)
        return got

    if metric not in METRICS:
        raise typer.BadParameter(f"one of {', '.join(METRICS)}, got {metric!r}", param_hint="--metric")
    grid = {"score_thresh": values(score_thresh, "score_thresh", "--score-thresh"),
            "affinity_thresh": values(affinity_thresh, "affinity_thresh", "--affinity-thresh"),
            "overlap_thresh": values(overlap_thresh, "overlap_thresh", "--overlap-thresh")}
    if try_flip:
        grid["flip"] = (False, True)
    try:
        a, b = (int(v) for v in seeds.split(":"))
        if b <= a:
            raise ValueError
    except ValueError:
        raise typer.BadParameter(f"START:STOP with STOP > START, got {seeds!r}", param_hint="--seeds") from None
    if out is not None and out.suffix != ".safetensors":
        raise typer.BadParameter(f"must end in .safetensors, got {out}", param_hint="--out")
    try:
        module = load_samcp(head)
        model = module.sam_for(model, head)
        sam = create_model(model, checkpoint=checkpoint)
        mismatch = module.check_weights(sam, head)
        if mismatch:
            typer.echo(f"warning: {mismatch}", err=True)
        result = tune_samcp(module, sam, range(a, b), cache, grid=grid, metric=metric, progress=progress)
        note = {"seeds": seeds, "metric": metric, "value": score_of(next(r for r in result.rows if all(
            r[k] == v for k, v in result.best.items())), metric), "model": model, "checkpoint": checkpoint}
        written = write_inference(head, result.best, out=out, note=note)
    except (ValueError, FileNotFoundError, ImportError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    keys = list(grid)
    table = Table(title=f"SAM-CP inference sweep on v2 scenes {seeds} (chosen by {metric})")
    for col in keys + ["PQ", "SQ", "RQ", "mIoU", "AP50"]:
        table.add_column(col)
    import math

    rows = sorted(result.rows, key=lambda r: -(score_of(r, metric) if not math.isnan(score_of(r, metric)) else -1.0))
    for r in rows:
        mark = "bold" if all(r[k] == v for k, v in result.best.items()) else None
        table.add_row(*[_cell(r[k]) for k in keys], *[f"{r[m]:.3f}" for m in ("pq", "sq", "rq", "miou", "ap50")],
                      style=mark)
    Console().print(table)
    if report is not None:
        import json as _json

        from samantic.io.atomic import atomic_write_bytes, atomic_write_json

        report.mkdir(parents=True, exist_ok=True)
        command = (f"samantic samcp tune {head} --seeds {seeds} --model {model} --metric {metric}"
                   + "".join(f" --{k.replace('_', '-')} {','.join(_cell(v) for v in grid[k])}"
                             for k in ("score_thresh", "affinity_thresh", "overlap_thresh"))
                   + (f" --checkpoint {checkpoint}" if checkpoint else "") + (" --try-flip" if try_flip else "")
                   + f" --cache {cache}" + (f" --out {out}" if out else ""))
        atomic_write_json(report / "samcp_tune.json", {"command": command, "grid": {k: list(v) for k, v in grid.items()},
                                                       "best": result.best, "rows": result.rows}, indent=2)
        lines = [f"`{command}`", "", f"Best by {metric}: {_json.dumps(result.best)}", "",
                 "| " + " | ".join(keys + ["PQ", "SQ", "RQ", "mIoU", "AP50"]) + " |",
                 "|" + "---|" * (len(keys) + 5)]
        for r in rows:
            lines.append("| " + " | ".join([_cell(r[k]) for k in keys] + [f"{r[m]:.3f}" for m in
                                                                          ("pq", "sq", "rq", "miou", "ap50")]) + " |")
        lines += [""] + [f"Note: {n}." for n in grid_edges(result.best, grid)]
        atomic_write_bytes(report / "samcp_tune.md", ("\n".join(lines) + "\n").encode())
    typer.echo(f"recorded in {written}: {result.best}")
    for n in grid_edges(result.best, grid):
        typer.echo(f"note: {n}", err=True)
