"""Training U-SAM's classifier head θ from image-level labels.

Each example image (one object of a named class, see :mod:`samantic.train.sources`)
is a *bag*: SAM is prompted with a point grid and every (prompt, multimask
output) whose predicted IoU passes ``min_iou`` is an instance, described by its
mask token. Only the bag has a label. Three ways to train on that:

    naive  every instance gets the image's label (cross-entropy): background
           and distractor masks are taught to be the object
    mil    multiple-instance learning: at least one instance is the class
           (LSE-pooled log-probability of the label over the bag) and no
           instance is another class (each instance is the label or "none");
           masks that occur in images of every class (background, distractors)
           can only satisfy all bags as "none"
    mil_ud MIL plus uncertainty distillation: after ``ud_start`` of training an
           EMA teacher labels each instance within {label, none}; confident
           instances are distilled to the teacher's sharpened answer and
           uncertain ones are pushed to "none", so what the head is unsure of
           is dropped at inference instead of becoming a false detection

Features are computed once per (model, image, grid) and cached on disk
(:class:`FeatureCache`), so epochs, ablations and re-runs cost seconds.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from samantic.heads.usam import HeadInfo, UsamHead, check_class_names

if TYPE_CHECKING:
    from samantic.pipeline.engine import PromptOutputs

METHODS = ("naive", "mil", "mil_ud")


# ---------------------------------------------------------------- features


def model_fingerprint(model) -> str:
    """SHA-256 (first 16 hex digits) over a model's parameters and buffers: the cache key of its features."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class BagFeatures:
    """The instances of one image: tokens float16 [N, D], predicted IoU float32 [N]."""

    tokens: np.ndarray
    iou: np.ndarray


class FeatureExtractor:
    """Grid-prompts SAM on an image and returns every (prompt, output)'s mask token and predicted IoU.

    It runs the segment-everything pipeline's own torch engine (preprocessing,
    encoder, prompt encoder and transformer), so the tokens are those the
    pipeline's early filter reads, and no mask is upscaled.
    """

    def __init__(self, model, points_per_side: int = 16, points_per_batch: int = 256) -> None:
        from samantic.pipeline.amg import TorchEngine
        from samantic.pipeline.prompts import point_grid

        self.model = model.eval()
        self.engine = TorchEngine(self.model)
        self.grid = point_grid(points_per_side)
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch

    def prompt_outputs(self, image: np.ndarray) -> Iterator["PromptOutputs"]:
        """Encodes ``image`` and yields the engine's outputs for each batch of grid prompts, in grid order.

        The image embedding stays in ``self.engine`` until the iteration ends (e.g. for ``engine.upscale``).
        """
        from samantic.pipeline.transforms import apply_coords, preprocess

        engine = self.engine
        h, w = image.shape[:2]
        engine.encode(preprocess(image, engine.pixel_mean, engine.pixel_std, engine.img_size)[0])
        points = apply_coords(self.grid * np.array([w, h])[None], (h, w), engine.img_size)
        try:
            for s in range(0, len(points), self.points_per_batch):
                yield engine.run_prompts(points[s : s + self.points_per_batch])
        finally:
            engine.reset()

    def __call__(self, image: np.ndarray) -> BagFeatures:
        tokens, ious = [], []
        for out in self.prompt_outputs(image):
            tokens.append(out.mask_tokens.reshape(-1, out.mask_tokens.shape[-1]))
            ious.append(out.iou_preds.reshape(-1))
        return BagFeatures(torch.cat(tokens).half().cpu().numpy(), np.concatenate(ious).astype(np.float32))


class FeatureCache:
    """Bag features on disk: ``root/<model fingerprint>/g<grid side>/<image sha256>.npz``.

    Args:
        root: cache directory (created on first write).
        extractor: a :class:`FeatureExtractor`.
        model_key: fingerprint of the extractor's model (computed if None).
    """

    def __init__(self, root, extractor: FeatureExtractor, model_key: Optional[str] = None) -> None:
        self.extractor = extractor
        self.model_key = model_key or model_fingerprint(extractor.model)
        self.dir = Path(root) / self.model_key / f"g{extractor.points_per_side}"
        self.hits = 0
        self.misses = 0

    @staticmethod
    def image_key(image: np.ndarray) -> str:
        h = hashlib.sha256(np.ascontiguousarray(image).tobytes())
        h.update(str(image.shape).encode())
        return h.hexdigest()[:32]

    def get(self, image: np.ndarray) -> BagFeatures:
        from samantic.io.atomic import atomic_write_bytes

        path = self.dir / f"{self.image_key(image)}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    feats = BagFeatures(z["tokens"], z["iou"])
                self.hits += 1
                return feats
            except Exception:  # a damaged entry is recomputed, never trusted
                path.unlink(missing_ok=True)
        feats = self.extractor(image)
        buf = io.BytesIO()
        np.savez(buf, tokens=feats.tokens, iou=feats.iou)
        atomic_write_bytes(path, buf.getvalue())
        self.misses += 1
        return feats


@dataclass
class Bags:
    """All training bags, flattened: instance tokens [T, D], bag of each instance [T], label per bag [B]."""

    tokens: torch.Tensor
    iou: torch.Tensor
    bag: torch.Tensor
    labels: torch.Tensor
    keys: List[str]

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def build(feats: Sequence[BagFeatures], labels: Sequence[int], keys: Sequence[str], min_iou: float) -> "Bags":
        tokens, ious, bag = [], [], []
        for i, f in enumerate(feats):
            keep = f.iou >= min_iou
            if not keep.any():  # never an empty bag: keep its most confident instance
                keep = f.iou == f.iou.max()
            tokens.append(torch.from_numpy(f.tokens[keep].astype(np.float32)))
            ious.append(torch.from_numpy(f.iou[keep]))
            bag.append(torch.full((int(keep.sum()),), i, dtype=torch.long))
        return Bags(torch.cat(tokens), torch.cat(ious), torch.cat(bag), torch.tensor(list(labels), dtype=torch.long), list(keys))


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class UsamTrainConfig:
    """Options of :func:`train_head`.

    Attributes:
        method: ``naive`` | ``mil`` | ``mil_ud`` (see the module docstring).
        epochs, batch_bags, lr, weight_decay: AdamW over bags, cosine decay.
        min_iou: instances are the grid outputs with predicted IoU at least this.
        lse_r: sharpness of the LSE pooling that stands in for "max over the bag".
        ud_weight, ud_start, ud_temperature, ema: uncertainty distillation: weight, fraction of
            training before it starts, teacher sharpening temperature, EMA decay of the teacher.
        hidden_dim: width of the head's MLP.
        score_thresh: stored in the head; the default class-probability threshold at inference.
        seed: initialisation and order.
    """

    method: str = "mil_ud"
    epochs: int = 60
    batch_bags: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    min_iou: float = 0.5
    lse_r: float = 5.0
    ud_weight: float = 1.0
    ud_start: float = 0.3
    ud_temperature: float = 0.5
    ema: float = 0.9
    hidden_dim: int = 256
    score_thresh: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("epochs", "batch_bags", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _bag_lse(values: torch.Tensor, bag: torch.Tensor, n_bags: int, r: float) -> torch.Tensor:
    """Per bag: (1/r) * log(mean(exp(r * v))), a smooth max of ``values`` over each bag's instances."""
    big = torch.full((n_bags,), -float("inf"), dtype=values.dtype)
    big = big.scatter_reduce(0, bag, values * r, reduce="amax", include_self=True)
    ex = torch.exp(values * r - big[bag])
    s = torch.zeros(n_bags, dtype=values.dtype).index_add(0, bag, ex)
    cnt = torch.zeros(n_bags, dtype=values.dtype).index_add(0, bag, torch.ones_like(values))
    return (big + torch.log(s / cnt)) / r


def _bag_mean(values: torch.Tensor, bag: torch.Tensor, n_bags: int) -> torch.Tensor:
    s = torch.zeros(n_bags, dtype=values.dtype).index_add(0, bag, values)
    cnt = torch.zeros(n_bags, dtype=values.dtype).index_add(0, bag, torch.ones_like(values))
    return s / cnt.clamp(min=1)


def bag_losses(logits: torch.Tensor, bag: torch.Tensor, labels: torch.Tensor, method: str, lse_r: float,
               teacher: Optional[torch.Tensor] = None, ud_temperature: float = 0.5) -> Dict[str, torch.Tensor]:
    """Loss terms (each averaged over bags) for instance logits [T, C + 1] of bags labelled ``labels`` [B].

    ``teacher``: the EMA teacher's logits [T, C + 1]; adds the ``ud`` term.
    """
    n_bags = len(labels)
    none = logits.shape[1] - 1
    lp = F.log_softmax(logits, dim=1)
    y = labels[bag]
    out: Dict[str, torch.Tensor] = {}
    if method == "naive":
        out["ce"] = _bag_mean(-lp.gather(1, y[:, None])[:, 0], bag, n_bags).mean()
        return out
    lp_y = lp.gather(1, y[:, None])[:, 0]
    lp_none = lp[:, none]
    out["mil_pos"] = -_bag_lse(lp_y, bag, n_bags, lse_r).mean()
    out["mil_excl"] = _bag_mean(-torch.logaddexp(lp_y, lp_none), bag, n_bags).mean()
    if teacher is not None:
        with torch.no_grad():
            tp = F.log_softmax(teacher, dim=1)
            two = torch.stack([tp.gather(1, y[:, None])[:, 0], tp[:, none]], 1)  # within {label, none}
            q = torch.softmax(two / ud_temperature, dim=1)
            certainty = 1.0 + (q * torch.log(q.clamp(min=1e-8))).sum(1) / math.log(2.0)  # 1 - entropy in bits
            target_y = q[:, 0] * certainty  # uncertain mass goes to "none"
        student = torch.stack([lp_y, lp_none], 1)
        ud = -(target_y * student[:, 0] + (1 - target_y) * student[:, 1])
        out["ud"] = _bag_mean(ud, bag, n_bags).mean()
    return out


@dataclass
class HeadTrainResult:
    head: UsamHead
    history: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def train_head(bags: Bags, info: HeadInfo, config: UsamTrainConfig, progress: bool = True,
               on_epoch: Optional[Callable[[Dict[str, float]], None]] = None) -> HeadTrainResult:
    """Trains a :class:`UsamHead` for ``info.classes`` on ``bags`` (labels index ``info.classes``)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    torch.manual_seed(config.seed)
    info = HeadInfo(**{**asdict(info), "hidden_dim": config.hidden_dim, "score_thresh": config.score_thresh})
    head = UsamHead(info)
    teacher = copy.deepcopy(head).requires_grad_(False)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = len(bags)
    steps_per_epoch = max(1, math.ceil(n / config.batch_bags))
    total = config.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(config.seed)
    # instances of each bag, for batching by bag
    order = torch.argsort(bags.bag, stable=True)
    starts = torch.searchsorted(bags.bag[order], torch.arange(n + 1))
    history: List[Dict[str, float]] = []
    step = 0
    t0 = time.perf_counter()
    with Progress(TextColumn("train usam"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("usam", total=config.epochs, loss="-")
        for epoch in range(config.epochs):
            perm = torch.randperm(n, generator=gen)
            sums: Dict[str, float] = {}
            for s in range(0, n, config.batch_bags):
                chosen = perm[s : s + config.batch_bags]
                idx = torch.cat([order[starts[b] : starts[b + 1]] for b in chosen.tolist()])
                local = torch.empty(n, dtype=torch.long)
                local[chosen] = torch.arange(len(chosen))
                bag = local[bags.bag[idx]]
                lr = config.lr * 0.5 * (1 + math.cos(math.pi * step / total))
                for g in opt.param_groups:
                    g["lr"] = lr
                head.train()
                logits = head(bags.tokens[idx])
                use_ud = config.method == "mil_ud" and step >= config.ud_start * total
                t_logits = teacher(bags.tokens[idx]) if use_ud else None
                terms = bag_losses(logits, bag, bags.labels[chosen], "naive" if config.method == "naive" else "mil",
                                   config.lse_r, t_logits, config.ud_temperature)
                loss = sum((config.ud_weight if k == "ud" else 1.0) * v for k, v in terms.items())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for pt, ps in zip(teacher.parameters(), head.parameters()):
                        pt.mul_(config.ema).add_(ps.detach(), alpha=1 - config.ema)
                step += 1
                for k, v in {"loss": loss, **terms}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / steps_per_epoch
            rec = {"epoch": epoch + 1, **sums, "seconds": time.perf_counter() - t0}
            history.append(rec)
            if on_epoch:
                on_epoch(rec)
            bar.update(task, advance=1, loss=f"{sums['loss']:.3f}")
    head.eval()
    return HeadTrainResult(head, history, time.perf_counter() - t0)


# ---------------------------------------------------------------- end to end


def expand_groups(classes: Sequence[str], groups: Mapping[str, Sequence[str]]) -> List[Tuple[str, str]]:
    """(head class, source class) pairs: a grouped class draws examples from each of its members."""
    pairs = []
    for c in classes:
        for m in groups.get(c, (c,)):
            pairs.append((c, m))
    return pairs


def collect_bags(source, classes: Sequence[str], groups: Mapping[str, Sequence[str]], per_class: int,
                 cache: FeatureCache, min_iou: float, seed: int = 0, progress: bool = True) -> Bags:
    """Features of ``per_class`` examples of every class (split evenly over a group's members)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    pairs = expand_groups(classes, groups)
    per_member = {c: max(1, per_class // len(groups.get(c, (c,)))) for c in classes}
    index = {c: i for i, c in enumerate(classes)}
    feats, labels, keys = [], [], []
    total = sum(per_member[c] for c, _ in pairs)
    with Progress(TextColumn("features"), BarColumn(), TextColumn("{task.completed}/{task.total} images"),
                  TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("features", total=total)
        for head_class, member in pairs:
            for ex in source.examples([member], per_member[head_class], seed):
                feats.append(cache.get(ex.image))
                labels.append(index[head_class])
                keys.append(ex.key)
                bar.advance(task)
    if not feats:
        raise ValueError("the example source produced no images")
    return Bags.build(feats, labels, keys, min_iou)


def head_info_for(model, model_name: str, classes: Sequence[str], groups: Mapping[str, Sequence[str]],
                  extra: Optional[Dict[str, str]] = None) -> HeadInfo:
    classes = check_class_names(classes)
    return HeadInfo(classes=tuple(classes), groups={k: tuple(v) for k, v in groups.items()},
                    token_dim=int(model.prompt_encoder.embed_dim), model=model_name, extra=dict(extra or {}))


def training_metadata(config: UsamTrainConfig, **kw) -> Dict[str, str]:
    return {"training": json.dumps({**asdict(config), **kw}, default=str)}
