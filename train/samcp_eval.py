"""Evaluation of SAM-CP heads on held-out shapes-world scenes: PQ / SQ / RQ, mask AP, semantic mIoU.

Every head is scored on the same patches: segment-everything runs once per scene, through the
patch cache (:class:`~samantic.train.samcp_cache.PatchCache`), so side-by-side rows (a head and
its ablations) differ only in the head.

* v2 (panoptic) scenes: PQ, SQ, RQ for things, stuff and all (:class:`PanopticQuality`,
  panopticapi's definition, checked against torchmetrics in the tests); mask AP and AP50 of
  the things through pycocotools ``COCOeval(iouType="segm")`` on the unfused thing candidates;
  semantic mIoU over things and stuff from the fused map.
* v1 scenes by class name (things only, the seven v1 classes): semantic mIoU and mask AP50.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from samantic.train.metrics import TRAIN_SEED_START

__all__ = ["OracleSamcpScorer", "SamcpEvalResult", "evaluate_samcp", "coco_mask_ap"]


@dataclass
class SamcpEvalResult:
    """Scores of one head on one scene kind."""

    kind: str                       # "v2" or "v1"
    names: Sequence[str]
    pq: Dict[str, Any] = field(default_factory=dict)       # PanopticQuality.compute() (v2)
    pq_interval: Dict[str, Any] = field(default_factory=dict)  # PanopticQuality.bootstrap(): 95% over scenes (v2)
    semantic: Dict[str, Any] = field(default_factory=dict)  # SemanticConfusion.compute()
    ap: float = float("nan")
    ap50: float = float("nan")
    ap50_per_class: Dict[str, float] = field(default_factory=dict)
    scenes: int = 0
    patches_per_image: float = 0.0
    head_seconds_per_image: float = 0.0
    seconds: float = 0.0

    @property
    def miou(self) -> float:
        return float(self.semantic.get("miou", float("nan")))

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names), "pq": self.pq, "pq_interval_95": self.pq_interval,
                "semantic": self.semantic,
                "ap": self.ap, "ap50": self.ap50, "ap50_per_class": self.ap50_per_class, "scenes": self.scenes,
                "patches_per_image": self.patches_per_image, "head_seconds_per_image": self.head_seconds_per_image,
                "seconds": self.seconds}


def coco_mask_ap(images: List[dict], gt_anns: List[dict], dt_anns: List[dict], categories: List[dict]):
    """(AP@[.5:.95], AP50, AP50 per category name) from pycocotools ``COCOeval(iouType="segm")``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    per: Dict[str, float] = {c["name"]: float("nan") for c in categories}
    if not gt_anns:
        return float("nan"), float("nan"), per
    if not dt_anns:
        present = {a["category_id"] for a in gt_anns}
        return 0.0, 0.0, {c["name"]: (0.0 if c["id"] in present else float("nan")) for c in categories}
    gt = COCO()
    gt.dataset = {"images": images, "annotations": gt_anns, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        dt = gt.loadRes([dict(d, id=i + 1) for i, d in enumerate(dt_anns)])
        ev = COCOeval(gt, dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, recall, category, area all, maxDets 100
    names = {c["id"]: c["name"] for c in categories}
    for ci, cat in enumerate(ev.params.catIds):
        p = prec[:, ci]
        per[names[cat]] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    return float(ev.stats[0]), float(ev.stats[1]), per


class OracleSamcpScorer:
    """A perfect SAM-CP head: scores that are the training targets, read from the patch cache.

    Each thing patch's Type-II query selects exactly the patches that are members of its segment
    (``samantic.train.samcp.assign_patches``: at least ``pos_thresh`` of the patch's mask and box
    inside it, or the segment's fallback patch) with its class at probability 1; each stuff
    class selects the members of its regions, present with probability 1. Run through
    :class:`~samantic.pipeline.panoptic.SamcpPredictor` (merge, NMS, fusion) and
    :func:`evaluate_samcp`, it gives the scores a head that learned its targets perfectly would
    get on these patches: the ceiling the patches set, beside the heads' rows.

    Args:
        cache: the :class:`~samantic.train.samcp_cache.PatchCache` the patches come from (the
            entries hold the overlaps with the ground truth; :func:`evaluate_samcp` writes them
            before it asks for scores).
        categories: the dataset categories (``id``, ``name``, ``isthing``) the cached segments'
            category ids refer to: v2's for panoptic scenes, v1's classes for v1 scenes.
    """

    backend = "oracle"
    head = None
    inference = None
    model = ""

    def __init__(self, cache: Any, categories: Sequence[dict], pos_thresh: float = 0.8, neg_thresh: float = 0.5) -> None:
        things = [c for c in categories if c.get("isthing", 1)]
        stuff = [c for c in categories if not c.get("isthing", 1)]
        self.cache = cache
        self.names = tuple(c["name"] for c in things + stuff)
        self.things = len(things)
        self._index = {int(c["id"]): i for i, c in enumerate(things + stuff)}
        self.pos_thresh, self.neg_thresh = float(pos_thresh), float(neg_thresh)
        self.timings: Dict[str, float] = {}

    def patch_options(self) -> Dict[str, Any]:
        return {}

    def check_classes(self, names: Sequence[str]):
        from samantic.pipeline.panoptic import check_names

        return check_names(self.names, names, "the oracle")

    def scores(self, image: np.ndarray, patch_rles: Any, patch_boxes: np.ndarray):
        """(affinity ``[C + P, P]``, class probabilities ``[P, C]``, presence ``[C]``), all 0 or 1."""
        from samantic.train.samcp import assign_patches

        entry = self.cache.get(image)
        if entry is None:
            raise ValueError("oracle: this image has no entry in the patch cache (evaluate_samcp writes it first)")
        p, c = len(entry), len(self.names)
        if len(patch_rles) != p:
            raise ValueError(f"oracle: {len(patch_rles)} patches given, the cache entry has {p}")
        aff = np.zeros((c + p, p), np.float32)
        cls = np.zeros((p, c), np.float32)
        presence = np.zeros(c, np.float32)
        if p and len(entry.gt_categories):
            member = assign_patches(entry.iop, entry.box_iop, entry.iou, self.pos_thresh, self.neg_thresh) == 1
            for g, cat in enumerate(entry.gt_categories):
                k = self._index.get(int(cat))
                rows = member[:, g]
                if k is None or not rows.any():
                    continue
                if k < self.things:
                    for q in np.flatnonzero(rows):
                        aff[c + q] = rows
                        cls[q, k] = 1.0
                else:
                    aff[k] = np.maximum(aff[k], rows)
                    presence[k] = 1.0
        return aff, cls, presence


def _gt_v1(seed: int):
    from samantic.train.data.shapes import render_scene
    from samantic.train.samcp_cache import V1_STREAM_PREFIX, GroundTruth, PanopticSample

    scene = render_scene(seed)
    gt = GroundTruth.from_scene(scene, np.asarray(scene.labels) + 1)  # v1's category ids
    return scene, PanopticSample(f"{V1_STREAM_PREFIX}{seed}", scene.image, gt, stuff_annotated=False)


def evaluate_samcp(predictor, model, seeds: Iterable[int], cache_dir, *, kind: str = "v2", points_per_side: int = 32,
                   pred_iou_thresh: Optional[float] = None, stability_score_thresh: Optional[float] = None,
                   progress: bool = True, training_seeds: bool = False) -> SamcpEvalResult:
    """Scores a :class:`~samantic.pipeline.panoptic.SamcpPredictor` on held-out scenes.

    Args:
        predictor: the head and its inference settings (for ``kind="v1"`` give one whose
            ``classes`` are the v1 names it should segment).
        model: the SAM whose patches the head labels (patches come from the cache in ``cache_dir``).
        seeds: held-out scene seeds (below the training range).
        kind: ``"v2"`` (panoptic scenes, every metric) or ``"v1"`` (v1 scenes, things by class name).
        points_per_side, pred_iou_thresh, stability_score_thresh: the patches (as the head was trained).
        training_seeds: allow seeds of the training range (to measure how much a head memorised its
            training scenes, beside held-out ones); never for a reported accuracy.
    """
    from samantic.ops import rle_encode
    from samantic.train.data.panoptic import CATEGORIES, render_panoptic
    from samantic.train.data.shapes import CLASSES
    from samantic.train.metrics import _progress
    from samantic.train.panoptic_metrics import PanopticQuality, SemanticConfusion
    from samantic.train.samcp_cache import STREAM_PREFIX, GroundTruth, PanopticSample, PatchCache

    if kind not in ("v1", "v2"):
        raise ValueError(f"kind must be 'v1' or 'v2', got {kind!r}")
    seeds = list(seeds)
    for s in seeds:
        if s >= TRAIN_SEED_START and not training_seeds:
            raise ValueError(f"seed {s} is a training seed (>= {TRAIN_SEED_START}); evaluate on held-out seeds")
    cache = PatchCache(cache_dir, model, points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                       stability_score_thresh=stability_score_thresh)
    # the dataset's categories; a predicted name maps onto them (the head's vocabulary may be ordered otherwise)
    if kind == "v2":
        categories = [dict(c) for c in CATEGORIES]
    else:
        categories = [{"id": i + 1, "name": n, "isthing": 1} for i, n in enumerate(CLASSES)]
    cat_of = {c["name"]: int(c["id"]) for c in categories}
    unknown = [n for n in predictor.names if n not in cat_of and kind == "v2"]
    if unknown:
        raise ValueError(f"the head's classes {unknown} are not shapes-world v2 categories")
    lut = np.zeros(len(predictor.names) + 1, np.int64)
    for i, n in enumerate(predictor.names):
        lut[i + 1] = cat_of.get(n, 0)
    pq = PanopticQuality(categories) if kind == "v2" else None
    sem = SemanticConfusion(max(cat_of.values()), [c["name"] for c in sorted(categories, key=lambda c: c["id"])])
    things = [c for c in categories if c.get("isthing", 1)]
    things_ids = {int(c["id"]) for c in things}
    images, gt_anns, dt_anns = [], [], []
    n_patches, head_s = 0, 0.0
    t0 = time.perf_counter()
    with _progress(progress, len(seeds)) as advance:
        for k, seed in enumerate(seeds):
            if kind == "v2":
                scene = render_panoptic(seed)  # rendered once: the image, its cache key and the GT
                gt = GroundTruth.from_panoptic(scene.panoptic, scene.segments, things_ids)
                sample = PanopticSample(f"{STREAM_PREFIX}{seed}", scene.image, gt)
                gt_map = scene.panoptic
                gt_segments = [{"id": int(i), "category_id": int(c)} for i, c in scene.segments]
                seg_cat = dict((int(i), int(c)) for i, c in scene.segments)
                gt_sem = np.zeros(gt_map.shape, np.int64)
                for i, c in seg_cat.items():
                    gt_sem[gt_map == i] = c
                inst_masks, inst_cats = scene.masks, np.asarray(scene.labels) + 1
            else:
                scene, sample = _gt_v1(seed)
                gt_sem = np.asarray(scene.semantic, np.int64)
                inst_masks, inst_cats = scene.masks, np.asarray(scene.labels) + 1
            entry = cache.get(sample.image)
            if entry is None:
                entry = cache.compute(sample)
            n_patches += len(entry)
            t = time.perf_counter()
            out = predictor(sample.image, entry.patch_batch(), entry.patch_boxes)
            head_s += time.perf_counter() - t
            # panoptic and semantic, with dataset category ids
            pred_sem = lut[out.semantic.astype(np.int64)]
            sem.update(pred_sem, gt_sem)
            if pq is not None:
                segs = [{"id": s["id"], "category_id": int(lut[s["category_id"]])} for s in out.segments_info]
                pq.update(out.panoptic, segs, gt_map, gt_segments)
            # instances (things) for COCO AP
            image_id = k + 1
            h, w = sample.image.shape[:2]
            images.append({"id": image_id, "width": w, "height": h})
            if len(inst_cats):
                rles = rle_encode(np.asarray(inst_masks, bool)).to_dicts(compressed=True)
                from pycocotools import mask as mask_utils

                for rle, cat in zip(rles, inst_cats):
                    area = float(mask_utils.area(rle))
                    if area <= 0:
                        continue
                    gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id, "category_id": int(cat),
                                    "segmentation": rle, "area": area, "iscrowd": 0,
                                    "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
            for d in out.instances:
                cat = int(lut[d["category_id"]])
                if cat:
                    dt_anns.append({"image_id": image_id, "category_id": cat, "segmentation": d["segmentation"],
                                    "score": d["score"]})
            advance()
    ap, ap50, per = coco_mask_ap(images, gt_anns, dt_anns, [{"id": c["id"], "name": c["name"]} for c in things])
    n = max(len(seeds), 1)
    interval = {k: list(v) for k, v in pq.bootstrap().items()} if pq is not None and seeds else {}
    return SamcpEvalResult(kind, tuple(predictor.names), pq.compute() if pq is not None else {}, interval,
                           sem.compute(), ap, ap50, per, len(seeds), n_patches / n, head_s / n,
                           time.perf_counter() - t0)
