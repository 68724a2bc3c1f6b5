"""SAM-CP inference: SAM's patches -> named instances, stuff regions, a panoptic and a semantic map.

Data flow (one image)::

    patches (RLEs + XYXY boxes from segment-everything)
        -> SamcpHead: affinities [C + P, P] and class scores of the last decoder layer
        -> candidates: Type-II queries (one per patch) scored by their best thing class, the
           top-k kept; Type-I queries of the stuff classes scored by presence
        -> each candidate's patches: its affinities (sigmoid) divided by their maximum, at least
           ``affinity_thresh``; score = class score x mean affinity of the chosen patches
        -> samantic.ops.merge_patches: the union of each candidate's patch RLEs (area, box);
           thing candidates of one class overlapping a better one (mask IoU > nms_thresh) dropped
        -> panoptic fusion: per pixel the highest-scoring candidate wins; a candidate that keeps
           less than ``overlap_thresh`` of its mask is dropped (its pixels go to the next one)
        -> panoptic map + segments_info, semantic map (same pass), instance list (things, unfused,
           for COCO detection results: each Type-II query under its ``instance_classes`` most likely
           classes, as Mask2Former ranks query-class pairs for instance segmentation)

Category ids are 1-based positions in the head's vocabulary (``classes + stuff``), 0 = unlabelled;
for the shapes world v2 they are its COCO category ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["INFERENCE_DEFAULTS", "PanopticOutput", "SamcpPredictor", "inference_options", "TorchSamcpScorer", "check_names", "flip_patches", "panoptic_fusion", "patch_options"]


@dataclass
class PanopticOutput:
    """What :class:`SamcpPredictor` gives for one image.

    Attributes:
        panoptic: int32 ``[H, W]`` segment id per pixel (0: unlabelled).
        segments_info: per segment ``id``, ``category_id``, ``category_name``, ``isthing``,
            ``score``, ``area``, ``bbox`` (XYWH), ``patches`` (indices of the patches it merged).
        semantic: uint8 ``[H, W]`` category id per pixel (0: unlabelled).
        instances: thing candidates before fusion, best first (``category_id``,
            ``category_name``, ``score``, ``segmentation`` (compressed COCO RLE), ``area``, ``bbox`` XYWH).
        names: the vocabulary (``category_id`` ``k`` is ``names[k - 1]``).
        things: how many of ``names`` are thing classes (the first ones).
    """

    panoptic: np.ndarray
    segments_info: List[Dict[str, Any]]
    semantic: np.ndarray
    instances: List[Dict[str, Any]]
    names: Tuple[str, ...]
    things: int
    timings: Dict[str, float] = field(default_factory=dict)


def panoptic_fusion(masks: np.ndarray, scores: np.ndarray, overlap_thresh: float = 0.5, min_area: int = 0
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Per pixel the highest-scoring mask wins; masks left with less than ``overlap_thresh`` of their
    area (or under ``min_area`` pixels) are dropped and their pixels go to the others.

    Args:
        masks: bool ``[N, H, W]``.
        scores: ``[N]``.

    Returns:
        (int32 ``[H, W]`` map of mask index + 1 (0: no mask), bool ``[N]`` kept).
    """
    masks = np.asarray(masks, bool)
    n = masks.shape[0]
    kept = np.ones(n, bool)
    areas = masks.sum(axis=(1, 2)) if masks.ndim == 3 else np.zeros(0, np.int64)
    kept &= areas > max(min_area, 0)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    while True:
        out = np.zeros(masks.shape[1:], np.int32)
        dropped = False
        for i in order:
            if not kept[i]:
                continue
            free = masks[i] & (out == 0)
            got = int(free.sum())
            if got < overlap_thresh * areas[i] or got <= min_area:
                kept[i] = False
                dropped = True
                break  # re-run: the dropped mask's pixels may go to a lower-scoring one
            out[free] = i + 1
        if not dropped:
            return out, kept


INFERENCE_DEFAULTS: Dict[str, Any] = {"score_thresh": 0.3, "affinity_thresh": 0.5, "overlap_thresh": 0.5, "top_k": 100,
                                      "min_area": 16, "instance_thresh": 0.05, "nms_thresh": 0.5, "flip": False,
                                      "instance_classes": 10}
INFERENCE_KEY = "inference"  # head-file header entry / manifest field of tuned inference options


def parse_inference(raw: Any) -> Dict[str, Any]:
    """Inference options from a header string (JSON) or a dict; unknown keys and bad JSON are ignored."""
    import json

    if not raw:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    if not isinstance(raw, dict):
        return {}
    return {k: raw[k] for k in INFERENCE_DEFAULTS if k in raw}


def inference_options(scorer: Any) -> Dict[str, Any]:
    """The inference options recorded with a scorer's head (torch head file or bundle manifest)."""
    head = getattr(scorer, "head", None)
    if head is not None:
        return parse_inference(head.info.extra.get(INFERENCE_KEY))
    return parse_inference(getattr(scorer, "inference", None))


def patch_options(info: Any) -> Dict[str, Any]:
    """The segment-everything options (grid, thresholds) a SAM-CP head was trained with, from its
    :class:`~samantic.heads.samcp.SamcpInfo` metadata; empty for a head without them."""
    import json

    raw = info.extra.get("patches")
    if not raw:
        return {}
    try:
        got = json.loads(raw)
    except ValueError:
        return {}
    return {k: got[k] for k in ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")
            if k in got}


class TorchSamcpScorer:
    """A SAM-CP head on torch: the affinity and class scores of one image's patches.

    Args:
        head: a :class:`~samantic.heads.samcp.SamcpHead` or a head file.
        device: where the head runs.
    """

    backend = "torch"

    def __init__(self, head: Any, device: str = "cpu") -> None:
        import torch

        from samantic.heads.samcp import SamcpHead, load_samcp

        if not isinstance(head, SamcpHead):
            head = load_samcp(head, map_location=device)
        self.head = head.eval().to(device)
        self.device = torch.device(device)
        self.names = tuple(head.info.names)
        self.things = len(head.info.classes)
        self.model = head.info.model
        self.timings: Dict[str, float] = {}

    def patch_options(self) -> Dict[str, Any]:
        return patch_options(self.head.info)

    def check_classes(self, names: Sequence[str]) -> Tuple[str, ...]:
        return self.head.check_classes(names)

    def scores(self, image: np.ndarray, patch_rles: Any, patch_boxes: np.ndarray):
        """(affinity sigmoid ``[C + P, P]``, class probabilities ``[P, C]``, presence ``[C]``) as numpy."""
        import time

        import torch

        from samantic.heads.samcp import patch_inputs
        from samantic.pipeline.samcp_inputs import head_boxes

        t0 = time.perf_counter()
        rles = _dicts(patch_rles)
        h, w = image.shape[:2]
        head = self.head
        im = torch.from_numpy(np.array(image, np.float32)).permute(2, 0, 1).div_(255.0)[None]
        with torch.inference_mode():  # head.forward, step by step (timed per stage)
            boxes = torch.from_numpy(head_boxes(patch_boxes)).to(self.device)
            images, bx = head.resize_input(im.to(self.device), [boxes])
            feats = head.features(images)
            t1 = time.perf_counter()
            _, roi = patch_inputs(rles, patch_boxes, (h, w), head.info.mask_side)
            tokens, pos, valid = head.encode_patches(feats, bx, [torch.from_numpy(roi).to(self.device)],
                                                     tuple(images.shape[-2:]))
            t2 = time.perf_counter()
            out = head.decode(tokens, pos, valid)
        p = len(rles)
        c = out.num_classes
        aff = out.affinity[-1][0, : c + p, :p].float().sigmoid().cpu().numpy()
        cls = out.class_logits[-1][0, :p, :c].float().sigmoid().cpu().numpy()
        presence = out.presence_logits[-1][0].float().sigmoid().cpu().numpy()
        self.timings = {"backbone": t1 - t0, "patch_encoder": t2 - t1, "decoder": time.perf_counter() - t2}
        return aff, cls, presence


class SamcpWeightsWarning(UserWarning):
    """A SAM-CP head runs on patches of SAM weights other than those it was trained on."""


def check_names(known: Sequence[str], names: Sequence[str], what: str = "this SAM-CP head") -> Tuple[str, ...]:
    """Requested names -> the same tuple; an unknown name raises ``ValueError`` listing the known ones."""
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown class name(s) {bad}; {what} knows: {', '.join(known)}")
    return tuple(names)


class SamcpPredictor:
    """Runs a SAM-CP head on the patches of an image and fuses the result.

    Options left as None take the head's recorded inference options (``samantic samcp tune``
    writes them after a sweep on validation scenes), else :data:`INFERENCE_DEFAULTS`.

    Args:
        head: a scorer (:class:`TorchSamcpScorer`, or the bundle runtime's
            :class:`~samantic.runtime.samcp.OnnxSamcpScorer`), a
            :class:`~samantic.heads.samcp.SamcpHead` or a head file (torch).
        classes: names to keep (None: the whole vocabulary); unknown names raise ``ValueError``.
        score_thresh: minimum segment score (class score x mean affinity).
        affinity_thresh: a candidate takes the patches whose normalised affinity reaches it.
        overlap_thresh: fusion drops segments that keep less than this fraction of their mask.
        top_k: Type-II queries kept by class score before merging.
        min_area: segments smaller than this (pixels, after fusion) are dropped.
        instance_thresh: minimum score of the unfused thing candidates in ``instances``.
        nms_thresh: a thing candidate overlapping a better one of its class at mask IoU above
            this is dropped (1 keeps all).
        flip: test-time augmentation: the head also scores the mirrored image with its mirrored
            patches, and the two outputs (probabilities) are averaged; the head's cost doubles.
        instance_classes: the instance list (COCO detection results) takes each Type-II query's
            this many most likely thing classes, each scored by its own probability (as
            Mask2Former's instance inference ranks query-class pairs): an instance whose best
            class is wrong is still listed, lower, under its second. The panoptic and semantic
            maps use the best class only. Default 10: on validation scenes 100-139 mask AP50 rose
            with it (0.594 at 1, 0.628 at 3, 0.643 at 10 for the shipped head v2; 7, 20 and 44
            listed instances an image, the same 4.6 at score 0.3 and above).
        device: where a torch head runs.
    """

    def __init__(self, head: Any, *, classes: Optional[Sequence[str]] = None, score_thresh: Optional[float] = None,
                 affinity_thresh: Optional[float] = None, overlap_thresh: Optional[float] = None,
                 top_k: Optional[int] = None, min_area: Optional[int] = None, instance_thresh: Optional[float] = None,
                 nms_thresh: Optional[float] = None, flip: Optional[bool] = None,
                 instance_classes: Optional[int] = None, device: str = "cpu") -> None:
        scorer = head if callable(getattr(head, "scores", None)) else TorchSamcpScorer(head, device)
        self.scorer = scorer
        # defaults: the library's, then those recorded with the head (`samantic samcp tune`), then the arguments
        given = {"score_thresh": score_thresh, "affinity_thresh": affinity_thresh, "overlap_thresh": overlap_thresh,
                 "top_k": top_k, "min_area": min_area, "instance_thresh": instance_thresh, "nms_thresh": nms_thresh,
                 "flip": flip, "instance_classes": instance_classes}
        opts = {**INFERENCE_DEFAULTS, **inference_options(scorer)}
        opts.update({k: v for k, v in given.items() if v is not None})
        self.options = opts
        score_thresh, affinity_thresh, overlap_thresh = opts["score_thresh"], opts["affinity_thresh"], opts["overlap_thresh"]
        top_k, min_area, instance_thresh, nms_thresh = opts["top_k"], opts["min_area"], opts["instance_thresh"], opts["nms_thresh"]
        self.head = getattr(scorer, "head", None)  # the torch module (None on onnxruntime)
        self.names = tuple(scorer.names)
        self.things = int(scorer.things)
        wanted = self.names if classes is None else scorer.check_classes(list(classes))
        self.wanted = np.array([n in wanted for n in self.names], bool)
        for name, v in (("score_thresh", score_thresh), ("affinity_thresh", affinity_thresh),
                        ("overlap_thresh", overlap_thresh), ("instance_thresh", instance_thresh)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.score_thresh, self.affinity_thresh = float(score_thresh), float(affinity_thresh)
        self.overlap_thresh, self.top_k, self.min_area = float(overlap_thresh), int(top_k), int(min_area)
        self.instance_thresh = float(instance_thresh)
        if not 0.0 <= float(nms_thresh) <= 1.0:
            raise ValueError(f"nms_thresh must be in [0, 1], got {nms_thresh!r}")
        self.nms_thresh = float(nms_thresh)
        if not isinstance(opts["flip"], (bool, np.bool_)):
            raise ValueError(f"flip must be true or false, got {opts['flip']!r}")
        self.flip = bool(opts["flip"])
        if isinstance(opts["instance_classes"], (bool, np.bool_)) or int(opts["instance_classes"]) != opts["instance_classes"] \
                or int(opts["instance_classes"]) < 1:
            raise ValueError(f"instance_classes must be an integer >= 1, got {opts['instance_classes']!r}")
        self.instance_classes = int(opts["instance_classes"])
        self._timings: Dict[str, float] = {}

    def patch_options(self) -> Dict[str, Any]:
        """The segment-everything options the head was trained with (see :func:`patch_options`)."""
        return self.scorer.patch_options()

    def check_weights(self, sam: Any, source: str = "SAM-CP head") -> Optional[str]:
        """Why ``sam`` (a torch SAM) is not the SAM the head was trained on, or None (see
        :meth:`~samantic.heads.samcp.SamcpHead.check_weights`; None for a head without torch)."""
        head = self.head
        return None if head is None or sam is None else head.check_weights(sam, source)

    def check_model(self, model_name: str, source: str = "SAM-CP head") -> None:
        """Refuses patches of a SAM other than the one the head was trained on (other granularity)."""
        trained = getattr(self.scorer, "model", "")
        if trained and model_name and trained != model_name:
            raise ValueError(f"{source}: the SAM-CP head was trained on patches of {trained}, not {model_name}")

    # -- steps ----------------------------------------------------------------

    def scores(self, image: np.ndarray, patch_rles: Any, patch_boxes: np.ndarray):
        """The head's last-layer outputs for one image: (affinity sigmoid ``[C + P, P]``,
        thing class probabilities ``[P, C]``, presence ``[C]``) as numpy; with ``flip`` the mean of
        the image's and its mirror's (patches in the same order, so the rows and columns agree)."""
        out = self.scorer.scores(image, patch_rles, patch_boxes)
        self._timings = dict(getattr(self.scorer, "timings", {}) or {})
        if not self.flip or len(patch_boxes) == 0:
            return out
        rles, boxes = flip_patches(patch_rles, patch_boxes)
        mirrored = self.scorer.scores(np.ascontiguousarray(image[:, ::-1]), rles, boxes)
        for k, v in (getattr(self.scorer, "timings", {}) or {}).items():
            self._timings[k] = self._timings.get(k, 0.0) + v
        return tuple((np.asarray(a, np.float32) + np.asarray(b, np.float32)) / 2 for a, b in zip(out, mirrored))

    def candidates(self, aff: np.ndarray, cls: np.ndarray, presence: np.ndarray
                   ) -> List[Tuple[int, float, np.ndarray]]:
        """(vocabulary index, score, bool patch selection) of each candidate, best first."""
        c = len(self.names)
        p = cls.shape[0]
        out = []
        if p == 0:
            return out

        def select(row: np.ndarray) -> Tuple[np.ndarray, float]:
            top = float(row.max())
            if top <= 0:
                return np.zeros_like(row, bool), 0.0
            sel = row / top >= self.affinity_thresh
            return sel, float(row[sel].mean())

        # Type-II: one per patch, scored by its best wanted thing class
        thing_prob = cls[:, : self.things] * self.wanted[None, : self.things]
        if self.things:
            best = thing_prob.argmax(1)
            best_p = thing_prob[np.arange(p), best]
            for q in np.argsort(-best_p, kind="stable")[: self.top_k]:
                if best_p[q] < min(self.instance_thresh, self.score_thresh):
                    break
                sel, quality = select(aff[c + q])
                if sel.any():
                    out.append((int(best[q]), float(best_p[q]) * quality, sel))
        # Type-I: the stuff classes
        for k in range(self.things, c):
            if not self.wanted[k]:
                continue
            sel, quality = select(aff[k])
            if sel.any():
                out.append((k, float(presence[k]) * quality, sel))
        out.sort(key=lambda t: -t[1])
        return out

    def instance_candidates(self, aff: np.ndarray, cls: np.ndarray) -> List[Tuple[int, float, np.ndarray]]:
        """The Type-II queries' 2nd to ``instance_classes``-th most likely wanted thing classes, as
        (vocabulary index, score, patch selection): for the instance list only."""
        c, p = len(self.names), cls.shape[0]
        out: List[Tuple[int, float, np.ndarray]] = []
        if p == 0 or self.instance_classes < 2 or not self.things:
            return out
        thing_prob = cls[:, : self.things] * self.wanted[None, : self.things]
        ranked = np.argsort(-thing_prob, axis=1, kind="stable")
        best_p = thing_prob[np.arange(p), ranked[:, 0]]
        for q in np.argsort(-best_p, kind="stable")[: self.top_k]:
            row = aff[c + q]
            top = float(row.max())
            if top <= 0:
                continue
            sel = row / top >= self.affinity_thresh
            quality = float(row[sel].mean())
            for k in ranked[q, 1: self.instance_classes]:
                if thing_prob[q, k] < self.instance_thresh:
                    break
                score = float(thing_prob[q, k]) * quality
                if score >= self.instance_thresh:  # as the listed best-class candidates
                    out.append((int(k), score, sel))
        return out

    def _nms(self, cands: List[Tuple[int, float, np.ndarray]], rles: Any, boxes: np.ndarray) -> np.ndarray:
        """Keeps (best first) candidates without a better one of the same class at mask IoU above ``nms_thresh``.

        Mask IoU is computed only between candidates of one class whose boxes (XYXY inclusive) meet.
        """
        from samantic.ops import rle_iou

        n = len(cands)
        alive = np.ones(n, bool)
        if n < 2 or self.nms_thresh >= 1.0:
            return alive
        cls = np.array([k for k, _, _ in cands])
        boxes = np.asarray(boxes)
        for i in range(n):  # cands are sorted by score
            if not alive[i]:
                continue
            later = np.arange(i + 1, n)
            b = boxes[later]
            meet = (alive[later] & (cls[later] == cls[i]) & (b[:, 0] <= boxes[i, 2]) & (b[:, 2] >= boxes[i, 0])
                    & (b[:, 1] <= boxes[i, 3]) & (b[:, 3] >= boxes[i, 1]))
            js = later[meet]
            if len(js):
                iou = np.asarray(rle_iou(rles.select([i]), rles.select(js))).reshape(-1)
                alive[js[iou > self.nms_thresh]] = False
        return alive

    def __call__(self, image: np.ndarray, patch_rles: Any, patch_boxes: np.ndarray) -> PanopticOutput:
        """Panoptic segmentation of ``image`` (uint8 RGB ``[H, W, 3]``) from its patches (RLEs, XYXY inclusive boxes)."""
        import time

        from samantic.ops import RleBatch, merge_patches
        from samantic.ops import panoptic_fusion as fusion_kernel
        from samantic.ops.rle import _batch

        t0 = time.perf_counter()
        h, w = image.shape[:2]
        batch = patch_rles if isinstance(patch_rles, RleBatch) else (
            _batch(patch_rles, "patch_rles") if len(patch_rles) else RleBatch(np.zeros(0, np.uint32),
                                                                               np.zeros(1, np.int64), (h, w)))
        if tuple(batch.size) != (h, w):
            raise ValueError(f"patches are {batch.size[1]}x{batch.size[0]}, the image {w}x{h}")
        aff, cls, presence = self.scores(image, batch, patch_boxes)
        t1 = time.perf_counter()
        cands = self.candidates(aff, cls, presence)
        # identical patch sets of one class: keep the best
        seen, unique = set(), []
        for k, s, sel in cands:
            key = (k, sel.tobytes())
            if key not in seen:
                seen.add(key)
                unique.append((k, s, sel))
        groups = np.stack([sel for _, _, sel in unique]) if unique else np.zeros((0, len(batch)), bool)
        merged = merge_patches(batch, groups)
        t2 = time.perf_counter()
        # duplicates: thing candidates of one class whose masks overlap (several patch queries of
        # one instance) keep the best
        alive = self._nms(unique, merged.rles, merged.boxes)
        unique = [u for u, a in zip(unique, alive) if a]
        index = np.flatnonzero(alive)
        merged = type(merged)(merged.rles.select(index), merged.area[index], merged.boxes[index])
        listed = [i for i, (k, s, _) in enumerate(unique)
                  if k < self.things and s >= self.instance_thresh and merged.area[i] > 0]
        inst_cands, inst_merged = [unique[i] for i in listed], None
        extra = [e for e in self.instance_candidates(aff, cls) if (e[0], e[2].tobytes()) not in seen]
        if extra:
            # the queries' other classes: merged with the listed ones, then one class's duplicates dropped again
            inst_cands = sorted(inst_cands + extra, key=lambda t: -t[1])
            both = merge_patches(batch, np.stack([sel for _, _, sel in inst_cands]))
            alive = self._nms(inst_cands, both.rles, both.boxes) & (both.area > 0)
            index = np.flatnonzero(alive)
            inst_cands = [inst_cands[i] for i in index]
            inst_merged = type(both)(both.rles.select(index), both.area[index], both.boxes[index])
        elif listed:
            inst_merged = type(merged)(merged.rles.select(listed), merged.area[listed], merged.boxes[listed])
        dicts = inst_merged.rles.to_dicts(compressed=True) if inst_cands else []
        instances = []
        for i, ((k, s, _), rle) in enumerate(zip(inst_cands, dicts)):
            instances.append({"category_id": k + 1, "category_name": self.names[k], "score": float(s),
                              "segmentation": rle, "area": int(inst_merged.area[i]),
                              "bbox": _xywh(inst_merged.boxes[i])})
        keep = [i for i, (k, s, _) in enumerate(unique) if s >= self.score_thresh and merged.area[i] > 0]
        # samantic._C: per pixel the best candidate wins, on the run lengths (no dense masks)
        fused, kept = fusion_kernel(merged.rles.select(keep), np.array([unique[i][1] for i in keep], np.float64),
                                    self.overlap_thresh, self.min_area)
        fused = np.asarray(fused, np.int32).reshape(h, w)
        # candidate index + 1 -> segment id / category id, through lookup tables
        seg_of = np.zeros(len(keep) + 1, np.int32)
        cat_of = np.zeros(len(keep) + 1, np.uint8 if len(self.names) < 256 else np.uint16)
        order = [j for j in range(len(keep)) if kept[j]]
        for sid, j in enumerate(order, start=1):
            seg_of[j + 1] = sid
            cat_of[j + 1] = unique[keep[j]][0] + 1
        panoptic = seg_of[fused]
        semantic = cat_of[fused]
        within = np.zeros((len(order) + 1, 4), np.int64)
        for sid, j in enumerate(order, start=1):
            within[sid] = merged.boxes[keep[j]]  # a segment lies inside its candidate's union
        boxes, areas = _label_boxes(panoptic, len(order), within)
        segments = []
        for sid, j in enumerate(order, start=1):
            k, s, sel = unique[keep[j]]
            segments.append({"id": sid, "category_id": k + 1, "category_name": self.names[k],
                             "isthing": bool(k < self.things), "score": float(s), "area": int(areas[sid]),
                             "bbox": [int(v) for v in boxes[sid]], "patches": np.flatnonzero(sel).tolist()})
        t3 = time.perf_counter()
        return PanopticOutput(panoptic, segments, semantic, instances, self.names, self.things,
                              {"head": t1 - t0, **self._timings,
                               "merge": t2 - t1, "fusion": t3 - t2})


def _label_boxes(labels: np.ndarray, n: int, within: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """XYWH boxes ``[n + 1, 4]`` and areas ``[n + 1]`` of labels ``1..n`` in an int map (row 0 unused).

    ``within``: optional XYXY (inclusive) box ``[n + 1, 4]`` known to hold each label: only that
    crop is scanned for it.
    """
    h, w = labels.shape
    areas = np.bincount(labels.ravel(), minlength=n + 1)[: n + 1]
    boxes = np.zeros((n + 1, 4), np.int64)
    for k in range(1, n + 1):
        if not areas[k]:
            continue
        x0, y0, x1, y1 = (0, 0, w - 1, h - 1) if within is None else (int(v) for v in within[k])
        crop = labels[y0:y1 + 1, x0:x1 + 1] == k
        ys = np.flatnonzero(crop.any(1))
        xs = np.flatnonzero(crop.any(0))
        boxes[k] = [x0 + xs[0], y0 + ys[0], xs[-1] - xs[0] + 1, ys[-1] - ys[0] + 1]
    return boxes, areas


def flip_patches(patch_rles: Any, patch_boxes: np.ndarray) -> Tuple[Any, np.ndarray]:
    """Patches of the horizontally mirrored image: (RLEs as an :class:`~samantic.ops.RleBatch`,
    XYXY inclusive boxes), in the same order."""
    from samantic.ops import rle_decode, rle_encode
    from samantic.ops.rle import _batch

    batch = _batch(patch_rles, "patch_rles")
    w = int(batch.size[1])
    src = np.asarray(patch_boxes)
    boxes = src.copy()
    boxes[:, 0], boxes[:, 2] = w - 1 - src[:, 2], w - 1 - src[:, 0]
    return rle_encode(np.ascontiguousarray(rle_decode(batch)[:, :, ::-1])), boxes


def _xywh(box: np.ndarray) -> List[int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def _dicts(rles: Any) -> List[dict]:
    from samantic.ops import RleBatch

    if isinstance(rles, RleBatch):
        return rles.to_dicts(compressed=True) if len(rles) else []
    return list(rles)
