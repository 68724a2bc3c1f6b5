"""``samantic train``: train SAM (from scratch or fine-tuned) and, later, the semantic heads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Train SAM and samantic's heads.")


@app.callback()
def _group() -> None:
    """Training commands."""


@app.command("sam")
def train_sam(
    data: Annotated[str, typer.Option(help="COCO dataset DIR (from `samantic data shapes`) or shapes:SEED to render scenes on the fly.")],
    out: Annotated[Path, typer.Option(help="Output weights (.safetensors); OUT.ckpt and OUT.log.jsonl go beside it.")],
    model: Annotated[str, typer.Option(help="Registered model to train.")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="Start from these weights (fine-tuning).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Total optimizer steps.")] = 1000,
    images_per_step: Annotated[int, typer.Option(min=1)] = 4,
    masks_per_image: Annotated[int, typer.Option(min=1)] = 8,
    iterations: Annotated[int, typer.Option(min=1, help="Prompting rounds per instance.")] = 3,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 8e-4,
    warmup_steps: Annotated[int, typer.Option(min=0)] = 100,
    trainable: Annotated[str, typer.Option(help="Comma-separated parts to train: image_encoder,prompt_encoder,mask_decoder.")] = "image_encoder,prompt_encoder,mask_decoder",
    checkpoint_every: Annotated[int, typer.Option(min=1)] = 50,
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.ckpt if it exists.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    from samantic.models import create_model
    from samantic.train.sam import SamTrainConfig, SamTrainer, open_dataset

    try:
        config = SamTrainConfig(
            steps=steps, images_per_step=images_per_step, masks_per_image=masks_per_image, iterations=iterations,
            lr=lr, warmup_steps=warmup_steps, trainable=tuple(p.strip() for p in trainable.split(",") if p.strip()),
            checkpoint_every=checkpoint_every, seed=seed,
        )
        dataset = open_dataset(data)
        sam = create_model(model, checkpoint=checkpoint, pretrained=False if checkpoint is None else None)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(f"training {model} on {data} for {steps} steps ({images_per_step} images x {masks_per_image} masks x "
               f"{iterations} rounds per step); trainable: {', '.join(config.trainable)}")
    result = SamTrainer(sam, config, dataset).train(out, resume=resume, progress=progress)
    typer.echo(f"saved: {result.output} (steps {result.steps}, last loss {result.last_loss:.4f}, "
               f"{result.seconds / 60:.1f} min); log: {result.log}")
