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
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


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

    def __post_init__(self) -> None:
        for name in ("steps", "images_per_step", "masks_per_image", "iterations", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [p for p in self.trainable if p not in PARTS]
        if unknown or not self.trainable:
            raise ValueError(f"trainable must be a non-empty subset of {PARTS}, got {self.trainable!r}")
        if not 0.0 <= self.box_prob <= 1.0:
            raise ValueError(f"box_prob must lie in [0, 1], got {self.box_prob}")


# ---------------------------------------------------------------- data


@dataclass
class Sample:
    """One training image and its instance masks (uint8 RGB [H, W, 3], bool [N, H, W])."""

    image: np.ndarray
    masks: np.ndarray


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
        return Sample(image, masks)


class ShapesStream:
    """Endless shapes-world scenes rendered on the fly (seed, seed + 1, ...); no disk needed."""

    def __init__(self, seed: int = 0, size: Optional[Tuple[int, int]] = None) -> None:
        self.seed = seed
        self.size = size

    def __len__(self) -> int:
        return 1 << 30

    def __repr__(self) -> str:
        return f"shapes:{self.seed}"

    def __getitem__(self, i: int) -> Sample:
        from samantic.train.data.shapes import render_scene

        scene = render_scene(self.seed + i, size=self.size)
        return Sample(scene.image, scene.masks)


def open_dataset(spec: str):
    """``DIR`` (a COCO dataset) or ``shapes:SEED`` (scenes rendered on the fly)."""
    if spec.startswith("shapes:"):
        try:
            seed = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"data spec must be DIR or shapes:SEED, got {spec!r}") from None
        return ShapesStream(seed)
    return CocoInstances(Path(spec))


# ---------------------------------------------------------------- prompts and losses


class PointSampler:
    """Where prompts go: uniform inside the object first, then inside the error region."""

    def first_points(self, gt: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """One positive point per mask. gt: bool[M, H, W] -> coords float[M, 1, 2] (x, y), labels int[M, 1]."""
        return self._sample(gt, torch.ones(len(gt), dtype=torch.int), gen)

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

    Args:
        model: the ``Sam`` to train (e.g. ``create_model("sam_nano", pretrained=False)``).
        config: a :class:`SamTrainConfig`.
        data: indexable dataset of :class:`Sample` (``CocoInstances``, ``ShapesStream``, ...).
        sampler: prompt placement (default :class:`PointSampler`).
        loss: per-mask loss (default :class:`MaskLoss`).
        prompt_hook: ``f(sparse, dense) -> (sparse, dense)`` applied to the prompt embeddings
            (e.g. adding a task embedding).
    """

    def __init__(self, model, config: SamTrainConfig, data, sampler: Optional[PointSampler] = None,
                 loss: Optional[MaskLoss] = None, prompt_hook: Optional[Callable] = None) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model
        self.config = config
        self.data = data
        self.sampler = sampler or PointSampler()
        self.loss = loss or MaskLoss(config.focal_weight, config.dice_weight, alpha=config.focal_alpha, gamma=config.focal_gamma)
        self.prompt_hook = prompt_hook
        self.img_size = model.image_encoder.img_size
        self.transform = ResizeLongestSide(self.img_size)
        for name in PARTS:
            getattr(model, name).requires_grad_(name in config.trainable)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.gen = torch.Generator().manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)

    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    # -- data

    def _prepare(self, sample: Sample) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Resized, normalised, padded image [3, S, S] and padded masks [N, S, S] (at most masks_per_image)."""
        import cv2

        image, masks = sample.image, sample.masks
        if masks.shape[0] == 0:
            return None
        if self.rng.random() < 0.5:  # horizontal flip
            image = image[:, ::-1]
            masks = masks[:, :, ::-1]
        if self.rng.random() < self.config.zoom_prob:
            image, masks = self._zoom(image, masks)
            if masks.shape[0] == 0:
                return None
        if self.config.flat_steps and self.rng.random() < 1.0 - self.step / self.config.flat_steps:
            image = self._flat(masks, image.shape)
        keep = self.rng.permutation(masks.shape[0])[: self.config.masks_per_image]
        masks = masks[keep]
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        h, w = resized.shape[:2]
        x = torch.as_tensor(resized).permute(2, 0, 1).float()
        x = self.model.preprocess(x[None])[0]
        m = np.stack([cv2.resize(mk.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) for mk in masks])
        gt = torch.zeros((len(m), self.img_size, self.img_size), dtype=torch.bool)
        gt[:, :h, :w] = torch.from_numpy(m.astype(bool))
        ok = gt.flatten(1).any(1)
        if not ok.any():
            return None
        return x, gt[ok]

    def _flat(self, masks: np.ndarray, shape) -> np.ndarray:
        """The instances painted in random flat colours (back to front) on a flat background."""
        image = np.empty(shape, np.uint8)
        image[:] = self.rng.integers(0, 256, 3)
        for m in masks:
            image[m] = self.rng.integers(0, 256, 3)
        return image

    def _zoom(self, image: np.ndarray, masks: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """A square crop around one random instance, 1.5-4x its size (clipped to the image)."""
        h, w = image.shape[:2]
        k = int(self.rng.integers(len(masks)))
        ys, xs = np.nonzero(masks[k])
        if len(xs) == 0:
            return image, masks
        side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) * self.rng.uniform(1.5, 4.0)
        side = int(min(max(side, 32), h, w))
        cx = (xs.min() + xs.max()) / 2 + self.rng.uniform(-0.25, 0.25) * side
        cy = (ys.min() + ys.max()) / 2 + self.rng.uniform(-0.25, 0.25) * side
        x0 = int(np.clip(cx - side / 2, 0, w - side))
        y0 = int(np.clip(cy - side / 2, 0, h - side))
        crop = masks[:, y0 : y0 + side, x0 : x0 + side]
        keep = crop.reshape(len(crop), -1).sum(1) >= 16
        return image[y0 : y0 + side, x0 : x0 + side], crop[keep]

    def _batches(self) -> Iterator[List[Tuple[torch.Tensor, torch.Tensor]]]:
        n = len(self.data)
        order_rng = random.Random(self.config.seed * 7919 + self.step)
        while True:
            batch = []
            while len(batch) < self.config.images_per_step:
                item = self._prepare(self.data[order_rng.randrange(n)])
                if item is not None:
                    batch.append(item)
            yield batch

    # -- one image

    def _decode(self, emb, coords, labels, boxes, mask_input, multimask):
        sparse, dense = self.model.prompt_encoder(
            points=(coords, labels) if coords is not None else None, boxes=boxes, masks=mask_input
        )
        if self.prompt_hook is not None:
            sparse, dense = self.prompt_hook(sparse, dense)
        return self.model.mask_decoder(
            image_embeddings=emb, image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
        )

    def _image_loss(self, emb: torch.Tensor, gt: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Loss of one image's prompted instances; gt: bool[M, S, S] at the padded input size.

        Losses, IoU targets and error regions live at the decoder's low-res
        mask size (S / 4), against area-averaged (soft) ground truth: 16x
        fewer pixels than full size, for the same gradients in expectation.
        """
        c = self.config
        lr = self.model.prompt_encoder.mask_input_size[0]
        scale = self.img_size / lr
        soft = F.adaptive_avg_pool2d(gt.float()[:, None], lr)[:, 0]  # [M, lr, lr] in [0, 1]
        hard = soft > 0.5
        hard = torch.where(hard.flatten(1).any(1)[:, None, None], hard, soft > 0)  # tiny objects
        use_box = bool(self.rng.random() < c.box_prob)
        coords = labels = boxes = mask_input = None
        total = emb.new_zeros(())
        stats: Dict[str, float] = {}
        prev_pred = None
        for it in range(c.iterations):
            if it == 0 and use_box:
                boxes = self._jittered_boxes(gt)
                multimask = False
            elif it == 0:
                coords, labels = self.sampler.first_points(hard, self.gen)
                coords = coords * scale
                multimask = True
            else:
                nc, nl = self.sampler.next_points(hard, prev_pred, self.gen)
                nc = nc * scale
                coords = nc if coords is None else torch.cat([coords, nc], 1)
                labels = nl if labels is None else torch.cat([labels, nl], 1)
                multimask = False
            low_res, iou_pred = self._decode(emb, coords, labels, boxes, mask_input, multimask)  # [M, K, lr, lr]
            m, k = low_res.shape[:2]
            per = self.loss(low_res.flatten(0, 1), soft.repeat_interleave(k, 0)).view(m, k)
            best = per.argmin(1)
            mask_loss = per.gather(1, best[:, None]).mean()
            with torch.no_grad():
                pred = low_res > 0
                inter = (pred & hard[:, None]).flatten(2).sum(2).float()
                union = (pred | hard[:, None]).flatten(2).sum(2).float()
                true_iou = inter / union.clamp(min=1)
            iou_loss = F.mse_loss(iou_pred, true_iou)
            total = total + mask_loss + c.iou_weight * iou_loss
            sel = torch.arange(m)
            prev_pred = pred[sel, best]
            mask_input = low_res[sel, best][:, None].detach()
            stats[f"iou_{it}"] = float(true_iou[sel, best].mean())
            if it == 0:
                stats["mask_loss_0"] = float(mask_loss.detach())
            # a box prompt stays; later rounds add points and the previous mask on top of it
        return total / c.iterations, stats

    def _jittered_boxes(self, gt: torch.Tensor) -> torch.Tensor:
        boxes = []
        for mk in gt:
            ys, xs = torch.nonzero(mk, as_tuple=True)
            x0, x1, y0, y1 = xs.min().item(), xs.max().item(), ys.min().item(), ys.max().item()
            bw, bh = x1 - x0 + 1, y1 - y0 + 1
            noise = self.rng.normal(0, 0.1, 4) * np.array([bw, bh, bw, bh])
            noise = np.clip(noise, -20, 20)
            boxes.append([x0 + noise[0], y0 + noise[1], x1 + noise[2], y1 + noise[3]])
        return torch.tensor(boxes, dtype=torch.float32).clamp(0, self.img_size - 1)

    # -- loop

    def train(self, out: Path, resume: bool = False, progress: bool = True,
              on_log: Optional[Callable[[Dict[str, float]], None]] = None) -> TrainResult:
        """Trains up to ``config.steps`` steps; writes ``out`` (safetensors), ``out.ckpt`` and ``out.log.jsonl``."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from samantic.models import save_checkpoint

        out = Path(out)
        if out.suffix != ".safetensors":
            raise ValueError(f"--out must end in .safetensors, got {out}")
        ckpt = out.with_name(out.name + ".ckpt")
        log_path = out.with_name(out.name + ".log.jsonl")
        if resume and ckpt.exists():
            self.load_state(ckpt)
        elif not resume and log_path.exists():
            log_path.unlink()
        c = self.config
        self.model.train()
        batches = self._batches()
        history: List[Dict[str, float]] = []
        t_start = time.perf_counter()
        last = float("nan")
        window: List[float] = []
        window_stats: Dict[str, List[float]] = {}
        columns = [TextColumn("train sam"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task("train", total=c.steps, completed=self.step, loss="-")
            while self.step < c.steps:
                for g in self.optimizer.param_groups:
                    g["lr"] = self.lr_at(self.step)
                batch = next(batches)
                x = torch.stack([b[0] for b in batch])
                with torch.set_grad_enabled("image_encoder" in c.trainable):
                    emb = self.model.image_encoder(x)
                loss = x.new_zeros(())
                stats: Dict[str, float] = {}
                for i, (_, gt) in enumerate(batch):
                    li, si = self._image_loss(emb[i : i + 1], gt)
                    loss = loss + li / len(batch)
                    for k, v in si.items():
                        stats[k] = stats.get(k, 0.0) + v / len(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
                self.optimizer.step()
                self.step += 1
                last = float(loss.detach())
                window.append(last)
                for k, v in stats.items():
                    window_stats.setdefault(k, []).append(v)
                if self.step % c.log_every == 0 or self.step == c.steps:
                    rec = {"step": self.step, "loss": sum(window) / len(window), "lr": self.lr_at(self.step - 1),
                           "seconds": time.perf_counter() - t_start,
                           **{k: sum(v) / len(v) for k, v in window_stats.items()}}
                    window = []
                    window_stats = {}
                    history.append(rec)
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if on_log:
                        on_log(rec)
                    bar.update(task, loss=f"{rec['loss']:.3f}")
                if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    self.save_state(ckpt)
                bar.update(task, completed=self.step)
        self.model.eval()
        meta = {"training": asdict(c), "steps_done": self.step, "data": getattr(self.data, "root", repr(self.data))}
        meta["training"]["trainable"] = list(c.trainable)
        save_checkpoint(self.model, out, metadata={"training": json.dumps(meta, default=str)})
        return TrainResult(out, self.step, time.perf_counter() - t_start, last, log_path, history)

    # -- resumable state (loaded with weights_only=True: tensors and primitives only)

    def save_state(self, path: Path) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "torch_rng": self.gen.get_state(),
            "numpy_rng": json.dumps(self.rng.bit_generator.state),
            "config": json.dumps(asdict(self.config)),
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def load_state(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.gen.set_state(state["torch_rng"])
        self.rng.bit_generator.state = json.loads(state["numpy_rng"])


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
