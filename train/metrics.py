"""Evaluation of SAM models on held-out shapes-world scenes.

Metrics (all on seeds the trainer never sees: training renders seeds >= 1,000,000):
  * point-prompt mIoU, 1 point at the object's centre (the pixel farthest from its
    boundary): the top mask by predicted IoU, and the oracle best of the three;
  * 3-point mIoU: two more points, each at the centre of the largest error region
    of the previous prediction (positive on a miss, negative on a false alarm),
    with the previous low-res logits as mask prompt, single-mask output;
  * segment-everything recall: the fraction of ground-truth instances that some
    mask of the automatic mask generator (default settings) covers at IoU >= 0.5
    and >= 0.75;
  * the resolution ceiling (optional): the mIoU a perfect model of the same input
    and low-res mask size would reach, see :func:`resolution_ceiling`.
Prompting goes through segment-anything's own ``SamPredictor``; a model with SUM's task table
(``sam_nano_sum``) is prompted as every samantic API prompts it by default, with task
"unspecified" (:class:`~samantic.pipeline.predictor.Predictor`, which is ``SamPredictor``
plus the task's embedding), as segment-everything is.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from samantic.models.registry import SAM_BOX_NMS

TRAIN_SEED_START = 1_000_000  # training scenes are rendered from here up


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of one size (0 when both are empty)."""
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return float(inter / union) if union else 0.0


def centre_point(region: np.ndarray, *, image_edge_is_boundary: bool = True) -> Tuple[float, float]:
    """(x, y) of the pixel of ``region`` farthest from its boundary (the largest component's interior).

    With ``image_edge_is_boundary`` False only the region's edges inside the image count, so a region cut by the
    image edge (a wall, a floor) is prompted near that edge, where it is widest: the single-point measure of
    benchmarks/samcp_ceiling.py and the sam_nano_panoptic model card."""
    import cv2

    r = region.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(r, connectivity=8)
    if n > 2:
        biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        r = (labels == biggest).astype(np.uint8)
    if image_edge_is_boundary:
        dist = cv2.distanceTransform(np.pad(r, 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    else:
        dist = cv2.distanceTransform(r, cv2.DIST_L2, 3)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x) + 0.5, float(y) + 0.5


def single_point_ious(predictor, image: np.ndarray, masks: Sequence[np.ndarray], *,
                      image_edge_is_boundary: bool = True) -> Tuple[List[float], List[float]]:
    """Per mask, the IoU of SAM's highest-scoring of its 3 masks and the best of the 3, prompted at one point.

    ``predictor`` is a ``segment_anything.SamPredictor``; each mask is prompted at :func:`centre_point`, the
    pixel farthest from its boundary (``image_edge_is_boundary`` as there). Returns ``(top, best_of_3)``, one
    IoU per mask in ``masks``."""
    predictor.set_image(image)
    top, best = [], []
    for gt in masks:
        gt = np.asarray(gt, bool)
        x, y = centre_point(gt, image_edge_is_boundary=image_edge_is_boundary)
        out, scores, _ = predictor.predict(point_coords=np.array([[x, y]], np.float32), point_labels=np.array([1]),
                                           multimask_output=True)
        ious = [mask_iou(m, gt) for m in out]
        top.append(ious[int(np.argmax(scores))])
        best.append(max(ious))
    return top, best


def recall_at(gt_masks: np.ndarray, pred_masks: np.ndarray, thresholds: Sequence[float]) -> Dict[float, int]:
    """How many ground-truth masks have a predicted mask with IoU >= each threshold."""
    if len(gt_masks) == 0:
        return {t: 0 for t in thresholds}
    if len(pred_masks) == 0:
        return {t: 0 for t in thresholds}
    from samantic.ops import rle_encode, rle_iou

    iou = rle_iou(rle_encode(pred_masks), rle_encode(gt_masks))  # [P, G]
    best = iou.max(0)
    return {t: int((best >= t).sum()) for t in thresholds}


def ideal_low_res_logits(mask: np.ndarray, input_size: Tuple[int, int], img_size: int, low_res: int) -> np.ndarray:
    """The best low-res logits a SAM could output for ``mask``: its signed distance, sampled on the low-res grid.

    The full-size signed distance to the boundary (positive inside) is resized
    to the model's input frame, padded like the input, and sampled at the
    centres of the ``low_res x low_res`` cells. Bilinear upsampling of these
    logits (what SAM's post-processing does) puts the boundary where a smooth
    learned logit field would put it; a hard 0/1 map would do worse.
    """
    import cv2
    import torch
    import torch.nn.functional as F

    m = mask.astype(np.uint8)
    sdf = cv2.distanceTransform(m, cv2.DIST_L2, 5) - cv2.distanceTransform(1 - m, cv2.DIST_L2, 5)
    h, w = input_size
    t = F.interpolate(torch.from_numpy(sdf)[None, None], (h, w), mode="bilinear", align_corners=False)
    padded = torch.full((1, 1, img_size, img_size), -float(img_size))
    padded[..., :h, :w] = t
    return F.interpolate(padded, (low_res, low_res), mode="bilinear", align_corners=False)[0, 0].numpy()


def ceiling_ious(model, scene) -> List[float]:
    """Per instance of ``scene``: IoU of its ideal low-res logits after ``model``'s own post-processing."""
    import torch

    from samantic.pipeline.prompts import preprocess_shape

    img_size = model.image_encoder.img_size
    low_res = model.prompt_encoder.mask_input_size[0]
    size = scene.image.shape[:2]
    input_size = preprocess_shape(size[0], size[1], img_size)
    ious = []
    with torch.no_grad():
        for gt in scene.masks:
            logits = ideal_low_res_logits(gt, input_size, img_size, low_res)
            up = model.postprocess_masks(torch.from_numpy(logits)[None, None], input_size, size)
            ious.append(mask_iou(up[0, 0].numpy() > model.mask_threshold, gt))
    return ious


def resolution_ceiling(model, seeds: Iterable[int]) -> Tuple[float, int]:
    """(mIoU, instances): how well ideal low-res logits reproduce the ground truth of ``seeds`` after ``model``'s own
    post-processing (segment-anything's ``Sam.postprocess_masks``).

    No weights are involved: only the input size and the low-res mask size. It
    bounds what any training can reach on these scenes with this architecture.
    """
    from samantic.train.data.shapes import render_scene

    ious = [iou for seed in seeds for iou in ceiling_ious(model, render_scene(seed))]
    return (float(np.mean(ious)) if ious else float("nan")), len(ious)


@dataclass
class SamEvalResult:
    n_scenes: int
    n_instances: int
    metrics: Dict[str, float]
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        return {"scenes": self.n_scenes, "instances": self.n_instances, "metrics": self.metrics, "seconds": self.seconds}

    def markdown(self) -> str:
        names = {
            "miou_1pt_top": "1-point mIoU (top by predicted IoU)",
            "miou_1pt_oracle": "1-point mIoU (oracle best of 3)",
            "miou_3pt": "3-point mIoU",
            "recall_50": "segment-everything recall @ IoU 0.5",
            "recall_75": "segment-everything recall @ IoU 0.75",
            "masks_per_image": "segment-everything masks per image",
            "ceiling": "resolution ceiling: mIoU of ideal low-res logits (no model can do better)",
        }
        lines = ["| metric | value |", "|---|---|"]
        for k, label in names.items():
            if k in self.metrics:
                lines.append(f"| {label} | {self.metrics[k]:.4f} |")
        lines.append(f"| scenes / instances | {self.n_scenes} / {self.n_instances} |")
        return "\n".join(lines)


def evaluate_sam(model, seeds: Iterable[int], amg_seeds: Optional[Iterable[int]] = None, *,
                 progress: bool = True, amg_kwargs: Optional[Dict[str, Any]] = None,
                 ceiling: bool = False) -> SamEvalResult:
    """Point-prompt mIoU on scenes of ``seeds`` and segment-everything recall on ``amg_seeds`` (default: the same).

    With ``ceiling``, also the :func:`resolution_ceiling` on ``seeds``.
    """
    import torch
    from segment_anything import SamPredictor

    from samantic.train.data.shapes import render_scene

    seeds = list(seeds)
    amg_seeds = seeds if amg_seeds is None else list(amg_seeds)
    for s in seeds + amg_seeds:
        if s >= TRAIN_SEED_START:
            raise ValueError(f"seed {s} is a training seed (>= {TRAIN_SEED_START}); evaluate on held-out seeds")
    if amg_seeds:
        from samantic.pipeline import AutomaticMaskGenerator
    model.eval()
    if getattr(model, "task_prompt", None) is not None:
        from samantic.pipeline.predictor import Predictor

        predictor = Predictor(model, task="unspecified")  # the default of every samantic API
    else:
        predictor = SamPredictor(model)
    t0 = time.perf_counter()
    top, oracle, three, ideal = [], [], [], []
    n_inst = 0
    with _progress(progress, len(seeds) + len(amg_seeds)) as advance, torch.no_grad():
        for seed in seeds:
            scene = render_scene(seed)
            if ceiling:
                ideal.extend(ceiling_ious(model, scene))
            predictor.set_image(scene.image)
            for gt in scene.masks:
                n_inst += 1
                pts = [centre_point(gt)]
                labels = [1]
                masks, scores, low = predictor.predict(np.array(pts), np.array(labels), multimask_output=True)
                ious = [mask_iou(m, gt) for m in masks]
                top.append(ious[int(np.argmax(scores))])
                oracle.append(max(ious))
                cur = masks[int(np.argmax(scores))]
                logits = low[int(np.argmax(scores))][None]
                for _ in range(2):
                    fn = gt & ~cur
                    fp = cur & ~gt
                    if not fn.any() and not fp.any():
                        break
                    positive = fn.sum() >= fp.sum()
                    pts.append(centre_point(fn if positive else fp))
                    labels.append(1 if positive else 0)
                    masks, _, low = predictor.predict(np.array(pts), np.array(labels), mask_input=logits,
                                                      multimask_output=False)
                    cur, logits = masks[0], low[0][None]
                three.append(mask_iou(cur, gt))
            advance()
        generator = AutomaticMaskGenerator(model, output_mode="binary_mask", **(amg_kwargs or {})) if amg_seeds else None
        hits = {0.5: 0, 0.75: 0}
        n_gt = n_found = 0
        for seed in amg_seeds:
            scene = render_scene(seed)
            found = generator.generate_masks(scene.image)
            from samantic.ops import rle_decode

            pred = rle_decode(found.rles).astype(bool) if len(found) else np.zeros((0,) + scene.image.shape[:2], bool)
            r = recall_at(scene.masks, pred, (0.5, 0.75))
            hits = {t: hits[t] + r[t] for t in hits}
            n_gt += len(scene.masks)
            n_found += len(found)
            advance()
    metrics = {
        "miou_1pt_top": float(np.mean(top)) if top else float("nan"),
        "miou_1pt_oracle": float(np.mean(oracle)) if oracle else float("nan"),
        "miou_3pt": float(np.mean(three)) if three else float("nan"),
        "recall_50": hits[0.5] / n_gt if n_gt else float("nan"),
        "recall_75": hits[0.75] / n_gt if n_gt else float("nan"),
        "masks_per_image": n_found / len(amg_seeds) if amg_seeds else float("nan"),
    }
    if ceiling:
        metrics["ceiling"] = float(np.mean(ideal)) if ideal else float("nan")
    return SamEvalResult(len(seeds), n_inst, metrics, time.perf_counter() - t0)


class _progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self.bar = Progress(transient=False)
        self.bar.__enter__()
        task = self.bar.add_task("evaluating", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


# ---------------------------------------------------------------- U-SAM: semantic segmentation by class names


@dataclass
class UsamEvalResult:
    """Semantic-map IoU and COCO mask AP50 per name, on held-out scenes."""

    names: Tuple[str, ...]
    level: str
    iou: Dict[str, float]
    ap50: Dict[str, float]
    n_scenes: int
    n_instances: int
    seconds: float

    @property
    def miou(self) -> float:
        vals = [v for v in self.iou.values() if v == v]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def map50(self) -> float:
        vals = [v for v in self.ap50.values() if v == v and v >= 0]
        return float(np.mean(vals)) if vals else float("nan")

    def to_dict(self) -> Dict[str, Any]:
        return {"names": list(self.names), "level": self.level, "miou": self.miou, "map50": self.map50,
                "iou": self.iou, "ap50": self.ap50, "scenes": self.n_scenes, "instances": self.n_instances,
                "seconds": self.seconds}

    def markdown(self) -> str:
        lines = ["| name | IoU | AP50 |", "|---|---|---|"]
        for n in self.names:
            lines.append(f"| {n} | {self.iou[n]:.4f} | {self.ap50[n]:.4f} |")
        lines.append(f"| **mean** | **{self.miou:.4f}** | **{self.map50:.4f}** |")
        return "\n".join(lines)


def _gt_level(scene, level: str) -> Tuple[np.ndarray, List[str]]:
    """Semantic map and per-instance names of a scene at ``class`` or ``superclass`` level."""
    from samantic.train.data.shapes import CLASSES, SUPERCLASS_NAMES, SUPERCLASSES

    if level == "class":
        return scene.semantic, [CLASSES[int(i)] for i in scene.labels]
    return scene.superclass, [SUPERCLASSES[CLASSES[int(i)]] for i in scene.labels]


def evaluate_usam(segmenter, seeds: Iterable[int], level: str = "class", *, progress: bool = True) -> UsamEvalResult:
    """Evaluates a class-name :class:`~samantic.runtime.Segmenter` on held-out scenes.

    ``segmenter.names`` must be shapes-world names of ``level`` (``class``: circle, ring, ...;
    ``superclass``: round, angular), in any order and any subset. Semantic IoU accumulates
    intersections and unions over all scenes; AP50 is pycocotools' ``COCOeval(iouType="segm")``
    precision at IoU 0.5, per category.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from samantic.ops import rle_area, rle_encode, rle_to_bbox
    from samantic.train.data.shapes import CLASSES, SUPERCLASS_NAMES, render_scene

    if level not in ("class", "superclass"):
        raise ValueError(f"level must be 'class' or 'superclass', got {level!r}")
    vocab = CLASSES if level == "class" else SUPERCLASS_NAMES
    names = tuple(segmenter.names)
    unknown = [n for n in names if n not in vocab]
    if not names or unknown:
        raise ValueError(f"the segmenter's names {list(names)} must be shapes-world {level} names ({', '.join(vocab)})")
    seeds = list(seeds)
    for s in seeds:
        if s >= TRAIN_SEED_START:
            raise ValueError(f"seed {s} is a training seed (>= {TRAIN_SEED_START}); evaluate on held-out seeds")
    gt_id = {n: vocab.index(n) + 1 for n in names}  # scene maps store 1 + vocabulary index
    inter = {n: 0 for n in names}
    union = {n: 0 for n in names}
    images, gt_anns, dt_anns = [], [], []
    t0 = time.perf_counter()
    with _progress(progress, len(seeds)) as advance:
        for k, seed in enumerate(seeds):
            scene = render_scene(seed)
            gt_map, inst_names = _gt_level(scene, level)
            res = segmenter(scene.image)
            pred = res.semantic_map
            for j, n in enumerate(names):
                g = gt_map == gt_id[n]
                p = pred == j + 1
                inter[n] += int(np.logical_and(g, p).sum())
                union[n] += int(np.logical_or(g, p).sum())
            image_id = k + 1
            h, w = scene.image.shape[:2]
            images.append({"id": image_id, "width": w, "height": h})
            wanted = [i for i, n in enumerate(inst_names) if n in gt_id]
            if wanted:  # one encode per scene; boxes and areas from the RLEs
                rles = rle_encode(scene.masks[wanted])
                areas, boxes = rle_area(rles), rle_to_bbox(rles)
                for j, (i, rle) in enumerate(zip(wanted, rles.to_dicts(compressed=True))):
                    gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id, "category_id": gt_id[inst_names[i]],
                                    "segmentation": rle, "area": int(areas[j]), "iscrowd": 0,
                                    "bbox": [float(v) for v in boxes[j]]})
            dt_anns.extend(res.to_coco(image_id, category_ids=gt_id))
            advance()
    iou = {n: (inter[n] / union[n]) if union[n] else float("nan") for n in names}
    import contextlib
    import io

    gt = COCO()
    gt.dataset = {"images": images, "annotations": gt_anns,
                  "categories": [{"id": gt_id[n], "name": n} for n in names]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
    ap50 = {n: float("nan") for n in names}
    if dt_anns and gt_anns:
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes([dict(d, id=i + 1) for i, d in enumerate(dt_anns)])
            ev = COCOeval(gt, dt, iouType="segm")
            ev.evaluate()
            ev.accumulate()
        prec = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recalls, per category, area all, maxDets 100
        for ci, cat in enumerate(ev.params.catIds):
            p = prec[:, ci]
            name = next(n for n in names if gt_id[n] == cat)
            ap50[name] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    elif gt_anns:
        ap50 = {n: 0.0 for n in names}
    return UsamEvalResult(names, level, iou, ap50, len(seeds), len(gt_anns), time.perf_counter() - t0)


# ---------------------------------------------------------------- segment-everything thresholds


@dataclass
class ThresholdCalibration:
    """Segment-everything quality per (pred_iou_thresh, stability_score_thresh, box_nms_thresh) on held-out scenes.

    Attributes:
        rows: one dict per grid point: the three thresholds, recall at IoU 0.5 / 0.75, masks per image,
            precision (kept masks that match a distinct object at IoU 0.5) and F1 at 0.5.
        best: the row with the highest F1 at IoU 0.5 (ties: higher recall at 0.75).
        iou_correlation: Pearson correlation of predicted and true IoU over every candidate mask
            (true IoU: the best IoU with any ground-truth instance).
        n_images, n_objects, n_candidates: what was measured.
    """

    rows: List[Dict[str, float]]
    best: Dict[str, float]
    iou_correlation: float
    n_images: int
    n_objects: int
    n_candidates: int
    seconds: float
    scenes: str = "v1"
    task: str = "unspecified"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        what = {"v2": "entities (things and stuff regions)", "v2-part": "part-task masks (parts; simple things whole)"
                }.get(self.scenes, "objects")
        asked = f" (task prompt {self.task!r})" if self.task != "unspecified" else ""
        lines = [f"{self.n_images} {self.scenes} scenes, {self.n_objects} {what}, {self.n_candidates} candidate masks"
                 f"{asked}; "
                 f"correlation of predicted and true IoU: {self.iou_correlation:.3f}", "",
                 "| pred_iou_thresh | stability_score_thresh | box_nms_thresh | recall@0.5 | recall@0.75 | masks / image "
                 "| precision@0.5 | F1@0.5 |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            mark = " **(chosen)**" if r is self.best or r == self.best else ""
            lines.append(f"| {r['pred_iou_thresh']:.2f} | {r['stability_score_thresh']:.2f} | "
                         f"{r.get('box_nms_thresh', SAM_BOX_NMS):.2f} | {r['recall_50']:.3f} | "
                         f"{r['recall_75']:.3f} | {r['masks_per_image']:.1f} | {r['precision_50']:.3f} | "
                         f"{r['f1_50']:.3f}{mark} |")
        return "\n".join(lines)


PRED_IOU_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.88)
# fine steps just under 0.95: a fine-tuned model's stability scores shift by a hundredth or two, and
# on the coarse grid its best pair sits a whole step away (measured: benchmarks/results/sum_calibrated/)
STABILITY_GRID = (0.7, 0.8, 0.9, 0.92, 0.93, 0.94, 0.95)
# box NMS under segment-anything's 0.7: a small model's second masks of one object (a part, the object with a
# neighbour's edge) overlap its first by more than half, yet their boxes by less than 0.7; down to 0.3, not under:
# lower ones gain under 0.02 F1 on the shapes world and drop any object whose box overlaps a kept one's (measured:
# benchmarks/results/box_nms_calibrated/)
BOX_NMS_GRID = (0.7, 0.6, 0.5, 0.4, 0.3)


def _v1_objects(seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """A plain shapes-world scene: its image and shape instances."""
    from samantic.train.data.shapes import render_scene

    scene = render_scene(seed)
    return scene.image, scene.masks


def _v2_objects(seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """A panoptic scene: its image and entities (every thing as a whole, every stuff region)."""
    from samantic.train.data.panoptic import render_panoptic

    scene = render_panoptic(seed)
    return scene.image, scene.entity_masks


def _v2_part_objects(seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """A panoptic scene: its image and SUM's part-task masks (each thing's parts, a simple thing itself)."""
    from samantic.train.data.panoptic import render_panoptic
    from samantic.train.sum import PART, scene_task_masks

    scene = render_panoptic(seed)
    masks, tasks = scene_task_masks(scene)
    return scene.image, masks[tasks == PART]


# calibrate_thresholds' scene kinds: seed -> (image, the masks a model should give one each)
_CALIBRATION_OBJECTS: Dict[str, Callable[[int], Tuple[np.ndarray, np.ndarray]]] = {
    "v1": _v1_objects, "v2": _v2_objects, "v2-part": _v2_part_objects}


def calibrate_thresholds(model, seeds: Iterable[int], pred_iou_grid: Sequence[float] = PRED_IOU_GRID,
                         stability_grid: Sequence[float] = STABILITY_GRID, *, points_per_side: int = 32,
                         box_nms_grid: Sequence[float] = BOX_NMS_GRID, scenes: str = "v1",
                         task: str = "unspecified", progress: bool = True) -> ThresholdCalibration:
    """Measures segment-everything on held-out scenes for every triple of thresholds (pred_iou_thresh,
    stability_score_thresh, box_nms_thresh), and picks one.

    Each scene is segmented once with the loosest thresholds of the grid and no NMS; each
    grid point then filters those candidates and runs the generator's box NMS at its
    box_nms_thresh (the same kept set as running the generator at that grid point, since
    filtering comes before NMS there too).

    Args:
        box_nms_grid: the generator's box-NMS IoU thresholds to try: a lower one drops more of an object's second
            masks, and more of the masks of objects that overlap; ``(0.7,)`` keeps segment-anything's.
        scenes: ``"v1"``: plain shapes-world scenes, the objects are the shape instances;
            ``"v2"``: panoptic scenes, the objects are the entities (every thing as a whole and
            every stuff region), the masks a model trained on v2 scenes should give one each;
            ``"v2-part"``: panoptic scenes, the objects are SUM's part-task masks (each thing's parts,
            a simple thing as a whole), what a SUM model asked for ``task="part"`` should give.
        task: SUM's task prompt segment-everything runs with (a model without a task table decodes every task as
            "unspecified").
    """
    from samantic.models.tasks import task_name
    from samantic.ops import nms, rle_encode, rle_iou
    from samantic.pipeline import AutomaticMaskGenerator

    if scenes not in _CALIBRATION_OBJECTS:
        raise ValueError(f"scenes must be one of {', '.join(_CALIBRATION_OBJECTS)}, got {scenes!r}")
    image_and_objects = _CALIBRATION_OBJECTS[scenes]
    seeds = list(seeds)
    for s in seeds:
        if s >= TRAIN_SEED_START:
            raise ValueError(f"seed {s} is a training seed (>= {TRAIN_SEED_START}); calibrate on held-out seeds")
    t0 = time.perf_counter()
    generator = AutomaticMaskGenerator(model, points_per_side=points_per_side, pred_iou_thresh=min(pred_iou_grid) - 1e-6,
                                       stability_score_thresh=min(stability_grid), box_nms_thresh=1.0, task=task)
    per_image = []
    pred_all, true_all = [], []
    with _progress(progress, len(seeds)) as advance:
        for seed in seeds:
            image, objects = image_and_objects(seed)
            found = generator.generate_masks(image)
            if len(found) and len(objects):
                iou = rle_iou(found.rles, rle_encode(objects))  # [P, G]
            else:
                iou = np.zeros((len(found), len(objects)))
            per_image.append((np.asarray(found.boxes, np.float32), np.asarray(found.iou_preds, np.float32),
                              np.asarray(found.stability_score, np.float32), iou))
            pred_all.append(np.asarray(found.iou_preds, np.float32))
            true_all.append(iou.max(1) if iou.shape[1] else np.zeros(len(found)))
            advance()
    p = np.concatenate(pred_all) if pred_all else np.zeros(0)
    t = np.concatenate(true_all) if true_all else np.zeros(0)
    corr = float(np.corrcoef(p, t)[0, 1]) if len(p) > 2 and p.std() > 0 and t.std() > 0 else float("nan")
    n_obj = sum(it[3].shape[1] for it in per_image)
    rows = []
    for pi, st, bn in itertools.product(pred_iou_grid, stability_grid, box_nms_grid):
        hit50 = hit75 = kept = true_pos = 0
        for boxes, ious, stab, iou in per_image:
            sel = np.nonzero((ious > pi) & (stab >= st))[0]
            if len(sel):
                sel = sel[nms(boxes[sel], ious[sel], bn)]
            kept += len(sel)
            if iou.shape[1] == 0 or len(sel) == 0:
                continue
            m = iou[sel]
            hit50 += int((m.max(0) >= 0.5).sum())
            hit75 += int((m.max(0) >= 0.75).sum())
            # precision: each object matched by at most one kept mask (greedy by IoU)
            free = np.ones(m.shape[1], bool)
            for i in np.argsort(-m.max(1)):
                row = np.where(free, m[i], -1.0)
                g = int(np.argmax(row))
                if row[g] >= 0.5:
                    free[g] = False
                    true_pos += 1
        recall50 = hit50 / n_obj if n_obj else float("nan")
        precision = true_pos / kept if kept else 0.0
        f1 = 2 * precision * recall50 / (precision + recall50) if precision + recall50 > 0 else 0.0
        rows.append({"pred_iou_thresh": float(pi), "stability_score_thresh": float(st),
                     "box_nms_thresh": float(bn), "recall_50": recall50,
                     "recall_75": hit75 / n_obj if n_obj else float("nan"),
                     "masks_per_image": kept / max(1, len(per_image)), "precision_50": precision, "f1_50": f1})
    # ties: the higher recall at 0.75, then the NMS threshold nearer segment-anything's (the higher)
    best = max(rows, key=lambda r: (round(r["f1_50"], 3), r["recall_75"], r["box_nms_thresh"]))
    return ThresholdCalibration(rows, best, corr, len(per_image), n_obj, int(len(p)), time.perf_counter() - t0,
                              scenes, task_name(task))
