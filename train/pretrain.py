"""Encoder pretraining with image-level class labels: the stand-in for an ImageNet (or MAE) backbone.

SAM's encoder starts from a pretrained ViT; sam_nano's starts from random weights, so nothing in
its training asks its features to tell a circle from a star, and the mask tokens carry little
class information (``samantic eval probe``). This pretrains a SAM's image encoder as an image
classifier would be trained, on shapes-world scenes rendered on the fly: the target of an image is
the set of classes it shows (multi-label, one sigmoid per class), predicted from the encoder's
embedding pooled over the image (average and max, concatenated, then a linear layer). Only the
image labels are used, no masks: the supervision of an ImageNet backbone, not of a segmenter.

The result is a full ``Sam`` checkpoint (the prompt encoder and mask decoder at their random
initialisation) that ``samantic train sam --checkpoint`` starts from, so the A/B against training
from scratch changes one thing. The classifier layer is not part of it.

    samantic train encoder --out runs/pre/encoder.safetensors --minutes 10
    samantic train sam --checkpoint runs/pre/encoder.safetensors --data shapes:1000000 --out ...
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samantic.train.data.shapes import CLASSES, render_scene
from samantic.train.sam import _quiet_worker, output_files, warmup_cosine_lr

# the scene seeds pretraining renders from by default: far from every evaluation range (0-99, 500-560,
# 500000-500080) and from the SAM training streams (1,000,000 up in steps of a few hundred thousand)
PRETRAIN_SEED = 70_000_000
MIN_PIXELS = 16  # an instance with fewer visible pixels does not make its class "present"


@dataclass
class PretrainConfig:
    """Encoder pretraining settings.

    Attributes:
        steps: optimizer steps in total (a resumed run continues up to this).
        images_per_step: scenes per optimizer step.
        lr: peak learning rate (AdamW, cosine decay to ``min_lr_ratio`` of it after a linear warm-up).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        min_lr_ratio: floor of the cosine decay, as a fraction of ``lr``.
        time_budget: seconds of training after which the run stops (0: none); the decay follows it.
        first_seed: scene seed of the first image; step ``k`` renders ``first_seed + k * images_per_step`` on.
        seed: initialisation of the classifier layer and the flips.
        log_every: append to the log every this many steps.
        checkpoint_every: write the resumable checkpoint every this many steps.
    """

    steps: int = 2000
    images_per_step: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    min_lr_ratio: float = 0.01
    time_budget: float = 0.0
    first_seed: int = PRETRAIN_SEED
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "images_per_step", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.time_budget < 0 or self.warmup_steps < 0 or self.first_seed < 0:
            raise ValueError("time_budget, warmup_steps and first_seed must not be negative")


class PooledClassifier(nn.Module):
    """Multi-label logits from an image embedding [B, C, h, w]: average and max pooling, then a linear layer.

    Max pooling keeps a small object's evidence that averaging over the whole image would dilute.
    ``valid`` [B, h, w] (bool) restricts both poolings to the image's own cells (not the padding).
    """

    def __init__(self, channels: int, n_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * channels)
        self.fc = nn.Linear(2 * channels, n_classes)

    def forward(self, emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        m = valid[:, None].to(emb.dtype)
        avg = (emb * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1.0)
        mx = emb.masked_fill(~valid[:, None], float("-inf")).amax((2, 3))
        return self.fc(self.norm(torch.cat([avg, mx], 1)))


def scene_targets(labels: np.ndarray, masks: np.ndarray, n_classes: int = len(CLASSES)) -> np.ndarray:
    """Multi-hot [n_classes] float32: the classes with at least :data:`MIN_PIXELS` visible pixels."""
    t = np.zeros(n_classes, np.float32)
    for label, mask in zip(labels, masks):
        if mask.sum() >= MIN_PIXELS:
            t[int(label)] = 1.0
    return t


def encoder_batch(seeds: Sequence[int], img_size: int, pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                  flips: Optional[Sequence[bool]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scenes ``seeds`` as the encoder's input: (images [B, 3, S, S] normalised and zero-padded as
    ``Sam.preprocess`` does, targets [B, n_classes], valid [B, S, S] bool: the image's own pixels)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    transform = ResizeLongestSide(img_size)
    images = torch.zeros(len(seeds), 3, img_size, img_size)
    valid = torch.zeros(len(seeds), img_size, img_size, dtype=torch.bool)
    targets = []
    for i, seed in enumerate(seeds):
        scene = render_scene(int(seed))
        image = scene.image[:, ::-1] if flips is not None and flips[i] else scene.image
        resized = transform.apply_image(np.ascontiguousarray(image))
        h, w = resized.shape[:2]
        x = torch.from_numpy(resized).permute(2, 0, 1).float()
        images[i, :, :h, :w] = (x - pixel_mean.view(3, 1, 1)) / pixel_std.view(3, 1, 1)
        valid[i, :h, :w] = True
        targets.append(scene_targets(scene.labels, scene.masks))
    return images, torch.from_numpy(np.stack(targets)), valid


def _cells(valid: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A pixel mask [B, S, S] at the embedding's grid [B, h, w]: a cell counts if any of its pixels is the image's."""
    return F.adaptive_max_pool2d(valid[:, None].float(), size)[:, 0] > 0


@dataclass
class PretrainResult:
    output: Path
    steps: int
    seconds: float
    last_loss: float
    log: Path


class EncoderPretrainer:
    """Trains ``sam.image_encoder`` (and a :class:`PooledClassifier` on it) on image-level class labels."""

    def __init__(self, sam: nn.Module, config: PretrainConfig, device: str = "cpu", workers: int = 1) -> None:
        self.sam = sam
        self.config = config
        self.device = torch.device(device)
        self.workers = workers
        self.img_size = int(sam.image_encoder.img_size)
        channels = int(sam.prompt_encoder.embed_dim)
        g = torch.Generator().manual_seed(config.seed)
        self.head = PooledClassifier(channels, len(CLASSES))
        with torch.no_grad():  # the head's initialisation depends on the config's seed only
            self.head.fc.weight.copy_(torch.randn(self.head.fc.weight.shape, generator=g) * 0.01)
            self.head.fc.bias.zero_()
        self.sam.to(self.device)
        self.head.to(self.device)
        params = list(sam.image_encoder.parameters()) + list(self.head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.elapsed = 0.0
        self._mean = sam.pixel_mean.detach().cpu().flatten()
        self._std = sam.pixel_std.detach().cpu().flatten()

    def lr_at(self, step: int, elapsed: float) -> float:
        return warmup_cosine_lr(self.config, step, elapsed)

    def logits(self, images: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        emb = self.sam.image_encoder(images.to(self.device))
        return self.head(emb, _cells(valid.to(self.device), emb.shape[-2:]))

    def train_step(self, batch: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Dict[str, float]:
        images, targets, valid = batch
        self.sam.image_encoder.train()
        self.head.train()
        logits = self.logits(images, valid)
        loss = F.binary_cross_entropy_with_logits(logits, targets.to(self.device))
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, self.elapsed)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
        self.optimizer.step()
        with torch.no_grad():
            acc = ((logits > 0).float().cpu() == targets).float().mean().item()
        return {"loss": float(loss.item()), "label_accuracy": acc}

    @torch.no_grad()
    def evaluate(self, seeds: Sequence[int], batch: int = 16) -> Dict[str, float]:
        """Held-out multi-label scores: per-label accuracy, exact-match rate and mean average precision."""
        self.sam.image_encoder.eval()
        self.head.eval()
        scores, targets = [], []
        for i in range(0, len(seeds), batch):
            images, t, valid = encoder_batch(seeds[i : i + batch], self.img_size, self._mean, self._std)
            scores.append(torch.sigmoid(self.logits(images, valid)).cpu())
            targets.append(t)
        return multilabel_scores(torch.cat(scores), torch.cat(targets))

    # -- checkpoints

    def state(self) -> Dict[str, object]:
        return {"step": self.step, "elapsed": self.elapsed, "encoder": self.sam.image_encoder.state_dict(),
                "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "config": asdict(self.config)}

    def load_state(self, path: Path) -> None:
        s = torch.load(path, map_location=self.device, weights_only=True)
        saved = dict(s["config"])
        mine = asdict(self.config)
        for key in ("steps", "time_budget", "log_every", "checkpoint_every"):  # how long and how often may change
            saved.pop(key, None)
            mine.pop(key, None)
        if saved != mine:
            diff = sorted(k for k in mine if saved.get(k) != mine[k])
            raise ValueError(f"{path}: written by a run with other settings ({', '.join(diff)}); "
                             "start a new --out or drop --resume")
        self.sam.image_encoder.load_state_dict(s["encoder"])
        self.head.load_state_dict(s["head"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.step, self.elapsed = int(s["step"]), float(s["elapsed"])

    def train(self, out: Path, resume: bool = False, progress: bool = True,
              eval_seeds: Sequence[int] = (), on_log: Optional[Callable[[Dict[str, float]], None]] = None
              ) -> PretrainResult:
        """Trains up to ``config.steps`` steps (or ``config.time_budget`` seconds); writes ``out`` (a full
        ``Sam`` checkpoint), ``out.ckpt`` (resumable) and ``out.log.jsonl``. With ``eval_seeds`` the last log
        line holds the held-out multi-label scores."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from samantic.io import atomic_write_bytes
        from samantic.models import save_checkpoint

        out, ckpt, log_path = output_files(out, resume)
        if resume and ckpt.exists():
            self.load_state(ckpt)
        c = self.config
        last: Dict[str, float] = {}
        window: List[Dict[str, float]] = []

        def save_ckpt() -> None:
            tmp = ckpt.with_name(ckpt.name + ".tmp")
            torch.save(self.state(), tmp)
            tmp.replace(ckpt)

        def log(entry: Dict[str, float]) -> None:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if on_log is not None:
                on_log(entry)

        def over_time() -> bool:
            return c.time_budget > 0 and self.elapsed >= c.time_budget

        with Progress(TextColumn("pretraining encoder"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      disable=not progress) as bar:
            task = bar.add_task("", total=c.steps, completed=self.step, info="")
            # scenes rendered in worker processes, a few steps ahead of the model
            loader = torch.utils.data.DataLoader(_StepBatches(self), batch_size=None,
                                                 sampler=range(self.step, c.steps), num_workers=self.workers,
                                                 prefetch_factor=2 if self.workers else None,
                                                 worker_init_fn=_quiet_worker)
            batches = iter(loader)
            while self.step < c.steps and not over_time():
                t0 = time.perf_counter()
                last = self.train_step(next(batches))
                self.elapsed += time.perf_counter() - t0
                self.step += 1
                window.append(last)
                bar.update(task, completed=self.step, info=f"loss {last['loss']:.3f}")
                if self.step % c.log_every == 0:
                    log({"step": self.step, "seconds": self.elapsed, "lr": self.lr_at(self.step - 1, self.elapsed),
                         **{k: float(np.mean([w[k] for w in window])) for k in last}})
                    window.clear()
                if self.step % c.checkpoint_every == 0:
                    save_ckpt()
        save_ckpt()
        meta = {"pretraining": {"kind": "image-level class labels (multi-label, pooled embedding)",
                                "classes": list(CLASSES), "steps_done": self.step, "seconds": round(self.elapsed, 1),
                                "config": asdict(c)}}
        if eval_seeds:
            scores = self.evaluate(list(eval_seeds))
            meta["pretraining"]["held_out"] = {"seeds": f"{min(eval_seeds)}:{max(eval_seeds) + 1}", **scores}
            log({"step": self.step, "held_out": scores})
        save_checkpoint(self.sam, out, metadata=meta)
        # the classifier layer beside it, for whoever wants the image classifier itself
        from safetensors.torch import save as save_bytes

        atomic_write_bytes(out.with_name(out.stem + ".classifier.safetensors"),
                           save_bytes({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                                      metadata={"classes": json.dumps(list(CLASSES))}))
        return PretrainResult(out, self.step, self.elapsed, float(last.get("loss", float("nan"))), log_path)


class _StepBatches(torch.utils.data.Dataset):
    """Step index -> that step's batch (numpy and the renderer only: safe in worker processes)."""

    def __init__(self, trainer: EncoderPretrainer) -> None:
        self.config, self.img_size = trainer.config, trainer.img_size
        self.mean, self.std = trainer._mean, trainer._std

    def __len__(self) -> int:
        return self.config.steps

    def __getitem__(self, step: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        first = c.first_seed + step * c.images_per_step
        flips = np.random.default_rng([c.seed, step]).random(c.images_per_step) < 0.5
        return encoder_batch(range(first, first + c.images_per_step), self.img_size, self.mean, self.std, flips)


def multilabel_scores(scores: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
    """Per-label accuracy at 0.5, exact-match rate and mAP (mean over classes present at least once) of
    sigmoid ``scores`` [N, K] against multi-hot ``targets`` [N, K]."""
    pred = scores > 0.5
    truth = targets > 0.5
    aps = []
    for k in range(targets.shape[1]):
        t = truth[:, k]
        if not t.any():
            continue
        order = torch.argsort(scores[:, k], descending=True)
        hits = t[order].float()
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return {"label_accuracy": float((pred == truth).float().mean()),
            "exact_match": float((pred == truth).all(1).float().mean()),
            "mAP": float(np.mean(aps)) if aps else float("nan")}
