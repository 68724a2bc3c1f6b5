"""Panoptic quality (COCO / panopticapi definition) and semantic mIoU, accumulated over images.

:class:`PanopticQuality` follows panopticapi's ``pq_compute`` rule for rule:

* a predicted and a ground-truth segment match when they have the same category
  and IoU > 0.5, where the union leaves out the predicted segment's pixels that
  fall on ground-truth void (id 0); IoU exactly 0.5 is no match;
* crowd ground truth (``iscrowd == 1``) is never matched and never a false negative;
* an unmatched predicted segment is a false positive unless more than half of it
  lies on ground-truth void plus the crowd region of its own category;
* every unmatched non-crowd ground-truth segment is a false negative, whatever the
  prediction put there (void included);
* PQ, SQ and RQ are averaged over the categories with ``tp + fp + fn > 0``.

Areas come from the arrays (panopticapi reads the predicted areas from the PNG and
the ground-truth areas from its JSON, which agree for well-formed ground truth).
Where panopticapi keeps only the last crowd segment of a category, the crowd
region here is the union of them all; COCO panoptic has at most one per category
and image, where both agree. ``tests/test_panoptic_metrics.py`` records how
torchmetrics' ``PanopticQuality`` differs (stuff instances, void in predictions).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["PanopticQuality", "SemanticConfusion"]

MATCH_IOU = 0.5  # a match needs IoU strictly above this
IGNORE_FRACTION = 0.5  # an unmatched prediction more than this much on void / crowd is no false positive


def _id_map(name: str, panoptic: Any) -> np.ndarray:
    arr = np.asarray(panoptic)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be an [H, W] array of segment ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer segment ids, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} holds a negative segment id ({int(arr.min())}); ids are >= 0, 0 = void")
    return arr.astype(np.int64, copy=False)


def _segment_table(name: str, segments: Sequence[Mapping[str, Any]], known: Mapping[int, int]) -> Dict[int, dict]:
    table: Dict[int, dict] = {}
    for i, seg in enumerate(segments):
        if "id" not in seg or "category_id" not in seg:
            raise ValueError(f"{name}[{i}] needs 'id' and 'category_id', got keys {sorted(seg)}")
        sid, cat = int(seg["id"]), int(seg["category_id"])
        if sid <= 0:
            raise ValueError(f"{name}[{i}] has id {sid}; segment ids are positive (0 is void)")
        if sid in table:
            raise ValueError(f"{name} lists segment id {sid} twice")
        if cat not in known:
            raise ValueError(f"{name}[{i}] (id {sid}) has unknown category_id {cat}; known: {sorted(known)}")
        table[sid] = {"category": known[cat], "iscrowd": int(seg.get("iscrowd", 0))}
    return table


def _pq_sq_rq(iou_sum: np.ndarray, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-category PQ, SQ, RQ from the summed IoUs and counts (any leading batch dimensions)."""
    tp = np.asarray(tp, np.float64)
    denom = tp + 0.5 * np.asarray(fp, np.float64) + 0.5 * np.asarray(fn, np.float64)
    sq = np.where(tp > 0, iou_sum / np.maximum(tp, 1), 0.0)
    rq = np.where(denom > 0, tp / np.where(denom > 0, denom, 1), 0.0)
    return sq * rq, sq, rq


class PanopticQuality:
    """COCO panoptic quality (PQ = SQ x RQ) over a stream of images, as panopticapi computes it.

    Example::

        pq = PanopticQuality(CATEGORIES)
        for pred, pred_segments, gt, gt_segments in results:
            pq.update(pred, pred_segments, gt, gt_segments)
        pq.compute()["all"]["pq"]

    Args:
        categories: COCO panoptic categories: dicts with ``id``, ``name`` and ``isthing``.
    """

    def __init__(self, categories: Sequence[Mapping[str, Any]]) -> None:
        cats = list(categories)
        if not cats:
            raise ValueError("categories must not be empty")
        for i, c in enumerate(cats):
            missing = [k for k in ("id", "name", "isthing") if k not in c]
            if missing:
                raise ValueError(f"categories[{i}] lacks {missing}; each needs 'id', 'name' and 'isthing'")
        ids = [int(c["id"]) for c in cats]
        names = [str(c["name"]) for c in cats]
        for what, values in (("id", ids), ("name", names)):
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"category {what}s must be unique, repeated: {dup}")
        self.categories: Tuple[dict, ...] = tuple(dict(c) for c in cats)
        self._index = {cid: k for k, cid in enumerate(ids)}
        self._names = names
        self._isthing = np.array([bool(c["isthing"]) for c in cats])
        self.reset()

    def reset(self) -> None:
        """Forgets every image seen so far."""
        n = len(self._names)
        # per category, in the order of `categories`: IoU summed over true positives, and the counts
        self.iou_sum = np.zeros(n, np.float64)
        self.tp = np.zeros(n, np.int64)
        self.fp = np.zeros(n, np.int64)
        self.fn = np.zeros(n, np.int64)
        # the errors broken down (not part of PQ): pairs of segments overlapping at IoU > 0.5 whatever
        # their categories, rows ground truth, columns prediction (the diagonal is ``tp``); an unmatched
        # ground-truth segment without such a pair is ``missed``, an unmatched (counted) prediction
        # without one is ``spurious``
        self.confusion = np.zeros((n, n), np.int64)
        self.missed = np.zeros(n, np.int64)
        self.spurious = np.zeros(n, np.int64)
        self.images = 0
        self._scenes: List[np.ndarray] = []  # per image: [4, C] its iou_sum, tp, fp, fn (for bootstrap)

    def update(
        self,
        pred_panoptic: np.ndarray,
        pred_segments: Sequence[Mapping[str, Any]],
        gt_panoptic: np.ndarray,
        gt_segments: Sequence[Mapping[str, Any]],
    ) -> None:
        """Adds one image.

        Args:
            pred_panoptic: int ``[H, W]`` predicted segment ids, 0 = void (no prediction).
            pred_segments: One dict per predicted segment with ``id`` and ``category_id``
                (other keys, ``iscrowd`` included, are ignored). Every listed segment must
                have pixels, as panopticapi requires.
            gt_panoptic: int ``[H, W]`` ground-truth segment ids, 0 = void (unlabelled).
            gt_segments: One dict per ground-truth segment with ``id``, ``category_id`` and
                optionally ``iscrowd`` (default 0).

        Raises:
            ValueError: on shapes that differ or are not ``[H, W]``, non-integer or negative
                ids, an id in an array missing from its segments (or listed twice, or listed
                without pixels), an unknown ``category_id``.
        """
        pred = _id_map("pred_panoptic", pred_panoptic)
        gt = _id_map("gt_panoptic", gt_panoptic)
        if pred.shape != gt.shape:
            raise ValueError(f"pred_panoptic {pred.shape} and gt_panoptic {gt.shape} must have the same shape")
        pred_table = _segment_table("pred_segments", pred_segments, self._index)
        gt_table = _segment_table("gt_segments", gt_segments, self._index)

        # step: areas of every pred segment, gt segment and (pred, gt) intersection, void included as id 0
        pred_ids, pred_inv = np.unique(pred, return_inverse=True)
        gt_ids, gt_inv = np.unique(gt, return_inverse=True)
        for name, ids, table in (("pred", pred_ids, pred_table), ("gt", gt_ids, gt_table)):
            unlisted = [int(i) for i in ids if i != 0 and int(i) not in table]
            if unlisted:
                raise ValueError(f"{name}_panoptic holds segment ids {unlisted[:10]} missing from {name}_segments")
        for name, ids, table in (("pred", pred_ids, pred_table), ("gt", gt_ids, gt_table)):
            absent = sorted(set(table) - set(ids.tolist()))
            if absent:
                raise ValueError(f"{name}_segments lists ids {absent[:10]} that have no pixels in {name}_panoptic")
        before = np.stack([self.iou_sum, self.tp, self.fp, self.fn]).astype(np.float64)
        pair = np.bincount(gt_inv.ravel() * len(pred_ids) + pred_inv.ravel(), minlength=len(gt_ids) * len(pred_ids))
        inter = pair.reshape(len(gt_ids), len(pred_ids))
        pred_area = dict(zip(pred_ids.tolist(), inter.sum(0).tolist()))
        gt_area = dict(zip(gt_ids.tolist(), inter.sum(1).tolist()))
        on_gt_void = dict(zip(pred_ids.tolist(), inter[0].tolist())) if gt_ids[0] == 0 else {}
        overlaps = {(int(gt_ids[g]), int(pred_ids[p])): int(inter[g, p]) for g, p in zip(*np.nonzero(inter))}

        # step: matches, same category and IoU > 0.5 (a segment can match at most once at that threshold);
        # pairs above 0.5 of other categories are kept for the error breakdown
        gt_matched, pred_matched = set(), set()
        gt_paired, pred_paired = set(), set()
        for (g, p), intersection in overlaps.items():
            if g == 0 or p == 0 or gt_table[g]["iscrowd"] == 1:
                continue
            cat = gt_table[g]["category"]
            union = pred_area[p] + gt_area[g] - intersection - on_gt_void.get(p, 0)
            iou = intersection / union
            if iou <= MATCH_IOU:
                continue
            self.confusion[cat, pred_table[p]["category"]] += 1
            gt_paired.add(g)
            pred_paired.add(p)
            if cat == pred_table[p]["category"]:
                self.tp[cat] += 1
                self.iou_sum[cat] += iou
                gt_matched.add(g)
                pred_matched.add(p)

        # step: false negatives; crowd regions per category, to excuse predictions on them
        crowd: Dict[int, List[int]] = {}
        for g, info in gt_table.items():
            if info["iscrowd"] == 1:
                crowd.setdefault(info["category"], []).append(g)
            elif g not in gt_matched:
                self.fn[info["category"]] += 1
                if g not in gt_paired:
                    self.missed[info["category"]] += 1

        # step: false positives, unless mostly on void or on the crowd region of their category
        for p, info in pred_table.items():
            if p in pred_matched:
                continue
            ignored = on_gt_void.get(p, 0) + sum(overlaps.get((g, p), 0) for g in crowd.get(info["category"], ()))
            if ignored / pred_area[p] > IGNORE_FRACTION:
                continue
            self.fp[info["category"]] += 1
            if p not in pred_paired:
                self.spurious[info["category"]] += 1
        self._scenes.append(np.stack([self.iou_sum, self.tp, self.fp, self.fn]).astype(np.float64) - before)
        self.images += 1

    def _average(self, chosen: np.ndarray) -> Dict[str, float]:
        used = chosen & (self.tp + self.fp + self.fn > 0)
        n = int(used.sum())
        if n == 0:
            return {"pq": float("nan"), "sq": float("nan"), "rq": float("nan"), "n": 0}
        pq, sq, rq = self._per_class()
        return {"pq": float(pq[used].mean()), "sq": float(sq[used].mean()), "rq": float(rq[used].mean()), "n": n}

    def _per_class(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _pq_sq_rq(self.iou_sum, self.tp, self.fp, self.fn)

    def bootstrap(self, samples: int = 1000, level: float = 0.95, seed: int = 0) -> Dict[str, Tuple[float, float]]:
        """Percentile bootstrap interval of PQ over the images: ``samples`` resamples of the images
        passed to :meth:`update`, drawn with replacement, PQ recomputed on each (as :meth:`compute`).

        Returns:
            ``{"all" | "things" | "stuff": (low, high)}`` at confidence ``level`` (NaN where a
            resample has no category of that kind).

        Raises:
            ValueError: without images, or with ``samples < 1`` or ``level`` outside (0, 1).
        """
        if not self._scenes:
            raise ValueError("bootstrap needs at least one image (call update first)")
        if samples < 1 or not 0.0 < level < 1.0:
            raise ValueError(f"samples must be >= 1 and level in (0, 1), got {samples}, {level}")
        scenes = np.stack(self._scenes)  # [N, 4, C]
        draws = np.random.default_rng(seed).integers(0, len(scenes), size=(samples, len(scenes)))
        totals = scenes[draws].sum(1)  # [samples, 4, C]
        pq, _, _ = _pq_sq_rq(totals[:, 0], totals[:, 1], totals[:, 2], totals[:, 3])
        seen = totals[:, 1:].sum(1) > 0
        out = {}
        for key, chosen in (("all", np.ones_like(self._isthing)), ("things", self._isthing), ("stuff", ~self._isthing)):
            used = seen & chosen[None]
            n = used.sum(1)
            means = np.where(n > 0, (pq * used).sum(1) / np.maximum(n, 1), np.nan)
            if np.isnan(means).all():
                out[key] = (float("nan"), float("nan"))
                continue
            tail = (1.0 - level) / 2 * 100
            lo, hi = np.nanpercentile(means, [tail, 100 - tail])
            out[key] = (float(lo), float(hi))
        return out

    def compute(self) -> Dict[str, Any]:
        """PQ, SQ and RQ over every image passed to :meth:`update`.

        Returns:
            ``{"all" | "things" | "stuff": {"pq", "sq", "rq", "n"}, "per_class": {name: {"pq",
            "sq", "rq", "tp", "fp", "fn", "missed", "misnamed", "spurious"}}, "confusion":
            {"names", "matrix"}}``. Averages run over the ``n`` categories with
            ``tp + fp + fn > 0`` (NaN when ``n == 0``, e.g. no stuff at all); ``per_class``
            lists every category, with zeros for those that never occurred (panopticapi's
            convention). Values are fractions in [0, 1], not percentages.

            The error breakdown: of a class's ``fn``, ``misnamed`` ground-truth segments were
            covered at IoU > 0.5 by a prediction of another class and ``missed`` ones by none;
            of its ``fp``, ``spurious`` predictions overlap no ground-truth segment at IoU > 0.5
            (the rest name another class's segment). ``confusion["matrix"][i][j]`` counts the
            ground-truth segments of class ``names[i]`` covered at IoU > 0.5 by a prediction of
            class ``names[j]`` (the diagonal is ``tp``).
        """
        pq, sq, rq = self._per_class()
        per_class = {
            name: {"pq": float(pq[k]), "sq": float(sq[k]), "rq": float(rq[k]),
                   "tp": int(self.tp[k]), "fp": int(self.fp[k]), "fn": int(self.fn[k]),
                   "missed": int(self.missed[k]), "misnamed": int(self.fn[k] - self.missed[k]),
                   "spurious": int(self.spurious[k])}
            for k, name in enumerate(self._names)
        }
        everything = np.ones_like(self._isthing)
        return {
            "all": self._average(everything),
            "things": self._average(self._isthing),
            "stuff": self._average(~self._isthing),
            "per_class": per_class,
            "confusion": {"names": list(self._names), "matrix": self.confusion.tolist()},
        }


class SemanticConfusion:
    """Pixel confusion matrix and per-class IoU for semantic label maps, over a stream of images.

    Labels are ``1..num_classes``; 0 is unlabelled. Pixels whose ground truth is 0 are
    ignored; a prediction of 0 on a labelled pixel counts as a miss for its class.
    Unlike :func:`samantic.train.metrics.evaluate_usam`, predictions on unlabelled pixels
    enlarge no union.

    Args:
        num_classes: Number of classes (labels ``1..num_classes``).
        names: Optional class names, ``names[k - 1]`` for label ``k`` (default: the labels).
    """

    def __init__(self, num_classes: int, names: Optional[Sequence[str]] = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if names is not None and len(names) != num_classes:
            raise ValueError(f"names must have num_classes={num_classes} entries, got {len(names)}")
        self.num_classes = int(num_classes)
        self.names: Tuple[Any, ...] = tuple(names) if names is not None else tuple(range(1, num_classes + 1))
        self.reset()

    def reset(self) -> None:
        """Forgets every image seen so far."""
        # rows: ground truth 0..C, columns: prediction 0..C; row 0 stays empty (ignored pixels)
        self.matrix = np.zeros((self.num_classes + 1, self.num_classes + 1), np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Adds one image.

        Args:
            pred: int ``[H, W]`` predicted labels in ``0..num_classes``.
            gt: int ``[H, W]`` ground-truth labels in ``0..num_classes`` (0 = ignored).
        """
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.ndim != 2 or pred.shape != gt.shape:
            raise ValueError(f"pred and gt must be [H, W] arrays of one shape, got {pred.shape} and {gt.shape}")
        for name, arr in (("pred", pred), ("gt", gt)):
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
            if arr.size and (arr.min() < 0 or arr.max() > self.num_classes):
                bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
                raise ValueError(f"{name} holds label {bad}, outside 0..num_classes={self.num_classes}")
        keep = gt != 0
        n = self.num_classes + 1
        flat = gt[keep].astype(np.int64) * n + pred[keep].astype(np.int64)
        self.matrix += np.bincount(flat, minlength=n * n).reshape(n, n)

    def compute(self) -> Dict[str, Any]:
        """mIoU over the classes present in the ground truth or the (counted) prediction.

        Returns:
            ``{"miou", "pixel_accuracy", "per_class": {name: iou}, "matrix"}``; ``per_class``
            holds the present classes only. NaN when nothing was counted. ``matrix[i][j]`` is
            the number of pixels of ground-truth label ``i + 1`` predicted as label ``j``
            (column 0: unlabelled).
        """
        m = self.matrix
        inter = np.diag(m)[1:]
        union = m[1:, :].sum(1) + m[1:, 1:].sum(0) - inter
        present = union > 0
        iou = inter / np.where(present, union, 1)
        per_class = {self.names[k]: float(iou[k]) for k in np.flatnonzero(present)}
        total = int(m[1:].sum())
        return {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "pixel_accuracy": float(inter.sum() / total) if total else float("nan"),
            "per_class": per_class,
            "matrix": m[1:].tolist(),
        }
