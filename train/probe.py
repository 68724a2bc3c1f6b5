"""How much class information do a SAM's per-mask features carry? A supervised probe.

U-SAM's head learns from image-level labels only. Before blaming its training,
measure the ceiling: label every grid mask of shapes-world scenes from the
ground truth (the class of the instance it matches at IoU >= 0.5 in the
low-res frame, else "none"), fit a small MLP on one feature set with those
mask-level labels, and report held-out class accuracy on the matched masks.
What a fully supervised probe cannot tell apart, multiple-instance learning on
image labels cannot either.

Feature sets (combine with ``+``):

    token   the decoder's output mask token: what the U-SAM head reads
    pooled  the image embedding averaged under the mask's low-res probability
    shape   the low-res mask probability in a square around its box, 12 x 12
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

FEATURES = ("token", "pooled", "shape")
SHAPE_SIDE = 12
MATCH_IOU = 0.5


def parse_feature_sets(spec: str) -> List[Tuple[str, ...]]:
    """``"token,shape,token+shape"`` -> [("token",), ("shape",), ("token", "shape")]."""
    sets = []
    for item in spec.split(","):
        parts = tuple(p.strip() for p in item.split("+") if p.strip())
        bad = [p for p in parts if p not in FEATURES]
        if not parts or bad:
            raise ValueError(f"feature set {item!r}: use {', '.join(FEATURES)} joined by '+' (e.g. token+shape)")
        sets.append(parts)
    return sets


def label_masks(low_res: np.ndarray, gt_masks: np.ndarray, gt_labels: np.ndarray, resized: Tuple[int, int],
                img_size: int, none: int) -> Tuple[np.ndarray, np.ndarray]:
    """Class of the instance each low-res mask matches (IoU >= 0.5), else ``none``; and that best IoU.

    Args:
        low_res: float [K, L, L] logits in the padded low-res frame (image resized by its long side, padded).
        gt_masks: bool [N, H, W] instances at image resolution; gt_labels: [N] class indices.
        resized: (h, w) of the image after resizing to the encoder's input (``img_size`` square), before padding.
    """
    import cv2

    k, side = low_res.shape[0], low_res.shape[-1]
    labels = np.full(k, none, np.int64)
    best = np.zeros(k, np.float32)
    if k == 0 or len(gt_masks) == 0:
        return labels, best
    lh, lw = (max(1, int(round(v * side / img_size))) for v in resized)
    g = np.zeros((len(gt_masks), side, side), np.float32)
    for i, m in enumerate(gt_masks):
        g[i, :lh, :lw] = cv2.resize(m.astype(np.uint8), (lw, lh), interpolation=cv2.INTER_NEAREST)
    pred = (low_res > 0).reshape(k, -1).astype(np.float32)
    gf = g.reshape(len(g), -1)
    inter = pred @ gf.T
    union = pred.sum(1)[:, None] + gf.sum(1)[None] - inter
    iou = inter / np.maximum(union, 1.0)
    j = iou.argmax(1)
    best = iou.max(1).astype(np.float32)
    ok = best >= MATCH_IOU
    labels[ok] = np.asarray(gt_labels)[j[ok]]
    return labels, best


def mask_features(engine, low_res: torch.Tensor, tokens: torch.Tensor) -> Dict[str, np.ndarray]:
    """The three feature sets of K masks: tokens [K, D], low-res logits [K, L, L], engine holding the embedding."""
    from torchvision.ops import roi_align

    from samantic.pipeline.generator import masks_to_boxes

    emb = engine.features[0].float()  # [C, h, w]
    prob = torch.sigmoid(low_res.float())
    k = prob.shape[0]
    weights = F.adaptive_avg_pool2d(prob[:, None], emb.shape[-2:])[:, 0].reshape(k, -1)
    pooled = (weights @ emb.reshape(emb.shape[0], -1).T) / weights.sum(1, keepdim=True).clamp(min=1e-3)
    on = (low_res > 0).numpy()
    empty = torch.from_numpy(~on.any((1, 2)))
    x0, y0, x1, y1 = torch.from_numpy(masks_to_boxes(on).astype(np.float32)).unbind(1)
    x1, y1 = x1 + 1, y1 + 1  # masks_to_boxes' max is inclusive
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = torch.maximum(x1 - x0, y1 - y0).clamp(min=1) / 2
    boxes = torch.stack([torch.arange(k, dtype=torch.float32), cx - half, cy - half, cx + half, cy + half], 1)
    shape = roi_align(prob[:, None], boxes, SHAPE_SIDE, aligned=True)[:, 0].reshape(k, -1)
    shape[empty] = 0.0
    return {"token": tokens.float().numpy(), "pooled": pooled.numpy(), "shape": shape.numpy()}


@dataclass
class ProbeData:
    """Per-mask features and ground-truth labels of a set of scenes."""

    features: Dict[str, np.ndarray]
    labels: np.ndarray
    n_scenes: int

    @staticmethod
    def concat(parts: Sequence["ProbeData"]) -> "ProbeData":
        return ProbeData({k: np.concatenate([p.features[k] for p in parts]) for k in FEATURES},
                         np.concatenate([p.labels for p in parts]), sum(p.n_scenes for p in parts))

    def matrix(self, feature_set: Sequence[str]) -> np.ndarray:
        return np.concatenate([self.features[k] for k in feature_set], 1).astype(np.float32)


@torch.no_grad()
def collect_probe_data(model, seeds: Iterable[int], points_per_side: int = 16, progress: bool = True) -> ProbeData:
    """Every (grid prompt, multimask output) of the scenes ``seeds``, with features and labels."""
    from samantic.pipeline.prompts import preprocess_shape
    from samantic.train.data.shapes import CLASSES, render_scene
    from samantic.train.metrics import _progress
    from samantic.train.usam import FeatureExtractor

    extractor = FeatureExtractor(model, points_per_side=points_per_side)
    engine = extractor.engine
    seeds = list(seeds)
    parts = []
    with _progress(progress, len(seeds)) as tick:
        for seed in seeds:
            scene = render_scene(seed)
            lows, feats = [], []
            for out in extractor.prompt_outputs(scene.image):
                n, m = out.iou_preds.shape
                low = torch.from_numpy(engine.upscale(out, np.repeat(np.arange(n), m), np.tile(np.arange(m), n)))
                feats.append(mask_features(engine, low, out.mask_tokens.reshape(n * m, -1)))
                lows.append(low.numpy())
            resized = preprocess_shape(*scene.image.shape[:2], engine.img_size)
            labels, _ = label_masks(np.concatenate(lows), scene.masks, scene.labels, resized, engine.img_size, len(CLASSES))
            parts.append(ProbeData({k: np.concatenate([f[k] for f in feats]) for k in FEATURES}, labels, 1))
            tick()
    return ProbeData.concat(parts)


class _Probe(torch.nn.Module):
    def __init__(self, dim: int, n_out: int, hidden: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.GELU(), torch.nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, epochs: int = 30, hidden: int = 256,
              positive_weight: float = 5.0, seed: int = 0) -> _Probe:
    """MLP on standardized features; classes ``0..n_classes-1`` plus "none" (= ``n_classes``), weighted up."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net = _Probe(x.shape[1], n_classes + 1, hidden, xt.mean(0), xt.std(0) + 1e-4)
    weight = torch.full((n_classes + 1,), positive_weight)
    weight[-1] = 1.0
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=gen)
        for s in range(0, len(yt), 512):
            i = perm[s : s + 512]
            loss = F.cross_entropy(net(xt[i]), yt[i], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@dataclass
class ProbeRow:
    feature_set: Tuple[str, ...]
    class_accuracy: float  # matched masks: argmax over the classes is the true class
    none_accuracy: float  # unmatched masks: argmax over classes + none is "none"


@dataclass
class ProbeResult:
    rows: List[ProbeRow]
    chance: float  # accuracy of always answering the most frequent class of the matched held-out masks
    n_train: Tuple[int, int]  # (masks, matched masks)
    n_test: Tuple[int, int]
    seconds: float

    def to_dict(self) -> Dict[str, object]:
        return {"chance": self.chance, "train_masks": self.n_train[0], "train_matched": self.n_train[1],
                "test_masks": self.n_test[0], "test_matched": self.n_test[1], "seconds": self.seconds,
                "rows": [{"features": "+".join(r.feature_set), "class_accuracy": r.class_accuracy,
                          "none_accuracy": r.none_accuracy} for r in self.rows]}

    def markdown(self) -> str:
        lines = ["| features | class accuracy (matched masks) | none accuracy (unmatched) |", "|---|---|---|"]
        lines += [f"| {'+'.join(r.feature_set)} | {r.class_accuracy:.3f} | {r.none_accuracy:.3f} |" for r in self.rows]
        lines.append(f"| chance (most frequent class) | {self.chance:.3f} | |")
        return "\n".join(lines)


def run_probe(train: ProbeData, test: ProbeData, feature_sets: Sequence[Sequence[str]], n_classes: int,
              epochs: int = 30, seed: int = 0) -> ProbeResult:
    t0 = time.perf_counter()
    pos = test.labels < n_classes
    if not pos.any() or not (train.labels < n_classes).any():
        raise ValueError("no grid mask matches a ground-truth instance at IoU >= 0.5; more scenes or a better model")
    counts = np.bincount(test.labels[pos], minlength=n_classes)
    rows = []
    for fs in feature_sets:
        net = fit_probe(train.matrix(fs), train.labels, n_classes, epochs=epochs, seed=seed)
        with torch.no_grad():
            logits = net(torch.from_numpy(test.matrix(fs))).numpy()
        cls = logits[:, :n_classes].argmax(1)
        rows.append(ProbeRow(tuple(fs), float((cls[pos] == test.labels[pos]).mean()),
                             float((logits[~pos].argmax(1) == n_classes).mean()) if (~pos).any() else float("nan")))
    return ProbeResult(rows, float(counts.max() / counts.sum()),
                       (len(train.labels), int((train.labels < n_classes).sum())), (len(test.labels), int(pos.sum())),
                       time.perf_counter() - t0)
