"""``Segmenter``: the grid-prompted pipeline (+ semantic head) on torch, onnxruntime or TensorRT.

Example:
    >>> seg = Segmenter.from_bundle("bundles/nano", backend="onnxruntime")  # doctest: +SKIP
    >>> result = seg(image)                                                   # doctest: +SKIP
    >>> result.instances[0]["bbox"], result.semantic_map.max()                # doctest: +SKIP

All backends share :class:`~samantic.pipeline.generator.MaskGenerator` (grid
prompts, early IoU and class filters, ``samantic._C`` post-processing, NMS);
only the engine that runs the networks differs. This module imports neither
torch nor onnxruntime; each backend imports what it needs when chosen.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from samantic.models.tasks import task_name
from samantic.pipeline.config import AmgConfig
from samantic.pipeline.engine import Engine
from samantic.pipeline.generator import MaskGenerator, MaskSet
from samantic.pipeline.scoring import ClassLogitScorer, MaskScorer
from samantic.runtime.bundle import Bundle, BundleError

if TYPE_CHECKING:
    from samantic.runtime.stream import FrameStream

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


class Result:
    """The masks of one image.

    Attributes:
        masks: the :class:`~samantic.pipeline.generator.MaskSet` (RLEs, boxes, scores, head fields).
        instances: one record per mask (segment-anything's keys, plus ``category_id``,
            ``category`` and ``class_score`` when a head ran).
        names: the requested class names (``category_id`` is 1-based into it), empty without a head.
        image_size: (H, W).
    """

    def __init__(self, masks: MaskSet, instances: List[Dict[str, Any]], names: Sequence[str],
                 image: Optional[np.ndarray] = None) -> None:
        self.masks = masks
        self.instances = instances
        self.names = tuple(names)
        self.image_size = tuple(int(v) for v in masks.rles.size)
        # a copy: a caller that reuses its frame buffer still gets this frame's overlay
        self._image = None if image is None else np.array(image, copy=True)
        self._semantic: Optional[np.ndarray] = None
        self.timings: Dict[str, float] = {}  # seconds per stage of the call that made it (set by the Segmenter)
        self.stats: Dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.masks)

    def __repr__(self) -> str:
        return f"Result({len(self)} masks, image {self.image_size[0]}x{self.image_size[1]}, classes {list(self.names)})"

    @property
    def semantic_map(self) -> np.ndarray:
        """Label map ``[H, W]``: 0 background, ``i + 1`` for ``names[i]``; where masks overlap the
        higher class score wins. uint8 up to 255 classes, else uint16.

        Raises:
            RuntimeError: no semantic head ran.
        """
        if not self.names:
            raise RuntimeError("no semantic head: a semantic map needs Segmenter(..., head=...) or a bundle with a head")
        if self._semantic is None:
            from samantic.ops import rle_decode

            dtype = np.uint8 if len(self.names) < 256 else np.uint16
            out = np.zeros(self.image_size, dtype)
            if len(self.masks):
                ids = self.masks.fields["category_id"]
                order = np.argsort(self.masks.fields["class_score"], kind="stable")  # best painted last
                for i in order:  # one mask at a time: never every mask of the image at once
                    out[rle_decode(self.masks.rles.select([int(i)]))[0].astype(bool)] = ids[i]
            self._semantic = out
        return self._semantic

    def to_coco(self, image_id: int = 1, category_ids: Optional[Mapping[str, int]] = None) -> List[Dict[str, Any]]:
        """COCO results entries (compressed RLE ``segmentation``, XYWH ``bbox``, ``score``).

        ``score`` is the class score with a head, else the predicted IoU;
        ``category_id`` maps through ``category_ids`` (name -> id) when given.
        """
        from samantic.ops import rle_area

        rles = self.masks.rles.to_dicts(compressed=True) if len(self) else []
        areas = rle_area(self.masks.rles) if len(self) else []
        cats = self.masks.fields.get("category_id")
        scores = self.masks.fields.get("class_score", self.masks.iou_preds)
        out = []
        for i in range(len(self)):
            b = self.masks.boxes[i]
            cat = int(cats[i]) if cats is not None else 1
            if category_ids is not None and self.names:
                cat = int(category_ids[self.names[cat - 1]])
            out.append({"id": i + 1, "image_id": image_id, "category_id": cat, "segmentation": rles[i],
                        "area": int(areas[i]), "bbox": [int(b[0]), int(b[1]), int(b[2] - b[0]), int(b[3] - b[1])],
                        "score": float(scores[i]), "iscrowd": 0})
        return out

    def to_supervision(self, coordinate_convention: str = "inclusive") -> Any:
        """The masks as ``supervision.Detections`` (xyxy, mask, confidence, ``class_id`` 0-based into
        ``names``, ``data["class_name"]``); see :func:`samantic.io.supervision.to_supervision`."""
        from samantic.io.supervision import to_supervision

        return to_supervision(self, coordinate_convention=coordinate_convention)

    def overlay(self, image: Optional[np.ndarray] = None, alpha: float = 0.5) -> np.ndarray:
        """The masks drawn on the image (uint8 RGB), labelled with class names when a head ran (the masks
        are decoded one at a time)."""
        from samantic.io.visualize import overlay_each
        from samantic.ops import rle_area, rle_decode

        image = self._image if image is None else image
        if image is None:
            raise ValueError("overlay() needs the image: pass overlay(image)")
        image = np.asarray(image)
        if image.shape[:2] != self.image_size:
            raise ValueError(f"overlay(image): the image is {image.shape[:2]}, the masks {self.image_size}")
        labels = None
        if self.names and len(self):
            labels = [self.names[int(c) - 1] for c in self.masks.fields["category_id"]]
        rles = self.masks.rles
        return overlay_each(image, len(self), lambda i: rle_decode(rles.select([i]))[0].astype(bool),
                            rle_area(rles) if len(self) else [], labels, alpha=alpha)


class PanopticResult(Result):
    """A SAM-CP result: named instances and stuff regions merged from SAM's patches.

    Attributes:
        masks: the patches (the generator's :class:`~samantic.pipeline.generator.MaskSet`).
        instances: one record per panoptic segment (``id``, ``category_id``, ``category``,
            ``isthing``, ``score``, ``segmentation`` (compressed RLE of the fused segment),
            ``area``, ``bbox`` XYWH, ``patches``).
        panoptic_map: int32 ``[H, W]`` segment id per pixel (0: unlabelled).
        segments_info: COCO panoptic ``segments_info`` of ``panoptic_map`` (with ``score`` and ``category_name``).
        semantic_map: category id per pixel (0: unlabelled), from the same fusion.
        detections: the thing candidates before fusion (COCO results for detection AP).
        names: the vocabulary (``category_id`` ``k`` is ``names[k - 1]``).
    """

    def __init__(self, masks: MaskSet, output: Any, image: Optional[np.ndarray] = None) -> None:
        from samantic.ops import rle_encode

        self.output = output
        self.panoptic_map = output.panoptic
        self.segments_info = [{k: v for k, v in s.items() if k != "patches"} for s in output.segments_info]
        # one segment at a time: never an [N, H, W] stack (100 segments of a 4K frame would be 830 MB)
        rles = [rle_encode((output.panoptic == s["id"])[None]).to_dicts(compressed=True)[0]
                for s in output.segments_info]
        instances = []
        for s, rle in zip(output.segments_info, rles):
            instances.append({"id": s["id"], "category_id": s["category_id"], "category": s["category_name"],
                              "isthing": s["isthing"], "score": s["score"], "segmentation": rle, "area": s["area"],
                              "bbox": s["bbox"], "patches": s["patches"]})
        super().__init__(masks, instances, output.names, image)
        self._semantic = output.semantic
        self.detections = output.instances

    def __len__(self) -> int:
        return len(self.instances)

    def __repr__(self) -> str:
        return (f"PanopticResult({len(self)} segments from {len(self.masks)} patches, image "
                f"{self.image_size[0]}x{self.image_size[1]})")

    @property
    def semantic_map(self) -> np.ndarray:
        return self._semantic

    def to_coco(self, image_id: int = 1, category_ids: Optional[Mapping[str, int]] = None) -> List[Dict[str, Any]]:
        """COCO results of the panoptic segments (fused, non-overlapping)."""
        out = []
        for i, r in enumerate(self.instances):
            cat = int(r["category_id"]) if category_ids is None else int(category_ids[r["category"]])
            out.append({"id": i + 1, "image_id": image_id, "category_id": cat, "category_name": r["category"],
                        "segmentation": r["segmentation"], "area": r["area"], "bbox": r["bbox"],
                        "score": r["score"], "iscrowd": 0})
        return out

    def overlay(self, image: Optional[np.ndarray] = None, alpha: float = 0.5) -> np.ndarray:
        """The panoptic segments drawn on the image, each labelled once with its class name."""
        from samantic.io.visualize import overlay_segments

        image = self._image if image is None else image
        if image is None:
            raise ValueError("overlay() needs the image: pass overlay(image)")
        labels = [r["category"] for r in self.instances]
        return overlay_segments(image, self.panoptic_map, [r["id"] for r in self.instances], labels or None,
                                alpha=alpha)


def _head_info(head: Any) -> Dict[str, Any]:
    """classes / groups / score_thresh of a head module (``head.info`` like U-SAM's, or attributes)."""
    info = getattr(head, "info", head)
    classes = getattr(info, "classes", None)
    if not classes:
        raise ValueError(f"a head must say its classes (head.info.classes or head.classes), got {type(head).__name__}")
    return {"classes": list(classes), "groups": {k: list(v) for k, v in (getattr(info, "groups", None) or {}).items()},
            "score_thresh": float(getattr(info, "score_thresh", 0.5))}


class Segmenter:
    """Segments images (by class names when a semantic head is present) on one backend.

    Args:
        model: a ``Sam`` (torch backend), or None when ``engine`` is given.
        head: a semantic head module (token ``[..., D]`` -> logits ``[..., C + 1]``, ``info`` with
            ``classes``/``groups``/``score_thresh``) or a head file; torch backend.
        classes: requested names (head classes and/or groups; None: all classes).
        score_thresh: class threshold (None: the head's).
        config: generator options; defaults to :class:`AmgConfig` with ``output_mode="coco_rle"`` and the
            model's recommended thresholds for ``options``' task (:func:`samantic.models.thresholds_source`:
            those its weights file records, the shipped weights', else segment-anything's). A call's own
            ``task`` keeps the Segmenter's thresholds: build one Segmenter per task to get each task's.
        mask_scorer: an extra scoring hook on the mask tokens (see :class:`MaskGenerator`).
        engine: an already built :class:`~samantic.pipeline.engine.Engine` (instead of ``model``).
        head_info: ``{"classes", "groups", "score_thresh"}`` of a head the engine runs.
        samcp: a SAM-CP head (:class:`~samantic.heads.samcp.SamcpHead` or its file, torch backend;
            or a scorer such as a bundle's :class:`~samantic.runtime.samcp.OnnxSamcpScorer`): the
            patches are then labelled and merged into a :class:`PanopticResult`; segment-everything
            uses the grid and thresholds the head was trained with (``config`` / ``options`` override).
        samcp_options: :class:`~samantic.pipeline.panoptic.SamcpPredictor` options
            (``score_thresh``, ``affinity_thresh``, ``overlap_thresh``, ``top_k``, ``min_area``);
            ``score_thresh=`` and ``classes=`` (a list or ``"a,b"``) apply to a SAM-CP head too.
        **options: :class:`AmgConfig` fields overriding ``config``, e.g. ``task="part"`` (SUM's task
            prompt for every call; a call can pass its own).

    Raises:
        ValueError: contradictory arguments; a task the engine cannot run (a bundle exported before
            task prompts runs "unspecified" only).
    """

    def __init__(self, model: Any = None, head: Any = None, *, classes: Optional[Union[str, Sequence[str]]] = None,
                 score_thresh: Optional[float] = None, config: Optional[AmgConfig] = None,
                 mask_scorer: Optional[MaskScorer] = None, engine: Optional[Engine] = None,
                 head_info: Optional[Mapping[str, Any]] = None, samcp: Any = None,
                 samcp_options: Optional[Mapping[str, Any]] = None, **options: Any) -> None:
        if (model is None) == (engine is None):
            raise ValueError("give exactly one of model (a Sam, torch backend) and engine")
        self.samcp = None
        if samcp is not None:
            if head is not None or head_info is not None:
                raise ValueError("give either a U-SAM head (head=) or a SAM-CP head (samcp=), not both")
            from samantic.pipeline.panoptic import SamcpPredictor

            if model is None and not callable(getattr(samcp, "scores", None)):
                raise ValueError("a SAM-CP head (module or file) runs on torch: pass model=, or give an engine "
                                 "with a SAM-CP scorer (Segmenter.from_bundle does)")
            wanted = None
            if classes is not None:  # "house,grass" as the CLI and the U-SAM path take it, or a list
                wanted = ([n.strip() for n in classes.split(",") if n.strip()] if isinstance(classes, str)
                          else list(classes))
                if not wanted:
                    raise ValueError("classes= names no class: give at least one of the SAM-CP head's names "
                                     "(or None for all of them)")
            opts = dict(samcp_options or {})
            if score_thresh is not None:
                if opts.get("score_thresh", score_thresh) != score_thresh:
                    raise ValueError(f"score_thresh={score_thresh} and samcp_options['score_thresh']="
                                     f"{opts['score_thresh']} contradict each other")
                opts["score_thresh"] = score_thresh
            self.samcp = SamcpPredictor(samcp, classes=wanted, **opts)
            name = (getattr(model, "samantic_name", None) if model is not None
                    else getattr(getattr(engine, "bundle", None), "model_id", None))
            source = str(samcp) if isinstance(samcp, (str, Path)) else "SAM-CP head"
            if name:
                self.samcp.check_model(name, source)
            mismatch = self.samcp.check_weights(model, source)
            if mismatch:
                import warnings

                from samantic.pipeline.panoptic import SamcpWeightsWarning

                warnings.warn(mismatch, SamcpWeightsWarning, stacklevel=2)
            if config is None:
                config = AmgConfig(output_mode="coco_rle", **self.samcp.patch_options())
            classes = None
        if engine is None:
            from samantic.pipeline.amg import TorchEngine

            if isinstance(head, (str, Path)):
                from samantic.heads.usam import load_head

                head = load_head(head)
            engine = TorchEngine(model, head=head)
            if head is not None:
                head_info = _head_info(head)
        elif head is not None:
            raise ValueError("head= is for the torch backend; an engine runs its own head (pass head_info=)")
        if config is None:
            # the model's recommended thresholds for the task asked for: those its weights file records, the
            # shipped weights' (registry), else segment-anything's
            thresholds = {}
            if model is not None:
                from samantic.models import recommended_thresholds

                thresholds = recommended_thresholds(model, options.get("task"))
            config = AmgConfig(output_mode="coco_rle", **thresholds)
        if options:
            config = config.replace(**options)
        scorer = None
        if head_info is not None:
            thresh = head_info.get("score_thresh", 0.5) if score_thresh is None else score_thresh
            scorer = ClassLogitScorer(head_info["classes"], head_info.get("groups"), classes, thresh)
        elif classes is not None:
            raise ValueError("classes= needs a semantic head (Segmenter(model, head=...) or a bundle with a head)")
        self.engine = engine
        self.head_info = dict(head_info) if head_info is not None else None
        self.class_scorer = scorer
        self.generator = MaskGenerator(engine, config, mask_scorer=mask_scorer, class_scorer=scorer)
        # one call at a time: the engine holds the current image's embedding and the generator its timings
        self._lock = threading.Lock()

    @property
    def config(self) -> AmgConfig:
        return self.generator.config

    @property
    def names(self) -> tuple:
        """The requested class names (empty without a head)."""
        if self.samcp is not None:
            return self.samcp.names
        return tuple(self.class_scorer.names) if self.class_scorer is not None else ()

    @property
    def timings(self) -> Dict[str, float]:
        """Seconds per stage of the last call (preprocess, encoder, decoder, postprocess, nms, output); with
        threads sharing a Segmenter, read ``result.timings`` (the call's own) instead."""
        return dict(self.generator.timings)

    @property
    def stats(self) -> Dict[str, int]:
        return dict(self.generator.stats)

    def __call__(self, image: np.ndarray, task: Union[str, int, None] = None) -> Result:
        """Segments an RGB uint8 image ``[H, W, 3]``.

        Args:
            image: the image.
            task: SUM's task prompt for this call, "unspecified", "salient", "entity" or "part" (or its
                index); default: the Segmenter's (``config.task``).

        Thread safety: a Segmenter may be shared between threads; calls run one at a time (a lock
        guards the engine, which holds the current image's embedding). For parallel throughput give
        each thread its own Segmenter (or use ``samantic.batch.segment_dataset`` on Ray).

        Raises:
            ValueError: a bad image, an unknown task or one the engine cannot run.
        """
        with self._lock:
            result = self._segment(image, task)
            # this call's own numbers, read while no other call can reset them
            result.timings, result.stats = dict(self.generator.timings), dict(self.generator.stats)
            return result

    def _segment(self, image: np.ndarray, task: Union[str, int, None]) -> Result:
        import time

        masks = self.generator.generate_masks(image, task)
        if self.samcp is not None:
            t = time.perf_counter()
            output = self.samcp(image, masks.rles, masks.boxes)
            self.generator.timings["samcp"] = time.perf_counter() - t
            return PanopticResult(masks, output, image)
        t = time.perf_counter()
        records = self.generator.to_records(masks)
        if self.names:
            for r in records:
                r["category"] = self.names[int(r["category_id"]) - 1]
        self.generator.timings["output"] += time.perf_counter() - t
        return Result(masks, records, self.names, image)

    def stream(self, frames: Iterable[Any], *, live: bool = False, queue_size: int = 2,
               drop: str = "oldest") -> "FrameStream":
        """Segments a stream of frames; a reader thread fills a bounded queue, this thread segments.

        Args:
            frames: any iterable of uint8 RGB ``[H, W, 3]`` arrays, or of ``(timestamp, frame)``
                pairs (timestamp in seconds; without one, a frame's timestamp is when it was read,
                in seconds since the stream started).
            live: the source runs at its own pace (a camera): when the queue is full a frame is
                dropped (and counted) instead of making the source wait. Default False: a list or a
                video file is never dropped; every frame is segmented.
            queue_size: frames held between the reader and the Segmenter.
            drop: with ``live``, which frame goes when the queue is full: ``"oldest"`` (queued
                longest; results stay fresh) or ``"newest"`` (the one just read).

        Returns:
            A :class:`~samantic.runtime.stream.FrameStream`: iterate it for
            :class:`~samantic.runtime.stream.StreamFrame` (``index``, ``timestamp``, ``result``,
            ``latency``, ...); ``.summary`` gives frames read, segmented, dropped, latency p50/p99
            and fps. Use it in a ``with`` block (or call ``close()``) to stop the reader when
            leaving early.

        Raises:
            ValueError: bad ``queue_size`` or ``drop``; while iterating, a frame that is not uint8 RGB.
        """
        from samantic.runtime.stream import FrameStream

        return FrameStream(self, frames, live=live, queue_size=queue_size, drop=drop)

    @staticmethod
    def from_bundle(path: Union[str, Path, Bundle], backend: str = "auto", device: str = "auto", *,
                    precision: str = "fp32", classes: Optional[Union[str, Sequence[str]]] = None,
                    score_thresh: Optional[float] = None, config: Optional[AmgConfig] = None,
                    threads: Optional[int] = None, verify: bool = True,
                    samcp_options: Optional[Mapping[str, Any]] = None, **options: Any) -> "Segmenter":
        """Loads a bundle (verifying its files) and builds a Segmenter on a backend.

        Args:
            path: the bundle directory, or a :class:`Bundle` already loaded.
            backend: ``"auto"`` (TensorRT when an engine for this GPU, TensorRT version and
                precision is in the bundle and TensorRT is installed, else onnxruntime),
                ``"onnxruntime"``, ``"tensorrt"`` or ``"torch"`` (needs the bundle's torch weights).
            device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
            precision: ``"fp32"``, ``"int8"`` (onnxruntime: dynamic INT8 graphs; TensorRT: INT8
                engine) or ``"fp16"`` (TensorRT / TensorRT EP).
            classes, score_thresh: as for :class:`Segmenter`.
            config: generator options (default: the bundle's recorded thresholds, ``coco_rle`` output).
            threads: onnxruntime intra-op threads.
            verify: check every file's SHA-256 (on by default).
            samcp_options: with a SAM-CP bundle, :class:`~samantic.pipeline.panoptic.SamcpPredictor`
                options (``score_thresh`` also sets its ``score_thresh``). The bundle's SAM-CP head
                runs on onnxruntime (or torch with ``backend="torch"``), the result is a
                :class:`PanopticResult`.
            **options: :class:`AmgConfig` fields.

        Raises:
            BundleError: a missing, corrupt or escaping file; a missing precision or engine.
            ImportError: the backend's package is not installed (the message names the extra).
            ValueError: unknown backend, device or class names.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(path, Bundle):  # already loaded (e.g. by the CLI, to read its thresholds)
            bundle = path
            if verify:
                bundle.verify()
        else:
            bundle = Bundle.load(path, verify=verify)
        if config is None:
            known = set(AmgConfig.__dataclass_fields__)
            task = options.get("task")
            defaults = bundle.thresholds_for(None if task is None else task_name(task))  # the task's, if recorded
            config = AmgConfig(output_mode="coco_rle", **{k: v for k, v in defaults.items() if k in known})
        kw = dict(classes=classes, score_thresh=score_thresh, config=config, **options)
        if bundle.samcp and score_thresh is not None:
            samcp_options = {**(samcp_options or {}), "score_thresh": score_thresh}
        if bundle.samcp:
            kw.pop("score_thresh")
            kw["samcp_options"] = samcp_options
        elif samcp_options:
            raise ValueError("samcp_options= needs a bundle with a SAM-CP head")
        if backend == "torch":
            return Segmenter._torch_from_bundle(bundle, **kw)
        if backend == "auto":
            from samantic.runtime.onnxruntime import parse_device
            from samantic.runtime.tensorrt import find_engine

            kind, index = parse_device(device)
            # TensorRT only on a GPU asked for, with an engine built for that GPU
            backend = ("tensorrt" if kind != "cpu" and find_engine(bundle, precision, device=index, quiet=True)
                       is not None else "onnxruntime")
        if backend == "tensorrt":
            from samantic.runtime.tensorrt import TensorRTEngine

            engine: Engine = TensorRTEngine(bundle, precision=precision, device=device)
        else:
            from samantic.runtime.onnxruntime import OnnxRuntimeEngine

            engine = OnnxRuntimeEngine(bundle, precision=precision, device=device, threads=threads)
        if bundle.samcp:
            from samantic.runtime.samcp import OnnxSamcpScorer

            scorer = OnnxSamcpScorer(bundle, device=device, threads=threads)
            return Segmenter(engine=engine, samcp=scorer, **kw)
        return Segmenter(engine=engine, head_info=bundle.head, **kw)

    @staticmethod
    def _torch_from_bundle(bundle: Bundle, **kw: Any) -> "Segmenter":
        weights = bundle.manifest.get("torch_weights")
        if not weights:
            raise BundleError(f"{bundle.root}: the bundle has no torch weights; re-export with --torch-weights, "
                              "or build Segmenter(model=create_model(...)) directly")
        from samantic.models import create_model

        sam = create_model(bundle.model_id, checkpoint=str(bundle.path(weights["file"])))
        if bundle.samcp:
            return Segmenter(sam, samcp=bundle.path(bundle.samcp["file"]), **kw)
        head = bundle.path(bundle.head["file"]) if bundle.head else None
        return Segmenter(sam, head, **kw)
