"""``samantic eval sum``: interactive segmentation per SUM task, in the columns of the paper's ablation.

For every held-out v2 scene and every task mask of it (:func:`~samantic.train.sum.scene_task_masks`:
thing instances as "unspecified", the salient thing, every entity, every part), a simulated
user clicks as in segment-anything's evaluation: the first point at the centre of the mask
(the pixel farthest from its boundary; three outputs, the one with the highest predicted IoU
kept), each next point at the centre of the larger error region of the current mask
(positive on a miss, negative on a false alarm) with the previous low-res logits as a mask
prompt. After 1, 3 and 5 points the mask is scored by IoU and by boundary IoU (Cheng et al.,
2021: IoU of the pixels within ``d`` of each mask's contour, ``d`` = 2% of the image diagonal).

A model with a task table is asked for the mask's task (``task="model"``) or always for
"unspecified" (``task="unspecified"``: what the task prompt adds); every mask of a scene is
decoded in one batch, round by round.

Forgetting is measured on plain (v1) scenes by :func:`~samantic.train.metrics.evaluate_sam`:
single-point mIoU and segment-everything recall at the model's own thresholds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from samantic.models.tasks import TASKS

__all__ = ["POINTS", "SumEvalResult", "boundary_iou", "evaluate_sum", "mask_boundary", "prompt_coords", "sum_table"]

POINTS = (1, 3, 5)


def mask_boundary(mask: np.ndarray, dilation: int) -> np.ndarray:
    """The pixels of ``mask`` within ``dilation`` pixels (chessboard distance) of its contour; the image
    border counts as outside, so a mask touching it has a boundary there."""
    import cv2

    m = np.pad(mask.astype(np.uint8), 1)
    inner = cv2.erode(m, np.ones((3, 3), np.uint8), iterations=int(dilation))[1:-1, 1:-1]
    return mask.astype(bool) & ~inner.astype(bool)


def boundary_iou(gt: np.ndarray, pred: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU of two boolean masks: IoU of their boundary bands, ``d = max(1, round(ratio x diagonal))``.

    Both empty: 1 (nothing to get wrong); one empty: 0.
    """
    h, w = gt.shape
    d = max(1, int(round(dilation_ratio * np.hypot(h, w))))
    g, p = mask_boundary(gt, d), mask_boundary(pred, d)
    union = np.logical_or(g, p).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(g, p).sum() / union)


@dataclass
class SumEvalResult:
    """Per column, task and number of points: mean IoU and mean boundary IoU over the task masks.

    ``metrics[column][task][n] = {"miou": ..., "mbiou": ..., "masks": ...}``; ``task`` includes "average"
    (the mean over the tasks of their means, as the paper's "overall average").
    """

    seeds: List[int]
    metrics: Dict[str, Dict[str, Dict[int, Dict[str, float]]]] = field(default_factory=dict)
    forgetting: Dict[str, Dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"seeds": [self.seeds[0], self.seeds[-1] + 1] if self.seeds else [],
                "metrics": {c: {t: {str(n): v for n, v in per.items()} for t, per in tasks.items()}
                            for c, tasks in self.metrics.items()},
                "forgetting": self.forgetting, "seconds": self.seconds}


def _click(gt: np.ndarray, cur: np.ndarray) -> Tuple[Tuple[float, float], int]:
    from samantic.train.metrics import centre_point

    fn = gt & ~cur
    fp = cur & ~gt
    if not fn.any() and not fp.any():
        return centre_point(gt), 1  # nothing to fix: the user confirms the mask
    positive = fn.sum() >= fp.sum()
    return centre_point(fn if positive else fp), int(positive)


def prompt_coords(predictor, coords: np.ndarray, image_shape: Tuple[int, int]):
    """Point prompts ``[N, K, 2]`` (x, y in the image) as the predictor's float32 tensor in its input frame."""
    import torch

    n = coords.shape[0]
    return torch.as_tensor(predictor.transform.apply_coords(coords.reshape(-1, 2), image_shape),
                           dtype=torch.float32).reshape(n, -1, 2)


def evaluate_scene(predictor, image: np.ndarray, masks: np.ndarray, tasks: np.ndarray,
                   points: Sequence[int] = POINTS, ask_task: bool = True) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """IoU and boundary IoU of every mask after each number of points in ``points``.

    Args:
        predictor: a :class:`~samantic.pipeline.predictor.Predictor` (image not set yet).
        image: uint8 RGB [H, W, 3]; masks: bool [N, H, W]; tasks: int [N].
        ask_task: give each prompt its mask's task (else "unspecified").

    Returns:
        ``{n: (iou [N], boundary_iou [N])}``.
    """
    import torch

    from samantic.train.metrics import centre_point, mask_iou

    predictor.set_image(image)
    n = len(masks)
    out: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    if n == 0:
        return {k: (np.zeros(0), np.zeros(0)) for k in points}
    task_ids = torch.as_tensor(tasks if ask_task else np.zeros(n), dtype=torch.long)
    coords = np.array([[centre_point(m)] for m in masks], np.float64)  # [N, 1, 2]
    labels = np.ones((n, 1), np.int64)
    logits = None
    last = max(points)
    for k in range(1, last + 1):
        c = prompt_coords(predictor, coords, image.shape[:2])
        lab = torch.as_tensor(labels, dtype=torch.int)
        multimask = k == 1
        pred, scores, low = predictor.predict_torch(c, lab, mask_input=logits, multimask_output=multimask,
                                                    task=task_ids)
        best = scores.argmax(1) if multimask else torch.zeros(n, dtype=torch.long)
        sel = torch.arange(n)
        cur = pred[sel, best].cpu().numpy()
        logits = low[sel, best][:, None]
        if k in points:
            out[k] = (np.array([mask_iou(p, g) for p, g in zip(cur, masks)]),
                      np.array([boundary_iou(g, p) for p, g in zip(cur, masks)]))
        if k < last:
            clicks = [_click(g, p) for g, p in zip(masks, cur)]
            coords = np.concatenate([coords, np.array([[xy] for xy, _ in clicks], np.float64)], 1)
            labels = np.concatenate([labels, np.array([[lb] for _, lb in clicks], np.int64)], 1)
    return out


def evaluate_sum(models: Dict[str, Tuple[Any, bool]], seeds: Iterable[int], points: Sequence[int] = POINTS, *,
                 progress: bool = True) -> SumEvalResult:
    """Interactive mIoU / boundary IoU per task for several models on held-out v2 scenes.

    Args:
        models: column name -> (SAM, ask_task); ``ask_task`` False asks every mask as "unspecified".
        seeds: held-out v2 scene seeds (below the training range).
        points: numbers of points after which masks are scored.
    """
    import torch

    from samantic.pipeline.predictor import Predictor
    from samantic.train.data.panoptic import render_panoptic
    from samantic.train.metrics import TRAIN_SEED_START
    from samantic.train.sum import progress_bar, scene_task_masks

    seeds = list(seeds)
    bad = [s for s in seeds if s >= TRAIN_SEED_START]
    if bad:
        raise ValueError(f"seed {bad[0]} is a training seed (>= {TRAIN_SEED_START}); evaluate on held-out seeds")
    points = sorted(set(int(p) for p in points))
    if not points or points[0] < 1:
        raise ValueError(f"points must be numbers >= 1, got {points}")
    t0 = time.perf_counter()
    sums = {c: {t: {k: [[], []] for k in points} for t in range(len(TASKS))} for c in models}
    predictors = {c: Predictor(m.eval()) for c, (m, _) in models.items()}
    with torch.no_grad(), progress_bar("eval sum", progress, len(seeds) * len(models)) as advance:
        for seed in seeds:
            scene = render_panoptic(seed)
            masks, tasks = scene_task_masks(scene)
            for c, (_, ask) in models.items():
                res = evaluate_scene(predictors[c], scene.image, masks, tasks, points, ask_task=ask)
                for k, (iou, biou) in res.items():
                    for t in range(len(TASKS)):
                        sel = tasks == t
                        sums[c][t][k][0].extend(iou[sel].tolist())
                        sums[c][t][k][1].extend(biou[sel].tolist())
                advance()
    result = SumEvalResult(seeds)
    for c in models:
        per: Dict[str, Dict[int, Dict[str, float]]] = {}
        for t, name in enumerate(TASKS):
            per[name] = {k: {"miou": float(np.mean(v[0])) if v[0] else float("nan"),
                             "mbiou": float(np.mean(v[1])) if v[1] else float("nan"), "masks": len(v[0])}
                         for k, v in sums[c][t].items()}
        per["average"] = {k: {m: float(np.nanmean([per[name][k][m] for name in TASKS])) for m in ("miou", "mbiou")}
                          for k in points}
        result.metrics[c] = per
    result.seconds = time.perf_counter() - t0
    return result


def sum_table(result: SumEvalResult, metric: str = "miou") -> str:
    """Markdown: rows (points, task), columns the models, like the paper's ablation table."""
    cols = list(result.metrics)
    lines = ["| points | task | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    first = result.metrics[cols[0]]
    points = sorted(next(iter(first.values())).keys())
    for k in points:
        for task in (*TASKS, "average"):
            vals = [result.metrics[c][task][k][metric] for c in cols]
            best = np.nanmax(vals) if not all(np.isnan(vals)) else None
            cells = [(f"**{v:.3f}**" if best is not None and v == best else f"{v:.3f}") for v in vals]
            lines.append(f"| {k} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
