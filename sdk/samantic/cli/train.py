"""``samantic train``: train SAM (from scratch or fine-tuned) and, later, the semantic heads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Train SAM and samantic's heads.")


@app.callback()
def _group() -> None:
    """Training commands."""


def _note_time_budget(minutes: float, done: int, steps: int, option: str = "--time-budget", where: str = "",
                      steps_option: str = "--steps") -> None:
    """Says when ``--time-budget`` ended a run (or ``where``: a stage of one) before ``--steps``: the learning-rate
    decay followed time, so how far the run got depends on the machine's speed that day."""
    if minutes > 0 and done < steps:
        typer.echo(f"note: the time budget{where} ({minutes:g} min) ended training at step {done} of {steps}; the "
                   "learning-rate decay followed time, so a slower or busier machine trains fewer steps (for weights "
                   f"that do not depend on the machine's speed, give {steps_option} without {option})", err=True)


@app.command("sam", help="Train or fine-tune a SAM on instance masks with interactive point and box prompts (resumable).")
def train_sam(
    data: Annotated[str, typer.Option(help="COCO dataset DIR (from `samantic data shapes`) or scenes rendered on the fly: shapes:SEED (v1), shapes-panoptic:SEED (v2: entities and parts), shapes-mix:SEED (both alternating).")],
    out: Annotated[Path, typer.Option(help="Output weights (.safetensors); OUT.ckpt and OUT.log.jsonl go beside it.")],
    model: Annotated[str, typer.Option(help="Registered model to train.")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="Start from these weights (fine-tuning).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Total optimizer steps.")] = 1000,
    images_per_step: Annotated[int, typer.Option(min=1, help="Images per optimizer step.")] = 4,
    masks_per_image: Annotated[int, typer.Option(min=1, help="Instances prompted per image and step.")] = 8,
    iterations: Annotated[int, typer.Option(min=1, help="Prompting rounds per instance.")] = 3,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 8e-4,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear learning-rate warm-up steps.")] = 100,
    trainable: Annotated[str, typer.Option(help="Comma-separated parts to train: image_encoder,prompt_encoder,mask_decoder.")] = "image_encoder,prompt_encoder,mask_decoder",
    box_prob: Annotated[float, typer.Option(help="Probability that an image's first prompts are boxes.")] = 0.3,
    zoom_prob: Annotated[float, typer.Option(help="Probability of training on a crop around one instance.")] = 0.5,
    flat_steps: Annotated[int, typer.Option(min=0, help="From-scratch curriculum: flat-colour repaints fade out over these steps.")] = 0,
    focal_weight: Annotated[float, typer.Option(help="Weight of the focal term (SAM: 20).")] = 20.0,
    focal_alpha: Annotated[float, typer.Option(help="Focal weight of positives (SAM: 0.25; 0.5 = unweighted).")] = 0.25,
    focal_gamma: Annotated[float, typer.Option(help="Focal exponent (SAM: 2; 0 = cross-entropy).")] = 2.0,
    dice_weight: Annotated[float, typer.Option(help="Weight of the dice term.")] = 1.0,
    freeze_batchnorm: Annotated[bool, typer.Option("--freeze-batchnorm/--train-batchnorm", help="Batch-norm layers keep their running statistics while their scales and shifts train (fine-tuning with small batches).")] = False,
    stability_weight: Annotated[float, typer.Option(min=0, help="Weight of a soft stability-score term on the first round's masks (keeps boundaries as sharp as segment-everything's stability filter expects; 0: off).")] = 0.0,
    class_weight: Annotated[float, typer.Option(min=0, help="Weight of a class term: a linear classifier trained with the model names each prompted instance's class from the decoder's output mask tokens (data with classes: shapes:SEED or a COCO DIR; the classifier goes to OUT-stem.token_classes.safetensors; 0: off, SAM's recipe).")] = 0.0,
    distill_weight: Annotated[float, typer.Option(min=0, help="Hold the outputs to the starting weights': on every training image, random single-point prompts' logits (boundary band) and predicted IoUs are pulled toward those of a frozen copy of --checkpoint with this weight, while the masks train as usual (learning without forgetting: new terms such as --class-weight without losing the masks; needs --checkpoint; 0: off).")] = 0.0,
    distill_points: Annotated[int, typer.Option(min=1, help="Random point prompts per image for --distill-weight.")] = 16,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Write OUT.ckpt (for --resume) every this many steps.")] = 50,
    log_every: Annotated[int, typer.Option(min=1, help="Append to OUT.log.jsonl every this many steps.")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed (sampling, initialisation).")] = 0,
    time_budget: Annotated[float, typer.Option(min=0, help="Stop after this many minutes of training (0: no limit); the learning-rate decay follows it.")] = 0.0,
    device: Annotated[str, typer.Option(help="Where to train: cpu, cuda, cuda:1, ...")] = "cpu",
    workers: Annotated[int, typer.Option(min=0, help="Data-preparation processes (0: in the training process).")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.ckpt if it exists.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    import copy

    import torch

    from samantic.models import create_model
    from samantic.train.sam import Anchored, SamTrainConfig, SamTrainer, open_dataset

    try:
        if distill_weight > 0 and checkpoint is None:
            raise ValueError(f"--distill-weight {distill_weight:g} holds the outputs to the starting weights': give "
                             "them with --checkpoint (a from-scratch model has no outputs worth keeping)")
        config = SamTrainConfig(
            steps=steps, images_per_step=images_per_step, masks_per_image=masks_per_image, iterations=iterations,
            lr=lr, warmup_steps=warmup_steps, trainable=tuple(p.strip() for p in trainable.split(",") if p.strip()),
            checkpoint_every=checkpoint_every, log_every=log_every, seed=seed, box_prob=box_prob, zoom_prob=zoom_prob,
            flat_steps=flat_steps, focal_weight=focal_weight, focal_alpha=focal_alpha, focal_gamma=focal_gamma,
            dice_weight=dice_weight, time_budget=time_budget * 60, freeze_batchnorm=freeze_batchnorm,
            stability_weight=stability_weight,
        )
        dataset = open_dataset(data)
        torch_device = torch.device(device)
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA device")
        torch.manual_seed(seed)  # a from-scratch model's initialisation follows --seed
        sam = create_model(model, checkpoint=checkpoint, pretrained=False if checkpoint is None else None)
        token_classifier = None
        if class_weight > 0:
            names = tuple(getattr(dataset, "class_names", ()))
            if not names:
                raise ValueError(f"--class-weight {class_weight:g}: the data {data} does not give every instance a "
                                 "class (use shapes:SEED or a COCO DIR with categories)")
            token_classifier = torch.nn.Linear(sam.mask_decoder.transformer_dim, len(names))
        reference = None
        if distill_weight > 0:
            reference = copy.deepcopy(sam).eval()  # the starting weights, before any step (also on --resume)
            dataset = Anchored(dataset)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(f"training {model} on {data} for {steps} steps ({images_per_step} images x {masks_per_image} masks x "
               f"{iterations} rounds per step); trainable: {', '.join(config.trainable)}"
               + (f"; outputs held to {checkpoint} (weight {distill_weight:g}, {distill_points} points per image)"
                  if reference is not None else ""))
    if torch_device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    trainer = SamTrainer(sam, config, dataset, device=device, workers=workers, token_classifier=token_classifier,
                         class_weight=class_weight, reference=reference, distill_weight=distill_weight,
                         distill_points=distill_points)
    try:
        result = trainer.train(out, resume=resume, progress=progress)
    except ValueError as e:  # a checkpoint that does not match the run (--resume)
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    _note_time_budget(time_budget, result.steps, steps)
    typer.echo(f"saved: {result.output} (steps {result.steps}, last loss {result.last_loss:.4f}, "
               f"{result.seconds / 60:.1f} min); log: {result.log}")


@app.command("encoder", help="Pretrain a SAM's image encoder as an image classifier on shapes-world scenes (image-level class labels only), for `train sam --checkpoint` to start from (resumable).")
def train_encoder(
    out: Annotated[Path, typer.Option(help="Output: a full SAM checkpoint (.safetensors) whose encoder is pretrained; OUT.ckpt, OUT.log.jsonl and the classifier layer (OUT-stem.classifier.safetensors) go beside it.")],
    model: Annotated[str, typer.Option(help="Registered model whose encoder to pretrain.")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="Start from these weights (default: random initialisation).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Total optimizer steps.")] = 2000,
    minutes: Annotated[float, typer.Option(min=0, help="Stop after this many minutes of training (0: no limit); the learning-rate decay follows it.")] = 0.0,
    images_per_step: Annotated[int, typer.Option(min=1, help="Scenes per optimizer step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear learning-rate warm-up steps.")] = 50,
    first_seed: Annotated[int, typer.Option(min=0, help="Scene seed of the first training image (scenes are rendered on the fly).")] = 70_000_000,
    eval_seeds: Annotated[str, typer.Option(help="Held-out scene seeds START:STOP scored at the end (label accuracy, exact match, mAP; '' to skip).")] = "0:100",
    seed: Annotated[int, typer.Option(help="Random seed (classifier initialisation, flips).")] = 0,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Write OUT.ckpt (for --resume) every this many steps.")] = 50,
    log_every: Annotated[int, typer.Option(min=1, help="Append to OUT.log.jsonl every this many steps.")] = 10,
    device: Annotated[str, typer.Option(help="Where to train: cpu, cuda, ...")] = "cpu",
    workers: Annotated[int, typer.Option(min=0, help="Scene-rendering processes (0: in the training process).")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.ckpt if it exists.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    from samantic.cli.eval import parse_seeds
    from samantic.models import create_model
    from samantic.train.pretrain import EncoderPretrainer, PretrainConfig

    try:
        config = PretrainConfig(steps=steps, images_per_step=images_per_step, lr=lr, warmup_steps=warmup_steps,
                                time_budget=minutes * 60, first_seed=first_seed, seed=seed,
                                log_every=log_every, checkpoint_every=checkpoint_every)
        held_out = list(parse_seeds(eval_seeds)) if eval_seeds else []
        if held_out and first_seed < max(held_out) + 1 and first_seed + steps * images_per_step > min(held_out):
            raise ValueError(f"--eval-seeds {eval_seeds} overlap the training scenes {first_seed}:"
                             f"{first_seed + steps * images_per_step}")
        import torch

        torch.manual_seed(seed)  # the same --seed gives `train sam` the same random initialisation
        sam = create_model(model, checkpoint=checkpoint, pretrained=False if checkpoint is None else None)
        trainer = EncoderPretrainer(sam, config, device=device, workers=workers)
        typer.echo(f"pretraining {model}'s image encoder on image-level class labels, {images_per_step} scenes a step "
                   f"from seed {first_seed}" + (f", {minutes:g} min" if minutes else f", {steps} steps"))
        result = trainer.train(out, resume=resume, progress=progress, eval_seeds=held_out)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    _note_time_budget(minutes, result.steps, steps, "--minutes")
    typer.echo(f"saved: {result.output} (steps {result.steps}, last loss {result.last_loss:.4f}, "
               f"{result.seconds / 60:.1f} min); log: {result.log}")


@app.command("usam")
def train_usam(
    classes: Annotated[str, typer.Option(help="Comma-separated class names the head learns, e.g. 'circle,star'.")],
    out: Annotated[Path, typer.Option(help="Output head (.safetensors); OUT.log.jsonl goes beside it.")],
    source: Annotated[str, typer.Option(help="Example images: shapes | folder | diffusers.")] = "shapes",
    images: Annotated[Optional[str], typer.Option(help="folder: root with one sub-folder per class; diffusers: the model directory.")] = None,
    group: Annotated[Optional[list[str]], typer.Option(help="NAME=class1,class2 (repeatable). NAME in --classes: a superclass trained from its members' images; otherwise a superclass of classes in --classes, usable at inference (--classes NAME).")] = None,
    model: Annotated[str, typer.Option(help="Registered SAM whose mask tokens the head reads.")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="SAM weights (default: the model's shipped weights).")] = None,
    per_class: Annotated[int, typer.Option(min=1, help="Example images per class.")] = 60,
    method: Annotated[str, typer.Option(help="naive | mil | mil_ud (MIL + uncertainty distillation).")] = "mil_ud",
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training data.")] = 60,
    points_per_side: Annotated[int, typer.Option(min=1, help="Grid of prompts per example image.")] = 16,
    min_iou: Annotated[float, typer.Option(help="Instances: grid outputs with predicted IoU at least this.")] = 0.5,
    cache: Annotated[Path, typer.Option(help="Feature cache directory (reused across runs).")] = Path("runs/cache/usam"),
    seed: Annotated[int, typer.Option(help="Random seed (sampling, initialisation).")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train a U-SAM classifier head from class names and example images (image-level labels only)."""
    import json

    from samantic.heads.usam import check_class_names, parse_groups
    from samantic.models import create_model
    from samantic.train.sources import open_source
    from samantic.train.usam import (FeatureCache, FeatureExtractor, UsamTrainConfig, collect_bags, head_info_for,
                                     train_head, training_metadata)

    try:
        names = check_class_names(classes)
        groups = parse_groups(group or [])
        # a group named in --classes is a head class trained from its members' images (a superclass head);
        # any other group maps classes of the head to a superclass at inference (stored in the head)
        train_groups = {g: m for g, m in groups.items() if g in names}
        for g, members in groups.items():
            missing = [m for m in members if m not in names]
            if g not in names and missing:
                raise ValueError(f"--group {g}: {', '.join(missing)} not in --classes {','.join(names)} (a group either "
                                 "is one of --classes, trained from its members' images, or groups classes of --classes)")
        config = UsamTrainConfig(method=method, epochs=epochs, min_iou=min_iou, seed=seed)
        src = open_source(source, images)
        members = sorted({m for c in names for m in train_groups.get(c, (c,))})
        src.check(members)
        if out.suffix != ".safetensors":
            raise ValueError(f"--out must end in .safetensors, got {out}")
        sam = create_model(model, checkpoint=checkpoint)
    except (ValueError, FileNotFoundError, ImportError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    extractor = FeatureExtractor(sam, points_per_side=points_per_side)
    feature_cache = FeatureCache(cache, extractor)
    bags = collect_bags(src, names, train_groups, per_class, feature_cache, min_iou, seed=seed, progress=progress)
    typer.echo(f"{len(bags)} example images, {len(bags.tokens)} instances (features: {feature_cache.misses} computed, "
               f"{feature_cache.hits} from {feature_cache.dir})")
    for key, reason in src.failures():
        typer.echo(f"skipped {key}: {reason}", err=True)
    info = head_info_for(sam, model, names, groups,
                         extra=training_metadata(config, source=source, images=images, per_class=per_class,
                                                 points_per_side=points_per_side, checkpoint=checkpoint,
                                                 examples=len(bags), instances=len(bags.tokens)))
    log = out.with_name(out.name + ".log.jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)

    def on_epoch(rec):
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\n")

    result = train_head(bags, info, config, progress=progress, on_epoch=on_epoch)
    result.head.save(out)
    last = result.history[-1]
    typer.echo(f"saved: {out} (classes {','.join(names)}, {config.method}, {config.epochs} epochs, "
               f"loss {last['loss']:.4f}, {result.seconds:.1f} s); log: {log}")


@app.command("samcp")
def train_samcp(
    data: Annotated[str, typer.Option(help="Panoptic dataset DIR (from `samantic data shapes --kind panoptic`), shapes-panoptic:SEED[:N] (N v2 scenes rendered on the fly), shapes:SEED[:N] (N v1 scenes: things only, on v1 backgrounds), or several joined by commas.")],
    out: Annotated[Path, typer.Option(help="Output head (.safetensors); OUT.ckpt and OUT.log.jsonl go beside it.")],
    classes: Annotated[Optional[str], typer.Option(help="Comma-separated thing classes (default: every thing category of the dataset).")] = None,
    stuff: Annotated[Optional[str], typer.Option(help="Comma-separated stuff classes (default: every stuff category of the dataset; '' for none).")] = None,
    model: Annotated[str, typer.Option(help="Registered SAM whose patches the head labels and merges.")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="SAM weights (default: the model's shipped weights).")] = None,
    cache: Annotated[Path, typer.Option(help="Patch cache root (reused across runs; keyed by model, weights and thresholds).")] = Path("runs/cache/samcp"),
    points_per_side: Annotated[int, typer.Option(min=1, help="Prompt grid side of segment-everything (the paper: 48).")] = 32,
    pred_iou_thresh: Annotated[Optional[float], typer.Option(help="Patches kept at this predicted IoU (default: the model's calibrated one).")] = None,
    stability_score_thresh: Annotated[Optional[float], typer.Option(help="Patches kept at this stability (default: the model's).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 3000,
    images_per_step: Annotated[int, typer.Option(min=1, help="Images per optimizer step.")] = 4,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 3e-4,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear learning-rate warm-up steps.")] = 100,
    layers: Annotated[int, typer.Option(min=1, help="Affinity decoder layers.")] = 3,
    mask_roi: Annotated[bool, typer.Option("--mask-roi/--box-roi", help="Multiply RoI features by the patch mask (--box-roi: the ablation).")] = True,
    affinity_residual: Annotated[bool, typer.Option("--affinity-residual/--no-affinity-residual", help="Add each layer's affinities to the previous layer's.")] = True,
    mask_size: Annotated[int, typer.Option(min=0, help="Side of the patch-mask input, a multiple of the RoI grid (0: the RoI grid's side); finer masks show the patch's silhouette.")] = 0,
    roi_size: Annotated[int, typer.Option(min=1, help="Side of the RoI grid of backbone features each patch token is built from (the paper's 7; finer grids see small shapes in more detail).")] = 7,
    input_size: Annotated[int, typer.Option(min=0, help="The backbone sees each image resized so its longer side is this (0: as given); smaller is faster and sees less detail.")] = 384,
    fpn_smooth: Annotated[str, typer.Option(help="The FPN's smoothing convolutions: conv (full 3x3, the FPN paper's) or separable (depthwise 3x3 + 1x1; about a third less time a training step on the CPU).")] = "conv",
    texture_channels: Annotated[int, typer.Option(min=0, help="Texture statistics per patch from the finest FPN level, reduced to this many channels (0: off); they tell large stuff regions apart by texture. May be added to an --init head without them (they start at zero).")] = 0,
    init: Annotated[Optional[Path], typer.Option(help="Start from the weights of this trained SAM-CP head (fine-tuning: more scenes, new patches); it must have the same classes and architecture options. Tune the result again (`samantic samcp tune`).")] = None,
    text_encoder: Annotated[Optional[str], typer.Option(help="Open vocabulary: class queries from text embeddings of the names, by open_clip:MODEL[:PRETRAINED] (PRETRAINED: a tag or a checkpoint file) or open_clip:local-dir:DIR; stored in the head, so inference needs no encoder. Needs pip install 'samantic\\[clip]'.")] = None,
    prompt_template: Annotated[str, typer.Option(help="Prompt each class name is encoded in (with --text-encoder).")] = "a photo of a {name}.",
    time_budget: Annotated[float, typer.Option(min=0, help="Stop after this many minutes of training (0: no limit); the learning-rate decay follows it.")] = 0.0,
    weight_decay: Annotated[float, typer.Option(min=0, help="AdamW weight decay of the weight matrices.")] = 0.05,
    patch_drop: Annotated[float, typer.Option(min=0, max=0.95, help="Fraction of each image's patches left out of a step, drawn anew every step (a regulariser; 0: off).")] = 0.0,
    crop_scale: Annotated[float, typer.Option(min=0.1, max=1.0, help="Random zoom-in: half the images of a step are cropped to a window of this to 1 times their sides (1: off).")] = 1.0,
    color_perm: Annotated[float, typer.Option(min=0, max=1.0, help="Probability that an image of a step has its colour channels permuted (stuff told apart by texture, not colour alone; 0: off).")] = 0.0,
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0: torch's default).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed (sampling, initialisation).")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Save OUT.ckpt every this many steps (Ctrl-C and SIGTERM save it too).")] = 200,
    stage: Annotated[Optional[List[str]], typer.Option(metavar="KEY=VALUE,...", help="One stage of a staged training, as KEY=VALUE,... with KEY one of steps, minutes, lr, color_perm, texture_channels; repeat it for each stage. The stages run in order in this one process, on one load of the patches: each starts from the weights the stage before saved (as --init would) with a fresh optimizer and learning-rate schedule; what a stage leaves out it takes from the stage before, the first from --steps, --time-budget, --lr, --color-perm and --texture-channels; texture_channels may be switched on once. Stage N writes OUT's stem .stageN.safetensors (with its .ckpt and .log.jsonl), the last one OUT.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.ckpt if it exists (the same options; --steps and --time-budget may grow); with --stage, every stage from its own checkpoint.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train a SAM-CP head (labels and merges SAM's patches) on a panoptic dataset."""
    import json

    import torch

    from samantic.heads.samcp import SAM_STATE_KEY, SamcpHead, SamcpInfo
    from samantic.models import create_model
    from samantic.train.samcp import (SamcpTrainConfig, init_from_head, load_examples, parse_stages, stage_output,
                                      train_stages)
    from samantic.train.samcp_cache import open_panoptic

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    failures = []
    try:
        if out.suffix != ".safetensors":
            raise ValueError(f"--out must end in .safetensors, got {out}")
        dataset = open_panoptic(data)
        cats = dataset.categories
        things_all = [c["name"] for c in cats if c.get("isthing", 1)]
        stuff_all = [c["name"] for c in cats if not c.get("isthing", 1)]
        thing_names = things_all if classes is None else [n.strip() for n in classes.split(",") if n.strip()]
        stuff_names = stuff_all if stuff is None else [n.strip() for n in stuff.split(",") if n.strip()]
        for given, known, what in ((thing_names, things_all, "thing"), (stuff_names, stuff_all, "stuff")):
            bad = [n for n in given if n not in known]
            if bad:
                raise ValueError(f"unknown {what} class(es) {bad}; {data} has: {', '.join(known) or '(none)'}")
        own = {"steps": steps, "minutes": time_budget, "lr": lr, "color_perm": color_perm,
               "texture_channels": texture_channels}
        stages = parse_stages(stage, own) if stage else [own]
        config = SamcpTrainConfig(steps=steps, images_per_step=images_per_step, lr=lr, warmup_steps=warmup_steps,
                                  seed=seed, time_budget=time_budget * 60, weight_decay=weight_decay,
                                  patch_drop=patch_drop, crop_scale=crop_scale, color_perm=color_perm,
                                  checkpoint_every=checkpoint_every)
        text, text_info = None, {}
        if text_encoder is not None:
            # encoded once (on the CPU: a few prompts), before the slow patch cache, so a bad encoder fails fast
            from samantic.heads.samcp import TEXT_ENCODER_KEY, TEXT_TEMPLATE_KEY
            from samantic.heads.text import check_template, open_text_encoder

            check_template(prompt_template)
            encoder = open_text_encoder(text_encoder)
            text = encoder.encode(thing_names + stuff_names, prompt_template)
            text_info = {"text_dim": encoder.dim,
                         "extra": {TEXT_ENCODER_KEY: str(encoder.spec), TEXT_TEMPLATE_KEY: prompt_template}}
            typer.echo(f"class names encoded by {encoder.spec} ({encoder.dim}-d, prompt {prompt_template!r})")
            if not encoder.pretrained:
                typer.echo(f"warning: {encoder.spec} names no pretrained weights: its text tower is random, the "
                           "embeddings carry no meaning (for tests only)", err=True)
            del encoder
        sam = create_model(model, checkpoint=checkpoint)
        info = SamcpInfo(classes=thing_names, stuff=stuff_names, layers=layers, mask_roi=mask_roi,
                         affinity_residual=affinity_residual, mask_size=mask_size, roi_size=roi_size, model=model,
                         fpn_smooth=fpn_smooth, input_size=input_size, texture_channels=stages[0]["texture_channels"], **text_info)
        torch.manual_seed(seed)  # the head's start depends on the seed alone (not on the SAM built before it)
        head = SamcpHead(info, text_embeddings=text)
        init_sha = init_from_head(head, init) if init is not None else None  # before the slow patch cache
    except (ValueError, FileNotFoundError, ImportError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(f"patches of {model} for {data} (cache {cache}) ...")
    examples, report = load_examples(sam, dataset, cache, info.names, roi_size=info.mask_side,
                                     points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                                     stability_score_thresh=stability_score_thresh, progress=progress,
                                     on_error=lambda key, reason: failures.append((key, reason)))
    for key, reason in failures:
        typer.echo(f"skipped {key}: {reason}", err=True)
    meta = report.metadata
    typer.echo(f"{len(examples)} images, {report.patches} patches ({report.computed} computed, {report.reused} "
               f"reused; grid {meta['grid']}, pred_iou_thresh {meta['pred_iou_thresh']}, stability_score_thresh "
               f"{meta['stability_score_thresh']})")
    extra = {"data": data, "checkpoint": checkpoint or "", "patch_cache_key": report.key,
             SAM_STATE_KEY: meta["state_sha256"],  # the cache keyed its entries by this digest of `sam`
             "patches": json.dumps({k: meta[k] for k in ("points_per_side", "pred_iou_thresh", "stability_score_thresh")}),
             "images": str(len(examples))}
    if init is not None:  # the run record holds the digest: --resume refuses another starting head
        extra.update({"init": init_sha, "init_file": str(init)})
    from samantic.cli.segment import _sigterm_as_interrupt

    running = {}  # the stage in training and its trainer, for the interrupt's message

    def on_stage(index, trainer):
        running.update(index=index, trainer=trainer)
        if len(stages) > 1:
            st = stages[index - 1]
            typer.echo(f"stage {index}/{len(stages)}: {st['steps']} steps"
                       + (f", {st['minutes']:g} min" if st["minutes"] else "")
                       + f", lr {st['lr']:g}, color_perm {st['color_perm']:g}, texture_channels {st['texture_channels']}"
                       + f" -> {stage_output(out, index, len(stages))}")

    try:
        with _sigterm_as_interrupt():
            results = train_stages(head, config, examples, stages, out, seed=seed, text_embeddings=text, device=device,
                                   metadata=extra, resume=resume, progress=progress, on_stage=on_stage)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        if running:
            ckpt = stage_output(out, running["index"], len(stages))
            typer.echo(f"interrupted at step {running['trainer'].step}"
                       + (f" of stage {running['index']}/{len(stages)}" if len(stages) > 1 else "")
                       + f": saved {ckpt}.ckpt; run the same command with --resume to continue", err=True)
        raise typer.Exit(130)
    for index, (st, result) in enumerate(zip(stages, results), 1):
        if len(stages) == 1:
            _note_time_budget(st["minutes"], result.steps, st["steps"])
        else:
            _note_time_budget(st["minutes"], result.steps, st["steps"], "minutes", f" of stage {index}",
                              "the stage steps=")
            typer.echo(f"stage {index}/{len(stages)}: steps {result.steps}, last loss {result.last_loss:.4f}, "
                       f"{result.seconds / 60:.1f} min; saved {result.output}")
    result = results[-1]
    if result.steps_run == 0:  # earlier stages that had finished are resumed past in silence
        typer.echo(f"warning: no step trained: {result.output}.ckpt had already reached {result.steps} steps (raise "
                   + ("--steps" if len(stages) == 1 else "steps= of the last --stage") + " to train on)", err=True)
    vocabulary = "text embeddings" if text is not None else "learned embeddings"
    typer.echo(f"saved: {result.output} ({len(info.classes)} thing + {len(info.stuff)} stuff classes ({vocabulary}), steps "
               f"{result.steps}, last loss {result.last_loss:.4f}, {result.seconds / 60:.1f} min); log: {result.log}")
    if failures:
        typer.echo(f"{len(failures)} image(s) could not be used (listed above)", err=True)
        raise typer.Exit(2)


@app.command("sum")
def train_sum_cmd(
    out: Annotated[Path, typer.Option(help="Output weights (.safetensors); OUT.ckpt and OUT.log.jsonl go beside it.")],
    labelled: Annotated[str, typer.Option(help="Labelled set: DIR (from `samantic data shapes --kind panoptic`: instances, salient, entities and parts COCO files) or shapes-panoptic:SEED[:N] (N v2 scenes rendered on the fly).")] = "shapes-panoptic:3000000:120",
    unlabelled: Annotated[str, typer.Option(help="Unlabelled pool: DIR of images or shapes-panoptic:SEED[:N] (images only; their ground truth is never read).")] = "shapes-panoptic:4000000:240",
    model: Annotated[str, typer.Option(help="Registered base SAM.")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="Base weights (default: the model's shipped weights).")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Train (and pseudo-label) at this input side in pixels (a convolutional encoder, a multiple of 32) \\[default: the side --checkpoint's header records, else the model's config side]; the result's header records it, and every command that loads the file runs it there.")] = None,
    variant: Annotated[str, typer.Option(help="sum | no-task (no task prompt) | refine (uncertainty in the loss only) | vanilla (no uncertainty, no task prompt): the columns of the ablation.")] = "sum",
    refiner: Annotated[Optional[Path], typer.Option(help="Trained mask refiner (benchmarks/sum_uncertainty.py writes one); needed by every variant but vanilla.")] = None,
    pseudo_cache: Annotated[Path, typer.Option(help="Pseudo-label and uncertainty cache root (reused across runs; keyed by model, weights, grid, thresholds, refiner).")] = Path("runs/cache/sum"),
    points_per_side: Annotated[int, typer.Option(min=1, help="Prompt grid side of the pseudo-labels' segment-everything.")] = 16,
    pred_iou_thresh: Annotated[Optional[float], typer.Option(help="Pseudo-labels kept at this predicted IoU (default: the model's calibrated one).")] = None,
    stability_score_thresh: Annotated[Optional[float], typer.Option(help="Pseudo-labels kept at this stability (default: the model's).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Total optimizer steps (labelled and pseudo-labelled alternate).")] = 400,
    images_per_step: Annotated[int, typer.Option(min=1, help="Images per optimizer step.")] = 4,
    masks_per_image: Annotated[int, typer.Option(min=1, help="Instances prompted per image and step.")] = 4,
    iterations: Annotated[int, typer.Option(min=1, help="Prompting rounds per instance.")] = 2,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-4,
    task_lr_scale: Annotated[float, typer.Option(help="The task table's learning rate relative to --lr (it starts at zero).")] = 10.0,
    encoder_lr_scale: Annotated[float, typer.Option(help="The image encoder's learning rate relative to --lr, when --trainable includes it.")] = 1.0,
    task_answers: Annotated[bool, typer.Option("--task-answers/--task-best-of-three", help="With the task prompt: every output of a prompt that carries a task learns its mask (default), or only the best of the three, as SAM.")] = True,
    replay: Annotated[int, typer.Option(min=0, help="Plain (v1) scenes interleaved with the labelled set, instances as 'unspecified' (keeps what the base does on them; 0: none).")] = 0,
    anchor_weight: Annotated[float, typer.Option(min=0, help="With the image encoder trained: pull its embeddings of the replayed plain scenes toward the base encoder's with this weight (feature distillation; needs --replay; 0: off).")] = 0.0,
    distill_weight: Annotated[float, typer.Option(min=0, help="On the replayed plain scenes: pull the outputs of random point prompts (logits and predicted IoUs, asked 'unspecified') toward the base model's with this weight (keeps segment-everything's masks and stability scores; needs --replay; 0: off).")] = 0.0,
    distill_points: Annotated[int, typer.Option(min=1, help="Point prompts per replayed scene for --distill-weight.")] = 16,
    replay_labels: Annotated[bool, typer.Option("--replay-labels/--no-replay-labels", help="Train the replayed scenes' masks too (default), or use them only for --anchor-weight / --distill-weight.")] = True,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear learning-rate warm-up steps.")] = 20,
    focal_weight: Annotated[Optional[float], typer.Option(help="Weight of the focal term (default: the base weights' own training recipe, read from their header; else SAM's 20).")] = None,
    focal_alpha: Annotated[Optional[float], typer.Option(help="Focal weight of positives (default: the base's recipe; else SAM's 0.25).")] = None,
    focal_gamma: Annotated[Optional[float], typer.Option(help="Focal exponent (default: the base's recipe; else SAM's 2).")] = None,
    dice_weight: Annotated[Optional[float], typer.Option(help="Weight of the dice term (default: the base's recipe; else 1).")] = None,
    trainable: Annotated[str, typer.Option(help="Comma-separated parts to train besides the task table: image_encoder,prompt_encoder,mask_decoder.")] = "prompt_encoder,mask_decoder",
    freeze_batchnorm: Annotated[bool, typer.Option("--freeze-batchnorm/--train-batchnorm", help="Batch-norm layers keep their running statistics while their scales and shifts train (fine-tuning with small batches).")] = False,
    stability_weight: Annotated[float, typer.Option(min=0, help="Weight of a soft stability-score term on the first round's masks (keeps boundaries as sharp as segment-everything's stability filter expects; 0: off).")] = 0.0,
    task_weights: Annotated[str, typer.Option(help="How often each task's labelled masks are among an image's prompted ones, relative: TASK=W,... (e.g. part=3; a task not named weighs 1; empty: every mask alike). The same for every variant: it chooses data, not prompts.")] = "",
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Write OUT.ckpt (for --resume) every this many steps.")] = 25,
    log_every: Annotated[int, typer.Option(min=1, help="Append to OUT.log.jsonl every this many steps.")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed (sampling, initialisation).")] = 0,
    time_budget: Annotated[float, typer.Option(min=0, help="Stop after this many minutes of training (0: no limit); the learning-rate decay follows it.")] = 0.0,
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0: torch's default).")] = 0,
    device: Annotated[str, typer.Option(help="Where to train: cpu, cuda, ...")] = "cpu",
    workers: Annotated[int, typer.Option(min=0, help="Data-preparation processes per data stream (0: in the training process).")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.ckpt if it exists.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """SUM: fine-tune a SAM on labelled task masks and uncertainty-weighted pseudo-labels, with task prompts."""
    import torch

    from samantic.cli.eval import input_size_override
    from samantic.models import TASKS, create_model
    from samantic.train.sam import SamTrainConfig
    from samantic.train.sum_train import SumTrainConfig, base_loss, parse_task_weights, train_sum

    if threads:
        torch.set_num_threads(threads)
    try:
        # the loss the base weights were trained with (a fine-tune with another loss reshapes the logits:
        # stability scores, and with them segment-everything at the model's thresholds, collapse)
        loss = base_loss(model, checkpoint)
        given = {"focal_weight": focal_weight, "focal_alpha": focal_alpha, "focal_gamma": focal_gamma,
                 "dice_weight": dice_weight}
        loss.update({k: v for k, v in given.items() if v is not None})
        config = SamTrainConfig(
            steps=steps, images_per_step=images_per_step, masks_per_image=masks_per_image, iterations=iterations,
            lr=lr, warmup_steps=warmup_steps, trainable=tuple(p.strip() for p in trainable.split(",") if p.strip()),
            checkpoint_every=checkpoint_every, log_every=log_every, seed=seed, time_budget=time_budget * 60,
            freeze_batchnorm=freeze_batchnorm, stability_weight=stability_weight,
            task_weights=parse_task_weights(task_weights), **loss,
        )
        sum_config = SumTrainConfig(variant=variant, task_lr_scale=task_lr_scale, encoder_lr_scale=encoder_lr_scale,
                                    points_per_side=points_per_side,
                                    pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                                    task_answers=task_answers, replay=replay, anchor_weight=anchor_weight,
                                    distill_weight=distill_weight, distill_points=distill_points,
                                    replay_labels=replay_labels)
        sam = create_model(model, checkpoint=checkpoint, **input_size_override(model, input_size))
        typer.echo(f"SUM ({variant}) on {model}" + (f" at {input_size} px" if input_size else "")
                   + f": labelled {labelled}" + (f" + {replay} plain scenes" if replay else "")
                   + (f" (encoder anchored, weight {anchor_weight:g})" if anchor_weight else "")
                   + (f" (outputs distilled, weight {distill_weight:g}, {distill_points} points)" if distill_weight else "")
                   + ("" if replay_labels else " (replayed masks not trained)")
                   + f", unlabelled {unlabelled}; {steps} steps "
                   f"({images_per_step} images x {masks_per_image} masks x {iterations} rounds); trainable: "
                   f"{', '.join(config.trainable)}" + (" + task table" if variant == "sum" else "")
                   + (f"; task weights {dict(zip(TASKS, config.task_weights))}" if config.task_weights else "")
                   + f"; loss {loss}")
        result = train_sum(sam, labelled, unlabelled, out, config, sum_config, refiner=refiner,
                           pseudo_cache=pseudo_cache, checkpoint=checkpoint, device=device, workers=workers,
                           resume=resume, progress=progress, log=typer.echo)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    _note_time_budget(time_budget, result.steps, steps)
    typer.echo(f"saved: {result.output} (steps {result.steps}, {result.seconds / 60:.1f} min); log: {result.log}")


@app.command("iou-head", help="Refit a SAM's IoU head (every other weight, so every mask, unchanged). --kind v1/v2: for segment-everything, on masks prompted anywhere on training scenes (the target: each mask's IoU with the object under its point, or with the best-matching object for a point on nothing). --kind tasks: for a SUM fine-tune's one-click pick, on its labelled scenes' task masks clicked at their centres and inside, each asked with its task (--replay adds plain scenes).")
def train_iou_head(
    out: Annotated[Path, typer.Option(help="Output weights (.safetensors), written atomically; calibrate them next with `samantic eval thresholds --checkpoint OUT --record`.")],
    model: Annotated[str, typer.Option(help="Registered model.")] = "sam_nano",
    checkpoint: Annotated[Optional[str], typer.Option(help="Weights whose head to refit (default: the model's shipped weights).")] = None,
    scenes: Annotated[Optional[int], typer.Option(min=1, help="Training scenes (rendered on the fly; default 400, or 120 for --kind tasks: SUM's labelled set).")] = None,
    first_seed: Annotated[Optional[int], typer.Option(help="Seed of the first training scene (training seeds are >= 1,000,000; default 46,000,000, or 3,000,000 for --kind tasks).")] = None,
    val_seeds: Annotated[str, typer.Option(help="Held-out scene seeds START:STOP on which the head is measured before and after.")] = "600:660",
    kind: Annotated[str, typer.Option(help="v1 (plain scenes, shape instances), v2 (panoptic scenes, entities) or tasks (panoptic scenes, SUM's task masks, each asked with its task).")] = "v1",
    points: Annotated[int, typer.Option(min=1, help="Uniformly drawn points per plain or panoptic scene (besides one at each object's centre).")] = 48,
    clicks: Annotated[int, typer.Option(min=0, help="--kind tasks: random clicks inside each task mask besides its centre.")] = 4,
    replay: Annotated[int, typer.Option(min=0, help="--kind tasks: plain (v1) training scenes added, asked as 'unspecified' (segment-everything's candidates).")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the collected examples.")] = 30,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, one cycle).")] = 1e-3,
    centre_weight: Annotated[float, typer.Option(help="Weight (> 0) of the clicks at objects' (task masks') centres in the loss, the 1-point measure's clicks; other prompts weigh 1.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed (point draws, batch order).")] = 0,
    cache: Annotated[Optional[Path], typer.Option(help="Keep the collected examples here; a rerun with the same scenes trains on them at once.")] = None,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads for torch (0: torch's default).")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    from samantic.cli.eval import parse_seeds
    from samantic.train.iou_head import refit_iou_head

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        result = refit_iou_head(model, out, checkpoint=checkpoint, first_seed=first_seed, n_scenes=scenes,
                                val_seeds=parse_seeds(val_seeds), scenes=kind, uniform_points=points, clicks=clicks,
                                replay=replay, epochs=epochs, lr=lr, centre_weight=centre_weight, seed=seed,
                                cache=cache, progress=progress, log=typer.echo)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(result.markdown())
    tasks = " (and with --task part for a SUM model's part thresholds)" if kind == "tasks" else ""
    typer.echo(f"saved: {result.output} ({result.seconds / 60:.1f} min); its scores changed scale, so it records no "
               f"thresholds: `samantic eval thresholds --model {model} --checkpoint {result.output} --record`{tasks}")


@app.command("blend")
def train_blend(
    fine_tune: Annotated[Path, typer.Argument(help="A fine-tune's weights (e.g. from `samantic train sum`).")],
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Fraction of the fine-tune's change kept: 0 is the base model, 1 the fine-tune (SUM: 0.8 kept the tasks and gave back the plain scenes).")],
    out: Annotated[Path, typer.Option(help="Output weights (.safetensors), written atomically.")],
    base: Annotated[Optional[str], typer.Option(help="Base weights (default: the shipped weights of the model the fine-tune's header names).")] = None,
) -> None:
    """Blend a fine-tune with its base model in weight space (WiSE-FT): base + alpha x (fine-tune - base).

    With --base another fine-tune of the same model, a uniform "soup" of the two at alpha 0.5.
    """
    from samantic.train.blend import blend_checkpoint

    try:
        path = blend_checkpoint(fine_tune, alpha, out, base=base)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(f"saved: {path} ({alpha:g} of {fine_tune}'s change from {base or 'its base'})")
