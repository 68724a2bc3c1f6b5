"""SAM's interactive training recipe, for training sam_nano from scratch or fine-tuning parts of any SAM.

Per image, a few ground-truth instances are prompted and refined over several
iterations, as in the SAM paper:

    iteration 0: one positive point inside the object (or, with probability
                 ``box_prob``, a jittered box); a point gets three outputs and
                 the mask loss is taken on the best of them
    iteration k: one more point from the error region of the previous
                 prediction (positive on a miss, negative on a false alarm),
                 plus the previous low-res logits as a mask prompt; one output
    loss:        focal * 20 + dice * 1 on the masks, MSE of the IoU head
                 against the real IoU of each output

The pieces a variant changes are objects passed to :class:`SamTrainer`:
``sampler`` (where prompts go; SUM's uncertainty-aware sampling),
``loss`` (SUM's uncertainty-weighted focal + dice) and ``prompt_hook``
(SUM's task prompts), so those variants plug in without rewriting the loop.

Per-instance extras travel with the data: a :class:`Sample` may carry
``tasks`` (a task index per mask) and ``uncertainty`` (a map in [0, 1] per
mask, e.g. SUM's pseudo-label uncertainty). They are augmented with the
masks and reach the hooks that declare a parameter for them: a sampler's
``first_points`` / ``next_points`` and a loss that take ``uncertainty=``
get the maps (zeros for instances without one), a ``prompt_hook`` that takes
``tasks=`` gets the task index of every prompt (0 where the data has none).
Hooks without those parameters, and data without the extras, train exactly
as before. A sample marked ``anchor`` (a whole image) has its embedding pulled
toward a frozen reference encoder's when the trainer is given one
(``anchor_encoder``: feature distillation against forgetting), and with a frozen
reference model (``reference``) the outputs of random single-point prompts on it are
distilled toward the reference's (masks' logits and predicted IoUs: what
segment-everything reads, kept on that kind of image).
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
DISTILL_CLIP = 4.0  # logits beyond this are certain either way: distillation matches them only up to it
STABILITY_OFFSET = 1.0  # segment-everything's stability_score_offset (segment-anything's default)
STABILITY_SLOPE = 4.0  # slope of the sigmoid steps of the soft stability score


def soft_stability(logits: torch.Tensor, offset: float = STABILITY_OFFSET,
                   slope: float = STABILITY_SLOPE) -> torch.Tensor:
    """A differentiable stability score of mask logits [..., H, W] -> [...]: the soft area above
    ``+offset`` over the soft area above ``-offset`` (segment-everything's score with the hard
    thresholds replaced by sigmoids of slope ``slope``; an empty mask scores 1)."""
    hi = torch.sigmoid(slope * (logits - offset)).flatten(-2).sum(-1)
    lo = torch.sigmoid(slope * (logits + offset)).flatten(-2).sum(-1)
    return (hi + 1.0) / (lo + 1.0)


@dataclass(frozen=True)
class SamTrainConfig:
    """Options of :class:`SamTrainer`.

    Attributes:
        steps: optimizer steps in total (a resumed run continues up to this).
        images_per_step: images per optimizer step.
        masks_per_image: instances prompted per image (fewer if the image has fewer).
        iterations: prompting rounds per instance (1 = single prompt, no refinement).
        box_prob: probability that an image's first prompts are boxes instead of points.
        zoom_prob: probability of training on a crop around one instance (1.5-4x its size)
            instead of the whole image, so small objects are also seen large.
        flat_steps: curriculum for training from scratch: an image is repainted as flat-colour
            instances on a flat background with probability 1 - step / flat_steps (0 disables).
            A randomly initialised encoder learns prompt-to-mask routing on such images within
            tens of steps, and does not on fully textured ones.
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with linear warm-up and cosine decay.
        focal_weight, dice_weight, iou_weight: loss weights; focal_alpha: focal loss weight of positives;
            focal_gamma: focal loss exponent (0 = alpha-weighted cross-entropy).
        grad_clip: max gradient norm (0 disables).
        trainable: which of image_encoder / prompt_encoder / mask_decoder are trained.
        checkpoint_every: steps between resumable checkpoints.
        log_every: steps between loss-log lines.
        seed: seeds prompt sampling, data order and augmentation.
        time_budget: seconds of training (0: no limit); the cosine decay then follows the
            larger of step progress and time progress, and training stops when it is spent
            (equal-wall-clock comparisons, runs on a lent GPU).
        freeze_batchnorm: batch-norm layers keep their running statistics (eval mode) while their
            scales and shifts train. For fine-tuning with small batches: a convolutional encoder
            trained on large batches computes, in train mode on a 4-image batch, embeddings far
            from its eval-mode ones (sam_nano v5: relative squared difference 0.58), and its running
            statistics drift toward the new data's.
        stability_weight: weight of a stability term on the first round's trained output: ``1 -`` a soft
            version of segment-everything's stability score (the area above logit +1 over the area above
            -1, with sigmoids of slope :data:`STABILITY_SLOPE` for the steps), so a fine-tune keeps its
            masks' boundaries as sharp as segment-everything's stability filter expects (0: off).
        task_weights: with samples that carry task indices (SUM), the relative chance of each task's masks
            being among an image's ``masks_per_image`` prompted ones (index = task; every weight > 0).
            Empty (the default): every mask alike. A fine-tune that must learn a granularity its base never
            draws (sam_nano and a composite thing's parts) sees that task's masks more often.
    """

    steps: int = 1000
    images_per_step: int = 4
    masks_per_image: int = 8
    iterations: int = 3
    box_prob: float = 0.3
    zoom_prob: float = 0.5
    flat_steps: int = 0
    lr: float = 8e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    focal_weight: float = 20.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    grad_clip: float = 1.0
    trainable: Tuple[str, ...] = PARTS
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    time_budget: float = 0.0
    freeze_batchnorm: bool = False
    stability_weight: float = 0.0
    task_weights: Tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("steps", "images_per_step", "masks_per_image", "iterations", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [p for p in self.trainable if p not in PARTS]
        if unknown or not self.trainable:
            raise ValueError(f"trainable must be a non-empty subset of {PARTS}, got {self.trainable!r}")
        if self.time_budget < 0:
            raise ValueError(f"time_budget must be >= 0 seconds, got {self.time_budget}")
        if not 0.0 <= self.box_prob <= 1.0:
            raise ValueError(f"box_prob must lie in [0, 1], got {self.box_prob}")
        if not self.stability_weight >= 0:
            raise ValueError(f"stability_weight must be >= 0, got {self.stability_weight}")
        weights = tuple(self.task_weights)
        if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                   for w in weights):
            raise ValueError(f"task_weights must be finite numbers > 0, got {self.task_weights!r}")
        object.__setattr__(self, "task_weights", tuple(float(w) for w in weights))


# ---------------------------------------------------------------- data


@dataclass
class Sample:
    """One training image and its instance masks (uint8 RGB [H, W, 3], bool [N, H, W]).

    Optional per-instance extras (see the module docstring for who reads them):
    ``tasks`` int64 [N], SUM task indices; ``uncertainty`` float [N, H, W] in [0, 1];
    ``classes`` int64 [N], class indices (-1: unknown) for a trainer with a ``token_classifier``.
    ``anchor``: the image's embedding is pulled toward a reference encoder's when the trainer has
    one (:class:`SamTrainer`'s ``anchor_encoder``: what the model did on such images is kept).
    """

    image: np.ndarray
    masks: np.ndarray
    tasks: Optional[np.ndarray] = None
    uncertainty: Optional[np.ndarray] = None
    anchor: bool = False
    classes: Optional[np.ndarray] = None


class CocoInstances:
    """Images and instance masks of a COCO dataset directory (``instances.json`` + ``images/``)."""

    def __init__(self, root: Path) -> None:
        root = Path(root)
        ann = root / "instances.json"
        if not ann.exists():
            raise FileNotFoundError(f"{root}: no instances.json (make one with `samantic data shapes --out {root}`)")
        data = json.loads(ann.read_text())
        self.root = root
        self.images = sorted(data["images"], key=lambda im: im["id"])
        if not self.images:
            raise ValueError(f"{ann}: the dataset has no images")
        categories = sorted(data.get("categories", []), key=lambda c: c["id"])
        self.class_names: Tuple[str, ...] = tuple(c["name"] for c in categories)
        self._class_index = {c["id"]: i for i, c in enumerate(categories)}
        self.anns: Dict[int, List[dict]] = {im["id"]: [] for im in self.images}
        for a in data["annotations"]:
            self.anns.setdefault(a["image_id"], []).append(a)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        from samantic.io import read_image
        from samantic.ops import rle_decode

        im = self.images[i]
        image = read_image(self.root / "images" / im["file_name"])
        anns = self.anns.get(im["id"], [])
        if anns:
            masks = rle_decode([a["segmentation"] for a in anns]).astype(bool)
        else:
            masks = np.zeros((0,) + image.shape[:2], bool)
        classes = np.array([self._class_index.get(a.get("category_id"), -1) for a in anns], np.int64)
        return Sample(image, masks, classes=classes)


class ShapesStream:
    """Endless shapes-world scenes rendered on the fly (seed, seed + 1, ...); no disk needed."""

    def __init__(self, seed: int = 0, size: Optional[Tuple[int, int]] = None) -> None:
        from samantic.train.data.shapes import CLASSES

        self.seed = seed
        self.size = size
        self.class_names: Tuple[str, ...] = tuple(CLASSES)

    def __len__(self) -> int:
        return 1 << 30

    def __repr__(self) -> str:
        return f"shapes:{self.seed}"

    def __getitem__(self, i: int) -> Sample:
        from samantic.train.data.shapes import render_scene

        scene = render_scene(self.seed + i, size=self.size)
        return Sample(scene.image, scene.masks, classes=np.asarray(scene.labels, np.int64))


class PanopticShapesStream(ShapesStream):
    """Endless v2 (panoptic) scenes rendered on the fly; the masks are every entity (things whole,
    stuff regions) and the parts of the composite things, so SAM learns every granularity SAM-CP
    and SUM ask of it. No class indices (``class_names`` empty)."""

    def __init__(self, seed: int = 0, size: Optional[Tuple[int, int]] = None) -> None:
        super().__init__(seed, size)
        self.class_names = ()

    def __repr__(self) -> str:
        return f"shapes-panoptic:{self.seed}"

    def __getitem__(self, i: int) -> Sample:
        from samantic.train.data.panoptic import render_panoptic

        scene = render_panoptic(self.seed + i, size=self.size)
        return Sample(scene.image, np.concatenate([scene.entity_masks, scene.part_masks]))


class MixedStream:
    """Interleaves ``k`` streams: item ``i`` is item ``(i // k) mod len`` of stream ``i % k``.

    Endless streams (length ``2**30``, as :class:`ShapesStream`) are read in order; a finite one
    (a dataset, a few replayed scenes) wraps around, so a random item is equally likely to come
    from each stream whatever their sizes.
    """

    def __init__(self, streams: Sequence[Any]) -> None:
        if not streams:
            raise ValueError("MixedStream needs at least one stream")
        self.streams = list(streams)
        for s in self.streams:
            if len(s) < 1:
                raise ValueError(f"MixedStream: stream {s!r} is empty")

    def __len__(self) -> int:
        return min(len(self.streams) * max(len(s) for s in self.streams), 1 << 30)

    def __repr__(self) -> str:
        return "+".join(repr(s) for s in self.streams)

    def __getitem__(self, i: int) -> Sample:
        k = len(self.streams)
        stream = self.streams[i % k]
        return stream[(i // k) % len(stream)]


class Anchored:
    """``data`` with every sample marked ``anchor``: a trainer with a frozen ``reference`` (or an
    ``anchor_encoder``) holds the model's outputs on every training image to the reference's while the
    samples' masks (and classes) still train. Length, class names and items are ``data``'s."""

    def __init__(self, data) -> None:
        self.data = data
        self.class_names: Tuple[str, ...] = tuple(getattr(data, "class_names", ()))

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return repr(self.data)

    def __getattr__(self, name: str):  # e.g. a dataset's ``root``
        if name == "data":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.data, name)

    def __getitem__(self, i: int) -> Sample:
        return replace(self.data[i], anchor=True)


_STREAMS = {"shapes": ShapesStream, "shapes-panoptic": PanopticShapesStream}


def open_dataset(spec: str):
    """``DIR`` (a COCO dataset), ``shapes:SEED`` (v1 scenes rendered on the fly),
    ``shapes-panoptic:SEED`` (v2 scenes: entities and parts) or ``shapes-mix:SEED`` (v1 and v2 alternating)."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in (*_STREAMS, "shapes-mix"):
        try:
            seed = int(rest)
            if seed < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"data spec must be DIR, shapes:SEED, shapes-panoptic:SEED or shapes-mix:SEED "
                             f"(SEED >= 0), got {spec!r}") from None
        if kind == "shapes-mix":
            return MixedStream([ShapesStream(seed), PanopticShapesStream(seed)])
        return _STREAMS[kind](seed)
    return CocoInstances(Path(spec))


# ---------------------------------------------------------------- prompts and losses


class PointSampler:
    """Where prompts go: uniform inside the object first, then inside the error region."""

    def first_points(self, gt: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """One positive point per mask. gt: bool[M, H, W] -> coords float[M, 1, 2] (x, y), labels int[M, 1]."""
        return self._sample(gt, torch.ones(len(gt), dtype=torch.int, device=gt.device), gen)

    def next_points(self, gt: torch.Tensor, pred: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """One point per mask from the error region of ``pred`` (bool[M, H, W])."""
        fn = gt & ~pred
        fp = pred & ~gt
        positive = fn.flatten(1).sum(1) >= fp.flatten(1).sum(1)
        region = torch.where(positive[:, None, None], fn, fp)
        empty = region.flatten(1).sum(1) == 0
        region[empty] = gt[empty]  # perfect prediction: confirm with a point inside
        labels = (positive | empty).int()
        return self._sample(region, labels, gen)

    @staticmethod
    def _sample(region: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        m, h, w = region.shape
        flat = region.reshape(m, -1).float()
        flat = flat + (flat.sum(1, keepdim=True) == 0).float()  # empty region: anywhere
        idx = torch.multinomial(flat, 1, generator=gen)[:, 0]
        coords = torch.stack([(idx % w).float() + 0.5, (idx // w).float() + 0.5], dim=-1)
        return coords[:, None, :], labels[:, None]


class MaskLoss:
    """Focal + dice per mask (SAM's 20:1), optionally pixel-weighted."""

    def __init__(self, focal_weight: float = 20.0, dice_weight: float = 1.0, alpha: float = 0.25, gamma: float = 2.0):
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.alpha = alpha
        self.gamma = gamma

    def __call__(self, logits: torch.Tensor, gt: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """logits, gt: [M, H, W] -> loss per mask [M]."""
        target = gt.float()
        p = torch.sigmoid(logits)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = p * target + (1 - p) * (1 - target)
        focal = ce * (1 - p_t) ** self.gamma
        focal = focal * (self.alpha * target + (1 - self.alpha) * (1 - target))
        if weight is not None:
            focal = focal * weight
            p = p * weight
            target = target * weight
        focal = focal.flatten(1).mean(1)
        inter = (p * target).flatten(1).sum(1)
        dice = 1 - (2 * inter + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
        return self.focal_weight * focal + self.dice_weight * dice


def warmup_cosine_lr(config, step: int, elapsed: float = 0.0) -> float:
    """The learning rate of ``step`` for a config with ``lr``, ``warmup_steps``, ``steps``, ``time_budget``
    (seconds, 0: none) and ``min_lr_ratio``: linear warm-up, then cosine decay to ``min_lr_ratio * lr`` over
    the steps or, with a time budget, over whichever of steps and time runs out first."""
    c = config
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    if c.time_budget > 0:
        t = max(t, elapsed / c.time_budget)
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def output_files(out, resume: bool) -> Tuple[Path, Path, Path]:
    """A trainer's ``(out, out.ckpt, out.log.jsonl)``: ``out`` must be .safetensors; its folder is made; a run
    that does not resume starts a fresh log."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt, log_path = out.with_name(out.name + ".ckpt"), out.with_name(out.name + ".log.jsonl")
    if not resume and log_path.exists():
        log_path.unlink()
    return out, ckpt, log_path


# ---------------------------------------------------------------- data preparation (in worker processes)


@dataclass
class Prepared:
    """One training image ready for the model.

    Attributes:
        image: uint8 [h, w, 3], resized so that its longest side is the model's input size (not padded).
        soft: float16 [M, L, L], the instance masks at the decoder's low-res size L (area-averaged, padded).
        boxes: float32 [M, 4], jittered XYXY boxes of the instances in input pixels.
        tasks: int64 [M] task indices, when the sample has them.
        uncertainty: float16 [M, L, L] uncertainty maps at the low-res size (area-averaged, 0 in the
            padding), when the sample has them.
        anchor: the sample's ``anchor`` flag.
        classes: int64 [M] class indices (-1: unknown), when the sample has them.
    """

    image: np.ndarray
    soft: np.ndarray
    boxes: np.ndarray
    tasks: Optional[np.ndarray] = None
    uncertainty: Optional[np.ndarray] = None
    anchor: bool = False
    classes: Optional[np.ndarray] = None


class Preparer:
    """Augments a :class:`Sample` and brings it to the model's input frame (numpy only, runs in workers)."""

    def __init__(self, img_size: int, low_res: int, config: SamTrainConfig) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.img_size = img_size
        self.low_res = low_res
        self.config = config
        self.transform = ResizeLongestSide(img_size)

    def __call__(self, sample: Sample, rng: np.random.Generator, step: int) -> Optional[Prepared]:
        import cv2

        c = self.config
        image, masks = sample.image, sample.masks
        tasks, unc, classes = sample.tasks, sample.uncertainty, sample.classes  # per-instance extras follow the masks
        if masks.shape[0] == 0:
            return None
        if rng.random() < 0.5:  # horizontal flip
            image = image[:, ::-1]
            masks = masks[:, :, ::-1]
            unc = None if unc is None else unc[:, :, ::-1]
        if rng.random() < c.zoom_prob:
            window = self._zoom_window(masks, rng)
            if window is not None:
                y0, x0, side = window
                image = image[y0 : y0 + side, x0 : x0 + side]
                masks = masks[:, y0 : y0 + side, x0 : x0 + side]
                kept = masks.reshape(len(masks), -1).sum(1) >= 16
                masks = masks[kept]
                tasks = None if tasks is None else tasks[kept]
                classes = None if classes is None else classes[kept]
                unc = None if unc is None else unc[kept, y0 : y0 + side, x0 : x0 + side]
            if masks.shape[0] == 0:
                return None
        if c.flat_steps and rng.random() < 1.0 - step / c.flat_steps:
            image = self._flat(masks, image.shape, rng)
        if c.task_weights and tasks is not None and masks.shape[0] > c.masks_per_image:
            tasks = np.asarray(tasks, np.int64)
            bad = tasks[(tasks < 0) | (tasks >= len(c.task_weights))]
            if bad.size:
                raise ValueError(f"task_weights has {len(c.task_weights)} entries; a sample has task {int(bad[0])}")
            w = np.asarray(c.task_weights)[tasks]
            keep = rng.choice(masks.shape[0], size=c.masks_per_image, replace=False, p=w / w.sum())
        else:
            keep = rng.permutation(masks.shape[0])[: c.masks_per_image]
        masks = masks[keep]
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        h, w = resized.shape[:2]
        s, lr = self.img_size, self.low_res
        full = np.zeros((len(masks), s, s), np.float32)
        for i, mk in enumerate(masks):
            full[i, :h, :w] = cv2.resize(mk.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        ok = full.reshape(len(full), -1).any(1)
        if not ok.any():
            return None
        full = full[ok]
        f = s // lr
        soft = full.reshape(len(full), lr, f, lr, f).mean((2, 4))
        low_unc = None
        if unc is not None:
            unc = unc[keep][ok]
            up = np.zeros((len(unc), s, s), np.float32)
            for i, u in enumerate(unc):
                up[i, :h, :w] = cv2.resize(np.asarray(u, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
            low_unc = np.clip(up.reshape(len(up), lr, f, lr, f).mean((2, 4)), 0.0, 1.0).astype(np.float16)
        if tasks is not None:
            tasks = np.asarray(tasks, np.int64)[keep][ok]
        if classes is not None:
            classes = np.asarray(classes, np.int64)[keep][ok]
        boxes = np.empty((len(full), 4), np.float32)
        for i, mk in enumerate(full):
            ys = np.flatnonzero(mk.any(1))
            xs = np.flatnonzero(mk.any(0))
            x0, x1, y0, y1 = xs[0], xs[-1], ys[0], ys[-1]
            bw, bh = x1 - x0 + 1, y1 - y0 + 1
            noise = np.clip(rng.normal(0, 0.1, 4) * np.array([bw, bh, bw, bh]), -20, 20)
            boxes[i] = [x0 + noise[0], y0 + noise[1], x1 + noise[2], y1 + noise[3]]
        np.clip(boxes, 0, s - 1, out=boxes)
        return Prepared(np.ascontiguousarray(resized), soft.astype(np.float16), boxes, tasks, low_unc,
                        bool(sample.anchor), classes)

    @staticmethod
    def _flat(masks: np.ndarray, shape, rng: np.random.Generator) -> np.ndarray:
        """The instances painted in random flat colours (back to front) on a flat background."""
        image = np.empty(shape, np.uint8)
        image[:] = rng.integers(0, 256, 3)
        for m in masks:
            image[m] = rng.integers(0, 256, 3)
        return image

    @staticmethod
    def _zoom(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """A square crop around one random instance, 1.5-4x its size (clipped to the image)."""
        window = Preparer._zoom_window(masks, rng)
        if window is None:
            return image, masks
        y0, x0, side = window
        crop = masks[:, y0 : y0 + side, x0 : x0 + side]
        keep = crop.reshape(len(crop), -1).sum(1) >= 16
        return image[y0 : y0 + side, x0 : x0 + side], crop[keep]

    @staticmethod
    def _zoom_window(masks: np.ndarray, rng: np.random.Generator) -> Optional[Tuple[int, int, int]]:
        """(y0, x0, side) of :meth:`_zoom`'s crop, or None when the drawn instance is empty."""
        h, w = masks.shape[1:]
        k = int(rng.integers(len(masks)))
        ys, xs = np.nonzero(masks[k])
        if len(xs) == 0:
            return None
        side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) * rng.uniform(1.5, 4.0)
        side = int(min(max(side, 32), h, w))
        cx = (xs.min() + xs.max()) / 2 + rng.uniform(-0.25, 0.25) * side
        cy = (ys.min() + ys.max()) / 2 + rng.uniform(-0.25, 0.25) * side
        x0 = int(np.clip(cx - side / 2, 0, w - side))
        y0 = int(np.clip(cy - side / 2, 0, h - side))
        return y0, x0, side


class PreparedStream(torch.utils.data.IterableDataset):
    """Endless prepared images drawn at random from ``data``; each DataLoader worker draws its own.

    ``step`` is a shared counter (``multiprocessing.Value``) so that step-dependent
    augmentation (the flat-colour curriculum) follows the trainer across processes.
    """

    def __init__(self, data, preparer: Preparer, seed: int, start_step: int, step) -> None:
        self.data = data
        self.preparer = preparer
        self.seed = seed
        self.start_step = start_step
        self.step = step

    def __iter__(self) -> Iterator[Prepared]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, self.start_step, worker])
        order = random.Random(self.seed * 7919 + self.start_step * 31 + worker)
        n = len(self.data)
        while True:
            item = self.preparer(self.data[order.randrange(n)], rng, self.step.value)
            if item is not None:
                yield item


def _quiet_worker(_: int) -> None:
    """One OpenCV thread per data worker: the workers are the parallelism.

    Only when this worker imports OpenCV itself: a worker forked from a process whose OpenCV
    thread pool has run (the parent rendered or resized something) hangs in
    ``cv2.setNumThreads``, so an inherited OpenCV is left as it is.
    """
    import sys

    if "cv2" in sys.modules:
        return
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


def collate(items: Sequence[Prepared]) -> Dict[str, torch.Tensor]:
    """Images padded to one square batch (uint8 NHWC) with their sizes; instances concatenated with image indexes.

    ``tasks`` (int64 [P]) and ``uncertainty`` (float16 [P, L, L]) are added when any item has them;
    the instances of items without them get task 0 and zero uncertainty. ``classes`` (int64 [P]) likewise,
    -1 for instances without one. ``anchor`` (bool [B]) is added when any item is anchored.
    """
    side = max(max(it.image.shape[:2]) for it in items)
    images = np.zeros((len(items), side, side, 3), np.uint8)
    sizes = np.zeros((len(items), 2), np.int64)
    for i, it in enumerate(items):
        h, w = it.image.shape[:2]
        images[i, :h, :w] = it.image
        sizes[i] = (h, w)
    batch = {
        "images": torch.from_numpy(images),
        "sizes": torch.from_numpy(sizes),
        "soft": torch.from_numpy(np.concatenate([it.soft for it in items])),
        "boxes": torch.from_numpy(np.concatenate([it.boxes for it in items])),
        "image_index": torch.from_numpy(np.concatenate([np.full(len(it.soft), i) for i, it in enumerate(items)])),
    }
    if any(it.tasks is not None for it in items):
        batch["tasks"] = torch.from_numpy(np.concatenate(
            [it.tasks if it.tasks is not None else np.zeros(len(it.soft), np.int64) for it in items]))
    if any(it.uncertainty is not None for it in items):
        batch["uncertainty"] = torch.from_numpy(np.concatenate(
            [it.uncertainty if it.uncertainty is not None else np.zeros(it.soft.shape, np.float16) for it in items]))
    if any(it.classes is not None for it in items):
        batch["classes"] = torch.from_numpy(np.concatenate(
            [it.classes if it.classes is not None else np.full(len(it.soft), -1, np.int64) for it in items]))
    if any(it.anchor for it in items):
        batch["anchor"] = torch.tensor([it.anchor for it in items], dtype=torch.bool)
    return batch


# ---------------------------------------------------------------- batched decoding


def decode_prompts(mask_decoder, src: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                   dense: torch.Tensor, multimask: bool, return_tokens: bool = False):
    """segment-anything's ``MaskDecoder.forward`` with one image embedding per prompt.

    ``MaskDecoder`` repeats a single image's embedding for every prompt; training
    decodes the prompts of many images in one call, so ``src`` is already per
    prompt ([P, C, h, w]: ``embeddings[image_index]``). Same modules and math
    (tested against ``MaskDecoder`` for a single image). Returns (masks, predicted IoUs) of the
    selected outputs and, with ``return_tokens``, their output mask tokens [P, K, C] too (what the
    hypernetworks, U-SAM's head and ``eval probe`` read).
    """
    dec = mask_decoder
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse), dim=1)
    skip = None
    split = getattr(dec, "split_embedding", None)
    if split is not None:  # a decoder whose image embedding packs extra features for its upscaling
        src, skip = split(src)
    src = src + dense
    b, c, h, w = src.shape
    hs, src = dec.transformer(src, image_pe, tokens)  # a [1, C, h, w] positional encoding broadcasts
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + dec.num_mask_tokens), :]
    src = src.transpose(1, 2).reshape(b, c, h, w)
    upscaled = dec.output_upscaling(src) if skip is None else dec.upscale(src, skip)
    hyper_in = torch.stack([dec.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                            for i in range(dec.num_mask_tokens)], dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou_pred = dec.iou_prediction_head(iou_token_out)
    sel = slice(1, None) if multimask else slice(0, 1)
    if return_tokens:
        return masks[:, sel], iou_pred[:, sel], mask_tokens_out[:, sel]
    return masks[:, sel], iou_pred[:, sel]


# ---------------------------------------------------------------- trainer


@dataclass
class TrainResult:
    output: Path
    steps: int
    seconds: float
    last_loss: float
    log: Path
    history: List[Dict[str, float]] = field(default_factory=list)


class SamTrainer:
    """Trains a segment-anything ``Sam`` with the interactive recipe.

    Every step encodes ``images_per_step`` images in one batch and decodes the
    prompts of all their instances in one batched decoder call per round.
    Data is rendered and augmented by ``workers`` DataLoader processes (0: in
    this process), so the model never waits for the CPU-side preparation.

    Args:
        model: the ``Sam`` to train (e.g. ``create_model("sam_nano", pretrained=False)``).
        config: a :class:`SamTrainConfig`.
        data: indexable dataset of :class:`Sample` (``CocoInstances``, ``ShapesStream``, ...).
        sampler: prompt placement (default :class:`PointSampler`); when its ``first_points`` /
            ``next_points`` take ``uncertainty=``, they get the batch's uncertainty maps [P, L, L].
        loss: per-mask loss (default :class:`MaskLoss`); one whose ``__call__`` takes ``uncertainty=``
            gets the maps too (repeated like the masks for multi-mask outputs).
        prompt_hook: ``f(sparse, dense) -> (sparse, dense)`` applied to the prompt embeddings
            (e.g. adding a task embedding); ``f(sparse, dense, tasks=...)`` when it takes ``tasks``:
            int64 [P], the task index of every prompt (0, "unspecified", for data without tasks).
        task_answers: a prompt that carries a task (index > 0) has one right answer, so in a
            multi-output round every output is trained toward its mask (the mean of their losses)
            instead of the best one only; prompts without a task keep SAM's best-of-three. With a
            task prompt this makes the task embedding the only way to tell a part from its
            thing at the same click (the best-of-three loss lets one output learn the part whatever
            the task says, leaving the task only the IoU ranking to steer).
        anchor_encoder: a frozen reference image encoder (e.g. a copy of the base's). On images whose
            sample is marked ``anchor`` the trained encoder's embeddings are pulled toward its
            embeddings: ``anchor_weight`` times their mean squared difference relative to the
            reference's mean square (feature distillation: the encoder adapts to the new data while
            keeping what it computed on the anchored kind of image). Only when the encoder trains.
        anchor_weight: weight of that term (> 0 with an ``anchor_encoder``).
        reference: a frozen reference ``Sam`` (e.g. a copy of the base before any step). On anchored
            images ``distill_points`` random single-point prompts (anywhere in the image, as
            segment-everything's grid) are decoded by both models with three outputs, the trained one
            asked task 0 through ``prompt_hook``; ``distill_weight`` times the mean squared difference
            of their low-res logits over the boundary band (the reference's clipped to +-``DISTILL_CLIP``,
            where masks and stability scores are decided; pixels where both lie beyond it on the same
            side do not count) plus ``iou_weight`` times the squared difference of their predicted IoUs
            is added (output distillation, "learning without forgetting": what
            segment-everything keeps and how it scores it stays the reference's on that kind of image).
        distill_weight: weight of that term (> 0 with a ``reference``).
        distill_points: prompts per anchored image.
        anchor_labels: False: anchored images' instances get no mask loss (their images serve the
            anchor and distillation terms only: the base's outputs are the only target there).
        token_classifier: a module from the decoder's output mask tokens [..., C] to class logits
            (e.g. ``torch.nn.Linear(C, n_classes)``), trained with the model: every output token of every
            round whose prompted instance has a class (data with ``classes``, e.g. ``ShapesStream``) adds
            ``class_weight`` times the cross-entropy of its class to the loss. SAM's recipe asks the tokens
            nothing about classes; this asks them, so that a head reading them (U-SAM's, ``eval probe``)
            finds the class there. Saved beside the weights (``OUT-stem.token_classes.safetensors``).
        class_weight: weight of that term (> 0 with a ``token_classifier``).
        device: where the model trains (``"cpu"``, ``"cuda"``, ...).
        workers: data-preparation processes (0 = in the training process).
        amp: bfloat16 autocast for the forward pass (default: on for CUDA).
    """

    def __init__(self, model, config: SamTrainConfig, data, sampler: Optional[PointSampler] = None,
                 loss: Optional[MaskLoss] = None, prompt_hook: Optional[Callable] = None,
                 device: str = "cpu", workers: int = 0, amp: Optional[bool] = None,
                 task_answers: bool = False, anchor_encoder: Optional[torch.nn.Module] = None,
                 anchor_weight: float = 0.0, reference: Optional[torch.nn.Module] = None,
                 distill_weight: float = 0.0, distill_points: int = 16, anchor_labels: bool = True,
                 token_classifier: Optional[torch.nn.Module] = None, class_weight: float = 0.0) -> None:
        if token_classifier is not None and not class_weight > 0:
            raise ValueError(f"class_weight must be > 0 with a token_classifier, got {class_weight}")
        if reference is not None:
            if not distill_weight > 0:
                raise ValueError(f"distill_weight must be > 0 with a reference model, got {distill_weight}")
            if isinstance(distill_points, bool) or not isinstance(distill_points, int) or distill_points < 1:
                raise ValueError(f"distill_points must be an integer >= 1, got {distill_points!r}")
        if anchor_encoder is not None:
            if "image_encoder" not in config.trainable:
                raise ValueError("anchor_encoder: the image encoder does not train, so there is nothing to anchor")
            if not anchor_weight > 0:
                raise ValueError(f"anchor_weight must be > 0 with an anchor_encoder, got {anchor_weight}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.config = config
        self.data = data
        self.sampler = sampler or PointSampler()
        self.loss = loss or MaskLoss(config.focal_weight, config.dice_weight, alpha=config.focal_alpha, gamma=config.focal_gamma)
        self.prompt_hook = prompt_hook
        self.task_answers = task_answers
        self.anchor_weight = float(anchor_weight)
        self.anchor_encoder = None
        if anchor_encoder is not None:
            self.anchor_encoder = anchor_encoder.to(self.device).eval().requires_grad_(False)
        self.anchor_labels = bool(anchor_labels)
        self.distill_weight = float(distill_weight)
        self.distill_points = distill_points
        self.reference = None
        if reference is not None:
            self.reference = reference.to(self.device).eval().requires_grad_(False)
        self._hook_takes_tasks = prompt_hook is not None and _takes(prompt_hook, "tasks")
        self._sampler_takes_uncertainty = _takes(self.sampler.first_points, "uncertainty") and \
            _takes(self.sampler.next_points, "uncertainty")
        self._loss_takes_uncertainty = _takes(self.loss, "uncertainty")
        self.workers = workers
        self.amp = (self.device.type == "cuda") if amp is None else amp
        self.img_size = model.image_encoder.img_size
        self.low_res = model.prompt_encoder.mask_input_size[0]
        for name in PARTS:
            getattr(model, name).requires_grad_(name in config.trainable)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.token_classifier = None
        self.class_weight = float(class_weight)
        if token_classifier is not None:
            self.token_classifier = token_classifier.to(self.device).train()
            self.params += list(self.token_classifier.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.elapsed = 0.0  # training seconds before this run (resumed runs)
        self.gen = torch.Generator(device=self.device).manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)

    def lr_at(self, step: int, elapsed: float = 0.0) -> float:
        """Linear warm-up, then cosine decay over the steps or, with ``time_budget``, over the time budget."""
        return warmup_cosine_lr(self.config, step, elapsed)

    # -- data

    def _loader(self, step_value, data=None, seed: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
        """Collated batches of ``data`` (default: the trainer's), drawn with ``seed`` (default: the config's)."""
        stream = PreparedStream(self.data if data is None else data, Preparer(self.img_size, self.low_res, self.config),
                                self.config.seed if seed is None else seed, self.step, step_value)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=self.config.images_per_step, collate_fn=collate, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.workers else None,
            persistent_workers=False, worker_init_fn=_quiet_worker,
        )
        return iter(loader)

    def _images(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised, zero-padded encoder input [B, 3, S, S] (``Sam.preprocess`` on the device)."""
        x = batch["images"].to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self.model.pixel_mean) / self.model.pixel_std
        s = x.shape[-1]
        sizes = batch["sizes"].to(self.device)
        r = torch.arange(s, device=self.device)
        inside = (r[None, :, None] < sizes[:, 0, None, None]) & (r[None, None, :] < sizes[:, 1, None, None])
        x = x * inside[:, None]
        if s < self.img_size:
            x = F.pad(x, (0, self.img_size - s, 0, self.img_size - s))
        return x

    # -- one step

    def _decode(self, emb, index, coords, labels, boxes, mask_input, multimask, tasks=None, return_tokens=False):
        sparse, dense = self.model.prompt_encoder(
            points=(coords, labels) if coords is not None else None, boxes=boxes, masks=mask_input
        )
        if self._hook_takes_tasks:
            if tasks is None:
                tasks = torch.zeros(len(index), dtype=torch.long, device=index.device)
            sparse, dense = self.prompt_hook(sparse, dense, tasks=tasks)
        elif self.prompt_hook is not None:
            sparse, dense = self.prompt_hook(sparse, dense)
        return decode_prompts(self.model.mask_decoder, emb[index], self.model.prompt_encoder.get_dense_pe(),
                              sparse, dense, multimask, return_tokens=return_tokens)

    def _batch_loss(self, emb: torch.Tensor, index: torch.Tensor, soft: torch.Tensor,
                    box_prompts: Optional[torch.Tensor], uncertainty: Optional[torch.Tensor] = None,
                    tasks: Optional[torch.Tensor] = None,
                    classes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Loss of all prompted instances of a batch; soft: [P, L, L] ground truth at the low-res size.

        Losses, IoU targets and error regions live at the decoder's low-res
        mask size (S / 4), against area-averaged (soft) ground truth: 16x
        fewer pixels than full size, for the same gradients in expectation.
        ``uncertainty`` [P, L, L] goes to the sampler and the loss that take it,
        ``tasks`` [P] to a prompt hook that takes it; ``classes`` [P] (-1: unknown) to the token
        classifier's cross-entropy.
        """
        c = self.config
        scale = self.img_size / self.low_res
        hard = soft > 0.5
        hard = torch.where(hard.flatten(1).any(1)[:, None, None], hard, soft > 0)  # tiny objects
        coords = labels = mask_input = None
        boxes = box_prompts
        total = emb.new_zeros((), dtype=torch.float32)
        stats: Dict[str, float] = {}
        prev_pred = None
        sampler_extra = {"uncertainty": uncertainty} if self._sampler_takes_uncertainty and uncertainty is not None \
            else {}
        classify = self.token_classifier is not None and classes is not None and bool((classes >= 0).any())
        for it in range(c.iterations):
            if it == 0 and boxes is not None:
                multimask = False
            elif it == 0:
                coords, labels = self.sampler.first_points(hard, self.gen, **sampler_extra)
                coords = coords * scale
                multimask = True
            else:
                nc, nl = self.sampler.next_points(hard, prev_pred, self.gen, **sampler_extra)
                nc = nc * scale
                coords = nc if coords is None else torch.cat([coords, nc], 1)
                labels = nl if labels is None else torch.cat([labels, nl], 1)
                multimask = False
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = self._decode(emb, index, coords, labels, boxes, mask_input, multimask, tasks, classify)
            low_res, iou_pred = out[0].float(), out[1].float()  # [P, K, L, L], [P, K]
            if classify:
                known = classes >= 0
                logits = self.token_classifier(out[2][known].float())  # [P', K, n_classes]
                target = classes[known][:, None].expand(-1, logits.shape[1])
                class_loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
                total = total + self.class_weight * class_loss
                stats[f"class_loss_{it}"] = class_loss.detach()
                stats[f"class_acc_{it}"] = (logits.argmax(-1) == target).float().mean().detach()
            m, k = low_res.shape[:2]
            if self._loss_takes_uncertainty and uncertainty is not None:
                per = self.loss(low_res.flatten(0, 1), soft.repeat_interleave(k, 0),
                                uncertainty=uncertainty.repeat_interleave(k, 0)).view(m, k)
            else:
                per = self.loss(low_res.flatten(0, 1), soft.repeat_interleave(k, 0)).view(m, k)
            best = per.argmin(1)
            chosen = per.gather(1, best[:, None])[:, 0]
            if self.task_answers and tasks is not None and k > 1:
                chosen = torch.where(tasks > 0, per.mean(1), chosen)
            mask_loss = chosen.mean()
            sel = torch.arange(m, device=low_res.device)
            if it == 0 and c.stability_weight > 0:
                stab = soft_stability(low_res[sel, best])
                total = total + c.stability_weight * (1.0 - stab).mean()
                stats["soft_stability"] = stab.mean().detach()
            with torch.no_grad():
                pred = low_res > 0
                inter = (pred & hard[:, None]).flatten(2).sum(2).float()
                union = (pred | hard[:, None]).flatten(2).sum(2).float()
                true_iou = inter / union.clamp(min=1)
            iou_loss = F.mse_loss(iou_pred, true_iou)
            total = total + mask_loss + c.iou_weight * iou_loss
            prev_pred = pred[sel, best]
            mask_input = low_res[sel, best][:, None].detach()
            stats[f"iou_{it}"] = true_iou[sel, best].mean().detach()
            if it == 0:
                stats["mask_loss_0"] = mask_loss.detach()
            # a box prompt stays; later rounds add points and the previous mask on top of it
        return total / c.iterations, stats

    def distill_prompts(self, sizes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``distill_points`` random points per image, uniform inside each image's valid region
        (``sizes`` [N, 2]: rows, columns in the encoder's input frame); returns (image index [N * k],
        coordinates [N * k, 1, 2] as x, y)."""
        k = self.distill_points
        n = sizes.shape[0]
        u = torch.rand(n, k, 2, generator=self.gen, device=self.device)
        coords = u * sizes.flip(1)[:, None, :].float()  # (x, y) = (column, row)
        index = torch.arange(n, device=self.device).repeat_interleave(k)
        return index, coords.reshape(n * k, 1, 2)

    def _distill_loss(self, emb: torch.Tensor, ref_emb: torch.Tensor,
                      sizes: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The output-distillation term on anchored images (``reference``; see the class docstring):
        mean squared difference of the low-res logits over the boundary band + ``iou_weight`` x squared
        difference of the predicted IoUs, the trained model asked task 0."""
        index, coords = self.distill_prompts(sizes)
        labels = torch.ones(coords.shape[:2], dtype=torch.long, device=self.device)
        ref_model = self.reference
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            sparse, dense = ref_model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            ref_low, ref_iou = decode_prompts(ref_model.mask_decoder, ref_emb[index], ref_model.prompt_encoder.get_dense_pe(),
                                              sparse, dense, True)
        tasks = torch.zeros(len(index), dtype=torch.long, device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            low, iou = self._decode(emb, index, coords, labels, None, None, True, tasks)
        c = DISTILL_CLIP
        ref_low, low = ref_low.float().clamp(-c, c), low.float()
        agree = ((ref_low >= c) & (low >= c)) | ((ref_low <= -c) & (low <= -c))  # both certain, same side
        err = torch.where(agree, torch.zeros_like(low), low - ref_low)
        diff = err.pow(2).sum() / (~agree).sum().clamp(min=1)
        iou_diff = F.mse_loss(iou.float(), ref_iou.float())
        return diff + self.config.iou_weight * iou_diff, {"distill": diff.detach(), "distill_iou": iou_diff.detach()}

    def train_step(self, batch: Dict[str, torch.Tensor]) -> Tuple[float, Dict[str, float]]:
        """One optimizer step on a collated batch; returns the loss and the step's statistics."""
        c = self.config
        x = self._images(batch)
        soft = batch["soft"].to(self.device, non_blocking=True).float()
        index = batch["image_index"].to(self.device, non_blocking=True)
        boxes = batch["boxes"].to(self.device, non_blocking=True) if self.rng.random() < c.box_prob else None
        uncertainty = batch.get("uncertainty")
        uncertainty = None if uncertainty is None else uncertainty.to(self.device, non_blocking=True).float()
        tasks = batch.get("tasks")
        tasks = None if tasks is None else tasks.to(self.device, non_blocking=True)
        classes = batch.get("classes")
        classes = None if classes is None else classes.to(self.device, non_blocking=True)
        with torch.set_grad_enabled("image_encoder" in c.trainable), \
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            emb = self.model.image_encoder(x)
        anchor = batch.get("anchor")
        if not self.anchor_labels and anchor is not None and bool(anchor.any()):
            keep = ~anchor.to(self.device)[index]  # anchored images' instances: no mask loss
            soft, index = soft[keep], index[keep]
            boxes = None if boxes is None else boxes[keep]
            uncertainty = None if uncertainty is None else uncertainty[keep]
            tasks = None if tasks is None else tasks[keep]
            classes = None if classes is None else classes[keep]
        if len(index):
            loss, stats = self._batch_loss(emb, index, soft, boxes, uncertainty, tasks, classes)
        else:
            loss, stats = emb.new_zeros((), dtype=torch.float32), {}
        if anchor is not None and bool(anchor.any()) and (self.anchor_encoder is not None or self.reference is not None):
            anchor = anchor.to(self.device)
            ref = None
            if self.anchor_encoder is not None:
                with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    ref = self.anchor_encoder(x[anchor]).float()
                drift = (emb[anchor].float() - ref).pow(2).mean() / ref.pow(2).mean().clamp(min=1e-12)
                loss = loss + self.anchor_weight * drift
                stats["anchor"] = drift.detach()
            if self.reference is not None:
                if ref is None or self.anchor_encoder is not self.reference.image_encoder:
                    with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                        ref = self.reference.image_encoder(x[anchor]).float()
                sizes = batch["sizes"].to(self.device)[anchor]
                distill, dstats = self._distill_loss(emb[anchor], ref, sizes)
                loss = loss + self.distill_weight * distill
                stats.update(dstats)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
        self.optimizer.step()
        self.step += 1
        return float(loss.detach()), {k: float(v) for k, v in stats.items()}

    # -- loop

    def train(self, out: Path, resume: bool = False, progress: bool = True,
              on_log: Optional[Callable[[Dict[str, float]], None]] = None) -> TrainResult:
        """Trains up to ``config.steps`` steps (or ``config.time_budget`` seconds);
        writes ``out`` (safetensors), ``out.ckpt`` and ``out.log.jsonl``."""
        import multiprocessing

        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from samantic.models import save_checkpoint

        out, ckpt, log_path = output_files(out, resume)
        if resume and ckpt.exists():
            self.load_state(ckpt)
        c = self.config
        self.model.train()
        for name in PARTS:  # a frozen part stays in eval mode: its normalisation statistics do not drift either
            if name not in c.trainable:
                getattr(self.model, name).eval()
        if c.freeze_batchnorm:
            for m in self.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        step_value = multiprocessing.Value("i", self.step)
        batches = self._loader(step_value)
        history: List[Dict[str, float]] = []
        t_start = time.perf_counter()
        elapsed0 = self.elapsed
        last = float("nan")
        window: List[float] = []
        window_stats: Dict[str, List[float]] = {}

        def out_of_time() -> bool:
            return c.time_budget > 0 and self.elapsed >= c.time_budget

        columns = [TextColumn("train sam"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task("train", total=c.steps, completed=self.step, loss="-")
            while self.step < c.steps and not out_of_time():
                for g in self.optimizer.param_groups:  # a group may scale the schedule ("lr_scale")
                    g["lr"] = self.lr_at(self.step, self.elapsed) * g.get("lr_scale", 1.0)
                batch = next(batches)
                last, stats = self.train_step(batch)
                step_value.value = self.step
                self.elapsed = elapsed0 + time.perf_counter() - t_start
                window.append(last)
                for k, v in stats.items():
                    window_stats.setdefault(k, []).append(v)
                done = self.step == c.steps or out_of_time()
                if self.step % c.log_every == 0 or done:
                    rec = {"step": self.step, "loss": sum(window) / len(window),
                           "lr": self.lr_at(self.step - 1, self.elapsed), "seconds": self.elapsed,
                           **{k: sum(v) / len(v) for k, v in window_stats.items()}}
                    window = []
                    window_stats = {}
                    history.append(rec)
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if on_log:
                        on_log(rec)
                    bar.update(task, loss=f"{rec['loss']:.3f}")
                if self.step % c.checkpoint_every == 0 or done:
                    self.save_state(ckpt)
                bar.update(task, completed=self.step)
        del batches
        self.model.eval()
        meta = {"training": asdict(c), "steps_done": self.step, "seconds": round(self.elapsed, 1),
                "data": getattr(self.data, "root", repr(self.data))}
        meta["training"]["trainable"] = list(c.trainable)
        if self.reference is not None:  # trainer terms outside the config: the weights record them too
            meta["distill"] = {"weight": self.distill_weight, "points": self.distill_points}
        if self.token_classifier is not None:
            meta["class_weight"] = self.class_weight
        save_checkpoint(self.model, out, metadata={"training": json.dumps(meta, default=str)})
        if self.token_classifier is not None:
            self.token_classifier.eval()
            names = getattr(self.data, "class_names", ())
            save_checkpoint(self.token_classifier.state_dict(), token_classes_path(out),
                            metadata={"class_names": json.dumps(list(names)), "class_weight": str(self.class_weight)})
        return TrainResult(out, self.step, time.perf_counter() - t_start, last, log_path, history)

    # -- resumable state (loaded with weights_only=True: tensors and primitives only)

    def save_state(self, path: Path) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "torch_rng": self.gen.get_state(),
            "numpy_rng": json.dumps(self.rng.bit_generator.state),
            "config": json.dumps(asdict(self.config)),
        }
        if self.token_classifier is not None:
            state["token_classifier"] = self.token_classifier.state_dict()
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def load_state(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        if self.token_classifier is not None:
            if "token_classifier" not in state:
                raise ValueError(f"{path}: a checkpoint without a token classifier; resume it without one")
            self.token_classifier.load_state_dict(state["token_classifier"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))
        try:
            self.gen.set_state(state["torch_rng"].cpu())
        except RuntimeError:  # saved on another device type: a fresh stream, seeded by the step
            self.gen.manual_seed(self.config.seed * 1000003 + self.step)
        self.rng.bit_generator.state = json.loads(state["numpy_rng"])


def token_classes_path(out: Path) -> Path:
    """Where :class:`SamTrainer` writes its token classifier beside the weights ``out``."""
    out = Path(out)
    return out.with_name(out.stem + ".token_classes.safetensors")


def _takes(fn: Callable, name: str) -> bool:
    """Whether ``fn`` accepts a keyword argument ``name`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.kind == p.VAR_KEYWORD
               for p in params)


def export_weights(src: Path, dst: Path, dtype: str = "float16", extra: Optional[Dict[str, Any]] = None) -> Path:
    """Writes trained weights for shipping: floating tensors cast to ``dtype``, the source's metadata kept.

    ``create_model`` loads such a file into a float32 model (the cast happens on load).
    """
    from safetensors import safe_open

    from samantic.models import save_checkpoint

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    cast = getattr(torch, dtype)
    state = {k: (v.to(cast) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    meta["dtype"] = dtype
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    return save_checkpoint(state, dst, metadata=meta)
