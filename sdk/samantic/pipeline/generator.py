"""The segment-everything pipeline, independent of how the networks run (torch-free).

Per crop:

    preprocess (resize longest side, normalize, pad; numpy + Pillow)
      -> engine.encode                                  (image encoder)
    grid points, in batches:
      -> engine.run_prompts                             (prompt encoder + transformer [+ semantic head])
      -> predicted IoU filter [+ class filter] [+ mask scorer]   (before any upscaling)
      -> engine.upscale                                 (upscaling + hypernetworks, survivors only)
      -> samantic._C.postprocess_masks                  (SAM's two-stage resize, stability,
                                                         threshold, box and RLE in one pass)
      -> stability filter, crop-edge filter, box NMS    (samantic._C.nms)

:class:`MaskGenerator` runs it on any :class:`~samantic.pipeline.engine.Engine`:
the torch one (:class:`~samantic.pipeline.AutomaticMaskGenerator`), onnxruntime
or TensorRT (:mod:`samantic.runtime`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from samantic.ops import RleBatch, nms, postprocess_masks, remove_small_regions, rle_area, rle_decode, rle_encode
from samantic.ops.rle import _index
from samantic.pipeline.config import AmgConfig
from samantic.pipeline.engine import Engine, PromptOutputs, engine_task
from samantic.pipeline.prompts import (NO_PARENT, OUTSIDE, adaptive_levels, coarse_parents, crop_boxes,
                                       layer_point_grids, near_crop_edge, point_grid)
from samantic.pipeline.scoring import ScoredMasks
from samantic.pipeline.transforms import apply_coords, preprocess

STAGES = ("preprocess", "encoder", "decoder", "postprocess", "nms", "output")

Scorer = Callable[[Any, np.ndarray], ScoredMasks]


@dataclass
class MaskSet:
    """Masks of one image as arrays (before they are formatted as records).

    Attributes:
        rles: the masks at image size.
        boxes: int64 [N, 4] XYXY (inclusive max) in image coordinates.
        iou_preds: float32 [N].
        points: float64 [N, 2] prompt of each mask, image coordinates.
        stability_score: float32 [N].
        crop_boxes: int64 [N, 4] XYXY crop each mask came from.
        fields: per-mask extras from a scoring head.
    """

    rles: RleBatch
    boxes: np.ndarray
    iou_preds: np.ndarray
    points: np.ndarray
    stability_score: np.ndarray
    crop_boxes: np.ndarray
    fields: Dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.iou_preds)

    def select(self, index: Any) -> "MaskSet":
        idx = np.arange(len(self))[_index(index)]
        return MaskSet(self.rles.select(idx), self.boxes[idx], self.iou_preds[idx], self.points[idx],
                       self.stability_score[idx], self.crop_boxes[idx], {k: v[idx] for k, v in self.fields.items()})

    @staticmethod
    def empty(size: Sequence[int], field_names: Sequence[str] = ()) -> "MaskSet":
        return MaskSet(
            RleBatch(np.zeros(0, np.uint32), np.zeros(1, np.int64), tuple(int(v) for v in size)),
            np.zeros((0, 4), np.int64), np.zeros(0, np.float32), np.zeros((0, 2), np.float64),
            np.zeros(0, np.float32), np.zeros((0, 4), np.int64), {k: np.zeros(0) for k in field_names},
        )

    @staticmethod
    def concat(parts: List["MaskSet"], size: Sequence[int]) -> "MaskSet":
        parts = [p for p in parts if len(p)]
        if not parts:
            return MaskSet.empty(size)
        if len(parts) == 1:
            return parts[0]
        keys = parts[0].fields.keys()
        return MaskSet(
            RleBatch.concat([p.rles for p in parts]),
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.iou_preds for p in parts]),
            np.concatenate([p.points for p in parts]),
            np.concatenate([p.stability_score for p in parts]),
            np.concatenate([p.crop_boxes for p in parts]),
            {k: np.concatenate([p.fields[k] for p in parts]) for k in keys},
        )


def check_image(image: Any) -> np.ndarray:
    """Validates an RGB uint8 ``[H, W, 3]`` image (``ValueError`` naming the problem)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array HxWx3 uint8 (RGB), got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape HxWx3 (RGB), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must not be empty, got {image.shape}")
    return image


class MaskGenerator:
    """Segments everything in an image with an :class:`~samantic.pipeline.engine.Engine`.

    Args:
        engine: runs the networks (torch, onnxruntime, TensorRT).
        config: the generator's options.
        mask_scorer: optional hook called with the mask tokens (engine array type) and
            predicted IoU of the masks that passed the IoU filter, before upscaling.
        class_scorer: optional hook called with the engine's class logits ``[K, C + 1]``
            (numpy) and predicted IoU of those masks, e.g.
            :class:`~samantic.pipeline.scoring.ClassLogitScorer`; runs before ``mask_scorer``.

    Raises:
        ValueError: ``config.task`` is a task the engine cannot run (see :func:`~samantic.pipeline.engine.engine_task`).
    """

    def __init__(self, engine: Engine, config: AmgConfig, mask_scorer: Optional[Scorer] = None,
                 class_scorer: Optional[Scorer] = None) -> None:
        self.engine = engine
        self.config = config
        self.mask_scorer = mask_scorer
        self.class_scorer = class_scorer
        engine_task(engine, config.task)
        if config.point_grids is not None:
            self.point_grids = list(config.point_grids)
        else:
            self.point_grids = layer_point_grids(config.points_per_side, config.crop_n_layers,
                                                 config.crop_n_points_downscale_factor)
        self.timings: Dict[str, float] = {}
        self.stats: Dict[str, int] = {}

    def generate(self, image: np.ndarray, task: Union[str, int, None] = None) -> List[Dict[str, Any]]:
        """Segments everything in an RGB uint8 image ``[H, W, 3]``.

        Args:
            image: the image.
            task: SUM task prompt of this call (name or index; default ``config.task``).

        Returns:
            One record per mask, as segment-anything's generator returns them:
            ``segmentation`` (by ``output_mode``), ``area``, ``bbox`` (XYWH),
            ``predicted_iou``, ``point_coords``, ``stability_score``, ``crop_box``
            (XYWH), plus any fields of the scoring heads.
        """
        masks = self.generate_masks(image, task)
        t = time.perf_counter()
        records = self.to_records(masks)
        self.timings["output"] = self.timings.get("output", 0.0) + time.perf_counter() - t
        return records

    def generate_masks(self, image: np.ndarray, task: Union[str, int, None] = None) -> MaskSet:
        """Like :meth:`generate`, but returns the masks as arrays and RLEs (no per-mask decoding)."""
        image = check_image(image)
        task_id = engine_task(self.engine, self.config.task if task is None else task)
        self.timings = {k: 0.0 for k in STAGES}
        self.stats = {"points": 0, "points_skipped": 0, "points_covered": 0, "points_quiet": 0, "masks_decoded": 0,
                      "masks_upscaled": 0}
        cfg = self.config
        orig = image.shape[:2]
        boxes, layers = crop_boxes(orig, cfg.crop_n_layers, cfg.crop_overlap_ratio)
        parts = [self._process_crop(image, box, layer, orig, task_id) for box, layer in zip(boxes, layers)]
        data = MaskSet.concat(parts, orig)
        if len(boxes) > 1 and len(data):
            # step: duplicates across crops; smaller crops win (score = 1 / crop area)
            t = time.perf_counter()
            cb = data.crop_boxes
            area = ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1])).astype(np.float32)
            scores = (np.float32(1.0) / area).astype(np.float32)
            data = data.select(nms(data.boxes.astype(np.float32), scores, cfg.crop_nms_thresh, device=cfg.device))
            self.timings["nms"] += time.perf_counter() - t
        if cfg.min_mask_region_area > 0 and len(data):
            t = time.perf_counter()
            data = self._remove_small_regions(data, cfg.min_mask_region_area, max(cfg.box_nms_thresh, cfg.crop_nms_thresh))
            self.timings["postprocess"] += time.perf_counter() - t
        return data

    def _process_crop(self, image: np.ndarray, crop_box: List[int], layer: int, orig: Sequence[int],
                      task: int = 0) -> MaskSet:
        cfg = self.config
        engine = self.engine
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        # step: preprocess (segment-anything's resize and normalisation, in numpy + Pillow)
        t = time.perf_counter()
        x, input_size = preprocess(crop, engine.pixel_mean, engine.pixel_std, engine.img_size)
        self.timings["preprocess"] += time.perf_counter() - t
        # step: image encoder
        t = time.perf_counter()
        engine.encode(x)
        self.timings["encoder"] += time.perf_counter() - t

        grid = self.point_grids[layer]
        points = grid * np.array(crop_size)[None, ::-1]
        levels, parents = self._adaptive_levels(grid) if cfg.adaptive else ([np.arange(len(points))], None)
        self.stats["points"] += len(points)
        # adaptive: best predicted IoU of each decoded point (+inf: inside a confident mask, -inf: not decoded)
        promise = np.full(len(points), -np.inf)
        # no IoU filter: nothing to come close to, so every point is prompted
        floor = cfg.pred_iou_thresh - cfg.adaptive_margin if cfg.pred_iou_thresh > 0.0 else -np.inf
        coverage = None
        parts: List[MaskSet] = []
        for idx in levels:
            if parents is not None:
                # step: refine only where a coarser neighbour came close to the IoU filter
                quiet = ~_promising(parents[idx], promise, floor)
                self.stats["points_quiet"] += int(quiet.sum())
                idx = idx[~quiet]
            for start in range(0, len(idx), cfg.points_per_batch):
                batch_idx = idx[start : start + cfg.points_per_batch]
                if coverage is not None:
                    # step: skip points inside masks already kept with high confidence
                    covered = self._covered(coverage, points[batch_idx], crop_size)
                    self.stats["points_covered"] += int(covered.sum())
                    promise[batch_idx[covered]] = np.inf
                    batch_idx = batch_idx[~covered]
                    if len(batch_idx) == 0:
                        continue
                part, low_res, confident, best_iou = self._process_batch(points[batch_idx], crop_size, input_size,
                                                                         crop_box, orig, task)
                promise[batch_idx] = best_iou
                if confident is not None and confident.any():  # adaptive mode only
                    cov = (low_res[confident] > engine.mask_threshold).any(0)
                    coverage = cov if coverage is None else (coverage | cov)
                parts.append(part)
        self.stats["points_skipped"] = self.stats["points_covered"] + self.stats["points_quiet"]
        engine.reset()
        data = MaskSet.concat(parts, orig)
        if not len(data):
            return data

        # step: duplicates within the crop (box NMS by predicted IoU)
        t = time.perf_counter()
        data = data.select(nms(data.boxes.astype(np.float32), data.iou_preds, cfg.box_nms_thresh, device=cfg.device))
        self.timings["nms"] += time.perf_counter() - t
        data.boxes = data.boxes + np.array([x0, y0, x0, y0], np.int64)
        data.points = data.points + np.array([x0, y0], np.float64)
        data.crop_boxes = np.tile(np.array(crop_box, np.int64), (len(data), 1))
        return data

    @staticmethod
    def _adaptive_levels(grid: np.ndarray):
        """(point indices per refinement level, coarse parents) of a crop's grid; a grid that is not
        a regular ``n x n`` lattice gets one level in its own order and no parents."""
        side = int(round(np.sqrt(len(grid))))
        if side < 1 or side * side != len(grid) or not np.allclose(grid, point_grid(side)):
            return [np.arange(len(grid))], None
        return _lattice(side)

    def _covered(self, coverage: np.ndarray, points: np.ndarray, crop_size: Sequence[int]) -> np.ndarray:
        coords = apply_coords(points, crop_size, self.engine.img_size)
        lr = coverage.shape[0] / self.engine.img_size
        ix = np.clip((coords[:, 0] * lr).astype(np.int64), 0, coverage.shape[1] - 1)
        iy = np.clip((coords[:, 1] * lr).astype(np.int64), 0, coverage.shape[0] - 1)
        return coverage[iy, ix]

    @staticmethod
    def _apply_scorer(scored: ScoredMasks, sel: np.ndarray, fields: Dict[str, np.ndarray]):
        keep = np.asarray(scored.keep, dtype=bool)
        if keep.shape != sel.shape:
            raise ValueError(f"a scorer returned keep of shape {keep.shape} for {len(sel)} masks")
        fields = {k: v[keep] for k, v in fields.items()}
        fields.update({k: np.asarray(v)[keep] for k, v in scored.fields.items()})
        return sel[keep], fields

    def _process_batch(self, points: np.ndarray, crop_size: Sequence[int], input_size: Sequence[int],
                       crop_box: List[int], orig: Sequence[int], task: int = 0):
        cfg = self.config
        engine = self.engine
        orig_h, orig_w = orig
        # step: prompt encoder + transformer (+ semantic head) for every prompt
        t = time.perf_counter()
        coords = apply_coords(points, crop_size, engine.img_size)
        # engines without task prompts (old bundles, custom engines) take no task argument
        out: PromptOutputs = engine.run_prompts(coords, task=task) if task else engine.run_prompts(coords)
        n_prompts, n_out = out.iou_preds.shape
        self.stats["masks_decoded"] += n_prompts * n_out
        iou = np.asarray(out.iou_preds, np.float32).reshape(-1)
        prompt_idx = np.repeat(np.arange(n_prompts), n_out)
        mask_idx = np.tile(np.arange(n_out), n_prompts)
        # step: early filter on predicted IoU, then the heads, before any upscaling
        sel = np.nonzero(iou > cfg.pred_iou_thresh)[0] if cfg.pred_iou_thresh > 0.0 else np.arange(len(iou))
        fields: Dict[str, np.ndarray] = {}
        if self.class_scorer is not None and out.class_logits is not None and len(sel):
            logits = out.class_logits[prompt_idx[sel], mask_idx[sel]]
            sel, fields = self._apply_scorer(self.class_scorer(logits, iou[sel]), sel, fields)
        if self.mask_scorer is not None and len(sel):
            tokens = out.mask_tokens[prompt_idx[sel], mask_idx[sel]]
            sel, fields = self._apply_scorer(self.mask_scorer(tokens, iou[sel]), sel, fields)
        # step: upscaling + hypernetworks for the survivors only
        low_res = engine.upscale(out, prompt_idx[sel], mask_idx[sel])
        self.stats["masks_upscaled"] += int(len(sel))
        self.timings["decoder"] += time.perf_counter() - t

        # step: fused post-processing at crop resolution, RLE placed in the full image
        t = time.perf_counter()
        res = postprocess_masks(
            low_res,
            input_size=input_size,
            original_size=crop_size,
            img_size=engine.img_size,
            mask_threshold=engine.mask_threshold,
            stability_score_offset=cfg.stability_score_offset,
            canvas_size=(orig_h, orig_w),
            offset=(crop_box[0], crop_box[1]),
            device=cfg.device,
        )
        iou_sel = iou[sel]
        pts = points[prompt_idx[sel]]
        keep = np.ones(len(res), dtype=bool)
        if cfg.stability_score_thresh > 0.0:
            keep &= res.stability_score >= cfg.stability_score_thresh
        keep &= ~near_crop_edge(res.boxes, crop_box, [0, 0, orig_w, orig_h])
        confident = None
        if cfg.adaptive:
            confident = keep & (iou_sel >= cfg.adaptive_iou_thresh) & (res.stability_score >= cfg.adaptive_stability_thresh)
        idx = np.nonzero(keep)[0]
        part = MaskSet(
            res.rles.select(idx), res.boxes[idx], iou_sel[idx], pts[idx], res.stability_score[idx],
            np.zeros((len(idx), 4), np.int64), {k: v[idx] for k, v in fields.items()},
        )
        self.timings["postprocess"] += time.perf_counter() - t
        return part, low_res, confident, iou.reshape(n_prompts, n_out).max(1)

    def _remove_small_regions(self, data: MaskSet, min_area: int, nms_thresh: float) -> MaskSet:
        masks = rle_decode(data.rles).astype(bool)
        scores = np.zeros(len(data), np.float32)
        for i in range(len(masks)):
            m, changed_holes = remove_small_regions(masks[i], min_area, "holes")
            m, changed_islands = remove_small_regions(m, min_area, "islands")
            masks[i] = m
            scores[i] = 0.0 if (changed_holes or changed_islands) else 1.0
        boxes = masks_to_boxes(masks)
        keep = nms(boxes.astype(np.float32), scores, nms_thresh, device=self.config.device)
        changed = keep[scores[keep] == 0.0]
        if len(changed):
            data.boxes = data.boxes.copy()
            data.boxes[changed] = boxes[changed]
            new_rles = rle_encode(masks[changed])
            changed_at = {int(c): j for j, c in enumerate(changed)}
            data.rles = RleBatch.pack(
                [new_rles.counts_of(changed_at[i]) if i in changed_at else data.rles.counts_of(i) for i in range(len(data))],
                data.rles.size,
            )
        return data.select(keep)

    def to_records(self, data: MaskSet) -> List[Dict[str, Any]]:
        """Formats masks as segment-anything's generator records (``output_mode`` decides ``segmentation``)."""
        mode = self.config.output_mode
        if mode == "coco_rle":
            segs = data.rles.to_dicts(compressed=True)
        elif mode == "uncompressed_rle":
            segs = data.rles.to_dicts(compressed=False)
        else:
            segs = list(rle_decode(data.rles).astype(bool)) if len(data) else []
        areas = rle_area(data.rles) if len(data) else np.zeros(0, np.int64)
        records = []
        for i in range(len(data)):
            b = data.boxes[i]
            c = data.crop_boxes[i]
            rec = {
                "segmentation": segs[i],
                "area": int(areas[i]),
                "bbox": [int(b[0]), int(b[1]), int(b[2] - b[0]), int(b[3] - b[1])],
                "predicted_iou": float(data.iou_preds[i]),
                "point_coords": [data.points[i].tolist()],
                "stability_score": float(data.stability_score[i]),
                "crop_box": [int(c[0]), int(c[1]), int(c[2] - c[0]), int(c[3] - c[1])],
            }
            for k, v in data.fields.items():
                rec[k] = v[i].item() if hasattr(v[i], "item") else v[i]
            records.append(rec)
        return records



@functools.lru_cache(maxsize=16)
def _lattice(side: int):
    """Refinement levels and coarse parents of the ``side x side`` grid (built once per side, read-only)."""
    level = adaptive_levels(side)
    levels = [np.nonzero(level == lv)[0] for lv in range(3)]
    parents = coarse_parents(side)
    for a in (*levels, parents):
        a.setflags(write=False)
    return levels, parents


def _promising(parents: np.ndarray, promise: np.ndarray, floor: float) -> np.ndarray:
    """Which points to prompt, from their coarse parents (``[K, 4]``, see ``coarse_parents``): those
    without parents (the coarsest level), those with a parent beyond the grid's border (the coarse
    lattice says nothing there), and those with a decoded parent whose best predicted IoU reached
    ``floor`` or that lay inside a confident mask."""
    valid = parents >= 0
    best = np.where(valid, promise[np.where(valid, parents, 0)], -np.inf)
    return (parents == NO_PARENT).all(1) | (parents == OUTSIDE).any(1) | (best >= floor).any(1)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """XYXY boxes (inclusive max) of binary masks [N, H, W]; zeros for empty masks (``batched_mask_to_box``)."""
    n = len(masks)
    out = np.zeros((n, 4), np.int64)
    for i in range(n):
        ys = np.nonzero(masks[i].any(1))[0]
        xs = np.nonzero(masks[i].any(0))[0]
        if len(xs):
            out[i] = [xs[0], ys[0], xs[-1], ys[-1]]
    return out
