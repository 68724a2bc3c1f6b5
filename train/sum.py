"""SUM (Segment with Uncertainty Model): its data and its uncertainty-aware prompts and loss.

SUM fine-tunes SAM on a few human labels plus SAM's own pseudo-labels of
unlabelled images, and keeps the pseudo-labels' mistakes out of the training
signal with a per-pixel uncertainty map (see ``DESIGN.md``, the SUM row, and
the authors' slides). This module holds:

**Data.** From the shapes world v2 (:mod:`samantic.train.data.panoptic`):

* a labelled set (:class:`LabelledScenes`, :class:`LabelledFolder`): every mask of a scene
  once per SUM task it answers, with the task index (rows of
  :data:`~samantic.models.tasks.TASKS`) in ``Sample.tasks``: the thing instances as
  "unspecified" (v1-style instance masks), the salient thing as "salient", every thing
  and stuff region as "entity", and per thing its parts (the thing itself for a simple
  thing) as "part";
* an unlabelled pool (:class:`UnlabelledPool`) that holds and returns **images only**: it
  keeps no scene, mask or annotation file, so nothing that trains from it can read its
  ground truth. The ground truth is reachable through one separate evaluation accessor,
  :class:`PoolGroundTruth`, which only evaluation code (``samantic.train.sum_refine``) uses;
* pseudo-labels of the pool (:class:`PseudoLabelCache`, :func:`build_pseudo_labels`): the
  masks sam_nano's segment-everything keeps, stored as their **low-res logits** (float16,
  the decoder's ``L x L`` frame), so soft probabilities of every pseudo-label survive;
* :class:`PseudoLabelled`: the pool as training samples (the pseudo-labels as masks, task
  "unspecified", and an uncertainty map per mask when an estimator is given).

**Uncertainty-aware prompts and loss**, plugged into :class:`~samantic.train.sam.SamTrainer`
through its ``sampler`` and ``loss`` hooks (the batch carries the maps as ``uncertainty``):

* :class:`UncertaintyPointSampler`: points drawn with weights ``1 - U``: the first inside
  the mask, later ones inside the error region;
* :class:`UncertaintyMaskLoss`: focal loss weighted per pixel by ``1 - U``, dice on the
  pixels where ``1 - U > 0.5``.

Pseudo-label cache layout (the pattern of :mod:`samantic.train.samcp_cache`)::

    out_dir/<model_key>/meta.json            what the key stands for (model, weights, grid, thresholds)
    out_dir/<model_key>/<image_sha256>.npz   one entry per image

``model_key`` is ``<model name>-<12 hex digits>``, a digest of the model's state dict
(SHA-256), the grid, the thresholds and the generator's fixed options; ``image_sha256``
is :func:`~samantic.train.samcp_cache.image_sha256` of the image. An entry holds, for K
kept masks:

=============  ================  =============================================
array          dtype, shape      meaning
=============  ================  =============================================
logits         float16 [K, L, L] low-res mask logits in the model's padded input frame
iou_preds      float32 [K]       predicted IoU
stability      float32 [K]       stability score
points         float64 [K, 2]    the grid point (x, y) that prompted the mask
boxes          int64 [K, 4]      XYXY, max inclusive, image pixels
size           int64 [2]         (H, W) of the image
input_size     int64 [2]         (h, w) of the image resized into the model's input frame
img_size       int64 (0-d)       side of the model's square input
meta           str (0-d)         JSON: meta.json's fields plus image_sha256, source
=============  ================  =============================================
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from samantic.models.tasks import TASKS
from samantic.train.samcp_cache import DEFAULT_STREAM_N, STREAM_PREFIX, parse_stream  # one spec syntax for streams
from samantic.train.sam import MaskLoss, PointSampler, Sample

__all__ = [
    "ENTITY",
    "LABELLED_SEED",
    "PART",
    "POOL_SEED",
    "PSEUDO_FORMAT",
    "SALIENT",
    "UNSPECIFIED",
    "LabelledFolder",
    "LabelledScenes",
    "PoolGroundTruth",
    "PseudoLabelCache",
    "PseudoLabelReport",
    "PseudoLabelled",
    "PseudoLabels",
    "UncertaintyMaskLoss",
    "UncertaintyPointSampler",
    "UnlabelledPool",
    "build_pseudo_labels",
    "open_labelled",
    "open_pool",
    "progress_bar",
    "scene_task_masks",
    "upscale_logits",
]

PathLike = Union[str, Path]

# Seeds: training scenes come from >= 1,000,000 (samantic.train.metrics.TRAIN_SEED_START), held-out ones below.
LABELLED_SEED = 3_000_000
POOL_SEED = 4_000_000

UNSPECIFIED, SALIENT, ENTITY, PART = (TASKS.index(t) for t in ("unspecified", "salient", "entity", "part"))

PSEUDO_FORMAT = "samantic.sum_pseudo/1"
# generator options besides the grid and thresholds; fixed here, recorded in every key
GENERATOR_OPTIONS = {"stability_score_offset": 1.0, "box_nms_thresh": 0.7, "crop_n_layers": 0,
                     "min_mask_region_area": 0, "task": "unspecified"}


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _parse_stream(spec: str, what: str) -> Optional[Tuple[int, int]]:
    """(seed, n) of ``shapes-panoptic:SEED[:N]``, or None for a folder."""
    if not spec.startswith(STREAM_PREFIX):
        return None
    return parse_stream(spec, STREAM_PREFIX, f"{what} must be DIR or {STREAM_PREFIX}SEED[:N]")


# ---------------------------------------------------------------- labelled set


def scene_task_masks(scene) -> Tuple[np.ndarray, np.ndarray]:
    """Every SUM task mask of a v2 scene.

    Args:
        scene: a :class:`~samantic.train.data.panoptic.PanopticScene`.

    Returns:
        (bool ``[N, H, W]`` masks, int64 ``[N]`` task indices): the thing instances ("unspecified"),
        the salient thing ("salient"), every thing and stuff region ("entity"), then per thing its
        parts, or the thing itself for a simple thing ("part"). A mask answers several tasks
        and appears once per task.
    """
    things = scene.masks
    part_masks = [scene.part_masks[scene.part_of == t] for t in range(len(things))]
    parts = np.concatenate([p if len(p) else things[t : t + 1] for t, p in enumerate(part_masks)]) \
        if len(things) else np.zeros((0,) + things.shape[1:], bool)
    groups = [(things, UNSPECIFIED), (things[scene.salient : scene.salient + 1], SALIENT),
              (scene.entity_masks, ENTITY), (parts, PART)]
    masks = np.concatenate([m for m, _ in groups])
    tasks = np.concatenate([np.full(len(m), t, np.int64) for m, t in groups])
    return masks, tasks


class LabelledScenes:
    """``n`` labelled v2 scenes rendered on the fly from seeds ``seed .. seed + n - 1``; item ``i`` is a
    :class:`~samantic.train.sam.Sample` with the scene's task masks and ``tasks`` (:func:`scene_task_masks`).

    Args:
        seed: first seed (default :data:`LABELLED_SEED`, in the training range).
        n: number of scenes (a labelled set is finite: "a few human labels").
        size: ``(H, W)`` of every scene, or None for the world's random sizes.
    """

    def __init__(self, seed: int = LABELLED_SEED, n: int = DEFAULT_STREAM_N, size: Optional[Sequence[int]] = None):
        self.seed = _check_count("seed", seed, 0)
        self.n = _check_count("n", n, 1)
        self.size = None if size is None else tuple(int(v) for v in size)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"{STREAM_PREFIX}{self.seed}:{self.n}"

    def scene(self, i: int):
        """The :class:`~samantic.train.data.panoptic.PanopticScene` of item ``i``."""
        from samantic.train.data.panoptic import render_panoptic

        if not 0 <= i < self.n:
            raise IndexError(f"item {i} of a labelled set of {self.n}")
        return render_panoptic(self.seed + i, size=self.size)

    def __getitem__(self, i: int) -> Sample:
        scene = self.scene(i)
        masks, tasks = scene_task_masks(scene)
        return Sample(scene.image, masks, tasks=tasks)


def _read_coco(path: Path) -> Tuple[Dict[int, dict], Dict[int, List[dict]]]:
    data = json.loads(path.read_text())
    images = {int(im["id"]): im for im in data["images"]}
    anns: Dict[int, List[dict]] = {i: [] for i in images}
    for a in data["annotations"]:
        anns.setdefault(int(a["image_id"]), []).append(a)
    return images, anns


def _decode(anns: List[dict], shape: Tuple[int, int]) -> np.ndarray:
    from samantic.ops import rle_decode

    if not anns:
        return np.zeros((0,) + tuple(shape), bool)
    return rle_decode([a["segmentation"] for a in anns]).astype(bool)


class LabelledFolder:
    """A labelled set written by ``samantic data shapes --kind panoptic`` (``images/``, ``instances.json``,
    ``salient.json``, ``entities.json``, ``parts.json``); items as :class:`LabelledScenes`'."""

    FILES = ("instances.json", "salient.json", "entities.json", "parts.json")

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        missing = [f for f in self.FILES if not (self.root / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.root}: no {', '.join(missing)} (write a labelled set with "
                                    "`samantic data shapes --kind panoptic`)")
        self.images, self.instances = _read_coco(self.root / "instances.json")
        _, self.salient = _read_coco(self.root / "salient.json")
        _, self.entities = _read_coco(self.root / "entities.json")
        _, self.parts = _read_coco(self.root / "parts.json")
        self.ids = sorted(self.images)
        if not self.ids:
            raise ValueError(f"{self.root}: the dataset has no images")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return str(self.root)

    def __getitem__(self, i: int) -> Sample:
        from samantic.io import read_image

        record = self.images[self.ids[i]]
        image = read_image(self.root / "images" / record["file_name"])
        shape = image.shape[:2]
        things = sorted(self.instances[record["id"]], key=lambda a: a["id"])
        parts = self.parts.get(record["id"], [])
        # the part task: a composite's parts, a simple thing itself
        part_anns: List[dict] = []
        for thing in things:
            own = [p for p in parts if p.get("instance_id") == thing["id"]]
            part_anns += own if own else [thing]
        groups = [(things, UNSPECIFIED), (self.salient.get(record["id"], []), SALIENT),
                  (self.entities.get(record["id"], []), ENTITY), (part_anns, PART)]
        masks = np.concatenate([_decode(a, shape) for a, _ in groups])
        tasks = np.concatenate([np.full(len(a), t, np.int64) for a, t in groups])
        return Sample(image, masks, tasks=tasks)


def open_labelled(spec: Union[str, Path, LabelledScenes, LabelledFolder]) -> Union[LabelledScenes, LabelledFolder]:
    """``DIR`` or ``shapes-panoptic:SEED[:N]`` (N scenes rendered on the fly, default 100) as a labelled set."""
    if isinstance(spec, (LabelledScenes, LabelledFolder)):
        return spec
    stream = _parse_stream(str(spec), "the labelled set")
    return LabelledScenes(*stream) if stream else LabelledFolder(spec)


# ---------------------------------------------------------------- unlabelled pool


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class UnlabelledPool:
    """Images without labels: v2 scenes rendered on the fly, or the image files of a folder.

    The pool keeps a seed range or a list of image paths and nothing else: item ``i`` is the
    uint8 RGB image ``[H, W, 3]``; a rendered scene's masks are dropped the moment it is
    rendered, and a folder's annotation files are never opened. Evaluation reaches the
    ground truth through :class:`PoolGroundTruth` only.

    Args:
        seed: first seed of a rendered pool (default :data:`POOL_SEED`); ignored with ``root``.
        n: number of rendered scenes.
        size: ``(H, W)`` of every rendered scene, or None for random sizes.
        root: a folder of images (``root/images/*`` when it has that subfolder, else ``root/*``).
    """

    def __init__(self, seed: int = POOL_SEED, n: int = DEFAULT_STREAM_N, size: Optional[Sequence[int]] = None,
                 *, root: Optional[PathLike] = None) -> None:
        self.size = None if size is None else tuple(int(v) for v in size)
        if root is None:
            self.seed = _check_count("seed", seed, 0)
            self.files: Optional[List[Path]] = None
            self.n = _check_count("n", n, 1)
            return
        folder = Path(root)
        if (folder / "images").is_dir():
            folder = folder / "images"
        if not folder.is_dir():
            raise FileNotFoundError(f"{root}: no such folder of images")
        self.seed = None
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"{folder}: no images ({', '.join(_IMAGE_SUFFIXES)})")
        self.n = len(self.files)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"{STREAM_PREFIX}{self.seed}:{self.n}" if self.files is None else str(self.files[0].parent)

    def key(self, i: int) -> str:
        """Where item ``i`` comes from: ``shapes-panoptic:SEED`` or the image's path."""
        if not 0 <= i < self.n:
            raise IndexError(f"item {i} of a pool of {self.n}")
        return f"{STREAM_PREFIX}{self.seed + i}" if self.files is None else str(self.files[i])

    def __getitem__(self, i: int) -> np.ndarray:
        key = self.key(i)
        if self.files is not None:
            from samantic.io import read_image

            return read_image(key)
        from samantic.train.data.panoptic import render_panoptic

        return render_panoptic(self.seed + i, size=self.size).image


def open_pool(spec: Union[str, Path, UnlabelledPool], size: Optional[Sequence[int]] = None) -> UnlabelledPool:
    """``DIR`` (its images) or ``shapes-panoptic:SEED[:N]`` as an :class:`UnlabelledPool`."""
    if isinstance(spec, UnlabelledPool):
        return spec
    stream = _parse_stream(str(spec), "the unlabelled pool")
    return UnlabelledPool(*stream, size=size) if stream else UnlabelledPool(root=spec)


class PoolGroundTruth:
    """The evaluation accessor of a pool's ground truth: the only way to it, for evaluation only.

    Item ``i`` is bool ``[G, H, W]``: every segment a pseudo-label of image ``i`` may be trying
    to be: the entities (things whole, stuff regions) and the parts of composite things. For a
    rendered pool the scene is rendered again; for a folder, ``entities.json`` and ``parts.json``
    beside its ``images/`` are read (written by ``samantic data shapes --kind panoptic``).
    """

    def __init__(self, pool: UnlabelledPool) -> None:
        self.pool = pool
        self._folder = None
        if pool.files is not None:
            root = pool.files[0].parent
            root = root.parent if root.name == "images" else root
            if not (root / "entities.json").is_file():
                raise FileNotFoundError(f"{root}: no entities.json, so no ground truth to evaluate against")
            images, entities = _read_coco(root / "entities.json")
            parts = _read_coco(root / "parts.json")[1] if (root / "parts.json").is_file() else {}
            by_name = {im["file_name"]: i for i, im in images.items()}
            self._folder = (by_name, entities, parts)

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._folder is None:
            from samantic.train.data.panoptic import render_panoptic

            scene = render_panoptic(self.pool.seed + i, size=self.pool.size)
            return np.concatenate([scene.entity_masks, scene.part_masks])
        by_name, entities, parts = self._folder
        path = self.pool.files[i]
        if path.name not in by_name:
            raise KeyError(f"{path.name}: not in entities.json")
        image_id = by_name[path.name]
        shape = self.pool[i].shape[:2]
        return np.concatenate([_decode(entities.get(image_id, []), shape), _decode(parts.get(image_id, []), shape)])


# ---------------------------------------------------------------- pseudo-labels


def upscale_logits(low_res: torch.Tensor, input_size: Sequence[int], size: Sequence[int],
                   img_size: int) -> torch.Tensor:
    """segment-anything's ``Sam.postprocess_masks``: low-res logits ``[K, L, L]`` to image logits ``[K, H, W]``
    (bilinear to the input frame, padding cropped, bilinear to the image)."""
    x = low_res[:, None].float()
    x = F.interpolate(x, (int(img_size), int(img_size)), mode="bilinear", align_corners=False)
    x = x[..., : int(input_size[0]), : int(input_size[1])]
    return F.interpolate(x, (int(size[0]), int(size[1])), mode="bilinear", align_corners=False)[:, 0]


@dataclass
class PseudoLabels:
    """The pseudo-labels of one image (one cache entry; arrays as the module docstring lists them)."""

    logits: np.ndarray
    iou_preds: np.ndarray
    stability: np.ndarray
    points: np.ndarray
    boxes: np.ndarray
    size: Tuple[int, int]
    input_size: Tuple[int, int]
    img_size: int
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.logits)

    def image_logits(self) -> torch.Tensor:
        """float32 ``[K, H, W]``: the logits at image size (the generator's masks are ``> 0``)."""
        if not len(self):
            return torch.zeros((0,) + tuple(self.size))
        return upscale_logits(torch.from_numpy(self.logits), self.input_size, self.size, self.img_size)

    def probabilities(self) -> np.ndarray:
        """float32 ``[K, H, W]``: each pseudo-label's soft probability at image size."""
        return torch.sigmoid(self.image_logits()).numpy()

    def masks(self) -> np.ndarray:
        """bool ``[K, H, W]``: the pseudo-labels (probability > 0.5)."""
        return (self.image_logits() > 0).numpy()

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(
            buf, logits=self.logits.astype(np.float16), iou_preds=self.iou_preds.astype(np.float32),
            stability=self.stability.astype(np.float32), points=self.points.astype(np.float64),
            boxes=self.boxes.astype(np.int64), size=np.asarray(self.size, np.int64),
            input_size=np.asarray(self.input_size, np.int64), img_size=np.asarray(self.img_size, np.int64),
            meta=np.array(json.dumps(self.meta, sort_keys=True)),
        )
        return buf.getvalue()

    @staticmethod
    def from_file(path: PathLike) -> "PseudoLabels":
        with np.load(path, allow_pickle=False) as z:
            return PseudoLabels(
                logits=z["logits"], iou_preds=z["iou_preds"], stability=z["stability"], points=z["points"],
                boxes=z["boxes"], size=tuple(int(v) for v in z["size"]),
                input_size=tuple(int(v) for v in z["input_size"]), img_size=int(z["img_size"]),
                meta=json.loads(str(z["meta"])),
            )


class _LogitTap:
    """Wraps an :class:`~samantic.pipeline.engine.Engine` and, as the generator's ``mask_scorer``, tags every
    mask that reaches upscaling with the row its low-res logits are kept in.

    The generator calls the scorer on the masks that pass the IoU filter and then upscales exactly
    those, in that order; the tag (``logit_row``) rides through the later filters and NMS as a field.
    """

    def __init__(self, engine) -> None:
        self._engine = engine
        self.rows: List[np.ndarray] = []
        self.tagged = 0

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def upscale(self, out, prompt_idx, mask_idx) -> np.ndarray:
        low_res = self._engine.upscale(out, prompt_idx, mask_idx)
        self.rows.append(np.asarray(low_res, np.float16))
        return low_res

    def __call__(self, tokens, iou: np.ndarray):
        from samantic.pipeline.scoring import ScoredMasks

        k = len(iou)
        rows = np.arange(self.tagged, self.tagged + k, dtype=np.int64)
        self.tagged += k
        return ScoredMasks(np.ones(k, bool), {"logit_row": rows})

    def take(self) -> np.ndarray:
        """float16 ``[R, L, L]``: every upscaled mask since the last take."""
        rows = np.concatenate(self.rows) if self.rows else None
        if (0 if rows is None else len(rows)) != self.tagged:
            raise RuntimeError(f"{self.tagged} masks tagged but {0 if rows is None else len(rows)} upscaled")
        self.rows, self.tagged = [], 0
        return rows


class PseudoLabelCache:
    """Pseudo-labels of one model, grid and thresholds: the cache folder ``out_dir/<model_key>/``.

    Args:
        out_dir: cache root (created on the first write).
        model: a SAM from :func:`~samantic.models.create_model` (e.g. ``"sam_nano"``).
        points_per_side: the prompt grid is ``points_per_side`` squared.
        pred_iou_thresh, stability_score_thresh: None for the model's recommended ones
            (:func:`~samantic.models.recommended_thresholds`); the box NMS stays segment-anything's 0.7
            (``GENERATOR_OPTIONS``) whatever the model recommends, as the pseudo-labels were made.
        checkpoint: the file or tag the weights came from, for the record
            (:func:`~samantic.train.samcp_cache.weights_sha256`).
    """

    def __init__(self, out_dir: PathLike, model, *, points_per_side: int = 32,
                 pred_iou_thresh: Optional[float] = None, stability_score_thresh: Optional[float] = None,
                 checkpoint: Optional[PathLike] = None) -> None:
        from samantic import __version__
        from samantic.models import recommended_thresholds
        from samantic.train.samcp_cache import state_sha256, weights_sha256

        pps = _check_count("points_per_side", points_per_side, 1)
        recommended = recommended_thresholds(model)
        given = {"pred_iou_thresh": pred_iou_thresh, "stability_score_thresh": stability_score_thresh}
        for k, v in given.items():
            if v is not None and not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{k} must be in [0, 1], got {v!r}")
        thresholds = {k: float(recommended[k] if v is None else v) for k, v in given.items()}
        self.model = model
        name = getattr(model, "samantic_name", None) or type(model).__name__
        keyed = {"format": PSEUDO_FORMAT, "model": name, "state_sha256": state_sha256(model),
                 "points_per_side": pps, **thresholds, **GENERATOR_OPTIONS}
        side = int(model.image_encoder.img_size)
        if side != _config_side(name):  # the same weights at another input side label otherwise (keys at the
            keyed["img_size"] = side    # config's side are those written before the side was part of the key)
        digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
        self.key = f"{name}-{digest}"
        self.dir = Path(out_dir) / self.key
        self.metadata: Dict[str, Any] = {
            **keyed,
            "model_key": self.key,
            "thresholds_source": {k: "given" if v is not None else "model" for k, v in given.items()},
            "weights_sha256": weights_sha256(model, checkpoint),
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "samantic_version": __version__,
        }
        self._generator = None
        self._tap: Optional[_LogitTap] = None

    def __getstate__(self) -> Dict[str, Any]:
        """Pickled without the model (data workers read entries; computing one needs the model)."""
        state = dict(self.__dict__)
        state.update(model=None, _generator=None, _tap=None)
        return state

    def path(self, image: np.ndarray) -> Path:
        from samantic.train.samcp_cache import image_sha256

        return self.dir / f"{image_sha256(image)}.npz"

    def get(self, image: np.ndarray) -> Optional[PseudoLabels]:
        """The entry of ``image``, or None (a damaged or foreign entry counts as none)."""
        path = self.path(image)
        if not path.is_file():
            return None
        try:
            entry = PseudoLabels.from_file(path)
        except Exception:  # a damaged entry is recomputed, never trusted
            return None
        if entry.meta.get("model_key") != self.key or entry.meta.get("image_sha256") != path.stem:
            return None
        return entry

    def compute(self, image: np.ndarray, source: str = "") -> PseudoLabels:
        """Segments everything in ``image``, keeps the low-res logits of the kept masks and writes the entry."""
        from samantic.io import atomic_write_bytes, atomic_write_json
        from samantic.train.samcp_cache import image_sha256

        if self.model is None:
            raise RuntimeError(f"{self.dir}: no pseudo-label cached for this image, and this copy of the cache "
                               "has no model to compute one (build the cache before training: train_sum does)")
        if self._generator is None:
            from samantic.pipeline import AmgConfig, MaskGenerator
            from samantic.pipeline.amg import TorchEngine

            m = self.metadata
            self._tap = _LogitTap(TorchEngine(self.model))
            config = AmgConfig(points_per_side=m["points_per_side"], pred_iou_thresh=m["pred_iou_thresh"],
                               stability_score_thresh=m["stability_score_thresh"], **GENERATOR_OPTIONS)
            self._generator = MaskGenerator(self._tap, config, mask_scorer=self._tap)
        was_training = self.model.training
        self.model.eval()
        try:
            masks = self._generator.generate_masks(image)
        finally:
            self.model.train(was_training)
        rows = self._tap.take()
        keep = masks.fields.get("logit_row", np.zeros(0, np.int64)).astype(np.int64)
        img_size = int(self.model.image_encoder.img_size)
        low = int(self.model.prompt_encoder.mask_input_size[0])
        input_size = _input_size(image.shape[:2], img_size)
        digest = image_sha256(image)
        h, w = image.shape[:2]
        entry = PseudoLabels(
            logits=rows[keep] if len(keep) else np.zeros((0, low, low), np.float16),
            iou_preds=np.asarray(masks.iou_preds, np.float32),
            stability=np.asarray(masks.stability_score, np.float32),
            points=np.asarray(masks.points, np.float64).reshape(-1, 2),
            boxes=np.asarray(masks.boxes, np.int64).reshape(-1, 4),
            size=(h, w), input_size=input_size, img_size=img_size,
            meta={**self.metadata, "image_sha256": digest, "source": source},
        )
        if not (self.dir / "meta.json").is_file():
            atomic_write_json(self.dir / "meta.json", self.metadata, indent=2)
        atomic_write_bytes(self.dir / f"{digest}.npz", entry.to_bytes())
        return entry

    def get_or_compute(self, image: np.ndarray, source: str = "") -> PseudoLabels:
        entry = self.get(image)
        return self.compute(image, source) if entry is None else entry


def _config_side(name: str) -> Optional[int]:
    """The input side of registered model ``name``'s config (None for a model not registered)."""
    from samantic.models import get_config, list_models

    return int(get_config(name).img_size) if name in list_models() else None


def _input_size(size: Sequence[int], img_size: int) -> Tuple[int, int]:
    """(h, w) of an image resized so that its longest side is ``img_size`` (segment-anything's rounding)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    return tuple(int(v) for v in ResizeLongestSide.get_preprocess_shape(int(size[0]), int(size[1]), img_size))


@dataclass
class PseudoLabelReport:
    """What :func:`build_pseudo_labels` did: the cache folder and key, entries (source, path) in pool
    order, how many were computed now or reused, the masks over all entries, and the wall time."""

    dir: Path
    key: str
    metadata: Dict[str, Any]
    entries: List[Tuple[str, Path]] = field(default_factory=list)
    computed: int = 0
    reused: int = 0
    masks: int = 0
    seconds: float = 0.0


def build_pseudo_labels(model, pool: Union[str, Path, UnlabelledPool], out_dir: PathLike, *,
                        points_per_side: int = 32, pred_iou_thresh: Optional[float] = None,
                        stability_score_thresh: Optional[float] = None, checkpoint: Optional[PathLike] = None,
                        progress: bool = True) -> PseudoLabelReport:
    """Pseudo-labels every image of an unlabelled pool with the model's segment-everything, cached.

    Args:
        model: a SAM from :func:`~samantic.models.create_model`.
        pool: an :class:`UnlabelledPool`, ``DIR`` or ``shapes-panoptic:SEED[:N]``.
        out_dir: cache root; entries go to ``out_dir/<model_key>/<image_sha256>.npz``.
        points_per_side, pred_iou_thresh, stability_score_thresh, checkpoint: as :class:`PseudoLabelCache`.
        progress: show a progress bar on stderr (when it is a terminal).

    Returns:
        A :class:`PseudoLabelReport`; entries that exist already are reused, not recomputed.
    """
    start = time.perf_counter()
    pool = open_pool(pool)
    cache = PseudoLabelCache(out_dir, model, points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                             stability_score_thresh=stability_score_thresh, checkpoint=checkpoint)
    report = PseudoLabelReport(cache.dir, cache.key, cache.metadata)
    with progress_bar("pseudo-labels", progress, len(pool)) as advance:
        for i in range(len(pool)):
            image = pool[i]
            entry = cache.get(image)
            if entry is None:
                entry = cache.compute(image, pool.key(i))
                report.computed += 1
            else:
                report.reused += 1
            report.masks += len(entry)
            report.entries.append((pool.key(i), cache.path(image)))
            advance()
    report.seconds = time.perf_counter() - start
    return report


class PseudoLabelled:
    """The pool as training samples: item ``i`` has the pseudo-labels of image ``i`` as masks, task
    "unspecified", and, with ``uncertainty``, their uncertainty maps.

    Args:
        pool: an :class:`UnlabelledPool` (images only).
        cache: a :class:`PseudoLabelCache`; a missing entry is computed and written.
        uncertainty: ``f(image, PseudoLabels) -> float [K, H, W]`` in [0, 1] (e.g.
            :class:`~samantic.train.sum_refine.UncertaintyEstimator`), or None for no maps.
    """

    def __init__(self, pool: UnlabelledPool, cache: PseudoLabelCache,
                 uncertainty: Optional[Callable[[np.ndarray, PseudoLabels], np.ndarray]] = None) -> None:
        self.pool = pool
        self.cache = cache
        self.uncertainty = uncertainty

    def __len__(self) -> int:
        return len(self.pool)

    def __repr__(self) -> str:
        return f"pseudo({self.pool!r})"

    def __getitem__(self, i: int) -> Sample:
        image = self.pool[i]
        labels = self.cache.get_or_compute(image, self.pool.key(i))
        masks = labels.masks()
        unc = None
        if self.uncertainty is not None:
            unc = np.clip(np.asarray(self.uncertainty(image, labels), np.float32), 0.0, 1.0).astype(np.float16)
        return Sample(image, masks, tasks=np.full(len(masks), UNSPECIFIED, np.int64), uncertainty=unc)


@contextmanager
def progress_bar(label: str, enabled: bool, total: Optional[int]) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr (shown when it is a terminal); yields ``advance()``."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


# ---------------------------------------------------------------- uncertainty-aware prompts and loss


class UncertaintyPointSampler(PointSampler):
    """SUM's prompt placement: :class:`~samantic.train.sam.PointSampler` with pixel weights ``1 - U``.

    The first point lies inside the mask, the later ones inside the error region (the misses
    or the false alarms, whichever weighs more), each pixel drawn with probability
    proportional to ``1 - U``; a pixel with ``U = 1`` is never drawn while the region has
    any pixel with ``U < 1``. Without ``uncertainty`` (or with ``U = 0``) it draws as its base.
    A region whose every pixel has ``U = 1`` falls back to the base's choice (a mask with no
    trustworthy pixel still needs a prompt; :class:`UncertaintyMaskLoss` gives it no mask loss).
    """

    def first_points(self, gt: torch.Tensor, gen: torch.Generator,
                     uncertainty: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """gt: bool[M, H, W], uncertainty: float[M, H, W] in [0, 1] -> coords float[M, 1, 2] (x, y),
        labels int[M, 1]."""
        if uncertainty is None:
            return super().first_points(gt, gen)
        trust = _trust(uncertainty)
        weights = _prefer(gt * trust, gt.float())
        return self._sample(weights, torch.ones(len(gt), dtype=torch.int, device=gt.device), gen)

    def next_points(self, gt: torch.Tensor, pred: torch.Tensor, gen: torch.Generator,
                    uncertainty: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """One point per mask from the error region of ``pred`` (bool[M, H, W]), weighted by ``1 - U``."""
        if uncertainty is None:
            return super().next_points(gt, pred, gen)
        trust = _trust(uncertainty)
        fn = (gt & ~pred) * trust
        fp = (pred & ~gt) * trust
        mass_fn, mass_fp = fn.flatten(1).sum(1), fp.flatten(1).sum(1)
        positive = mass_fn >= mass_fp
        region = torch.where(positive[:, None, None], fn, fp)
        empty = region.flatten(1).sum(1) == 0
        # no trusted error: confirm with a trusted point inside, as the base does for a perfect prediction
        region[empty] = _prefer(gt[empty] * trust[empty], gt[empty].float())
        labels = (positive | empty).int()
        return self._sample(region, labels, gen)


def _trust(uncertainty: torch.Tensor) -> torch.Tensor:
    return (1.0 - uncertainty.float()).clamp(0.0, 1.0)


def _prefer(weights: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``weights`` per mask, or ``fallback`` for the masks whose weights are all zero."""
    none = weights.flatten(1).sum(1) == 0
    return torch.where(none[:, None, None], fallback, weights)


class UncertaintyMaskLoss(MaskLoss):
    """SUM's loss: focal weighted per pixel by ``1 - U`` plus dice on the pixels where ``1 - U > 0.5``.

    Same weights as :class:`~samantic.train.sam.MaskLoss` (focal 20 : dice 1 by default); the
    focal term is still the mean over all pixels (an uncertain pixel adds zero, it does not
    re-weight the rest), as in the authors' code. With ``U = 0`` (or no ``uncertainty``) it is
    exactly ``MaskLoss``; pixels with ``U = 1`` do not contribute at all.
    """

    def __init__(self, focal_weight: float = 20.0, dice_weight: float = 1.0, alpha: float = 0.25,
                 gamma: float = 2.0, dice_threshold: float = 0.5):
        super().__init__(focal_weight, dice_weight, alpha, gamma)
        if not 0.0 <= dice_threshold < 1.0:
            raise ValueError(f"dice_threshold must lie in [0, 1), got {dice_threshold}")
        self.dice_threshold = dice_threshold

    def __call__(self, logits: torch.Tensor, gt: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 uncertainty: Optional[torch.Tensor] = None) -> torch.Tensor:
        """logits, gt, uncertainty: [M, H, W] -> loss per mask [M]."""
        if uncertainty is None:
            return super().__call__(logits, gt, weight)
        trust = _trust(uncertainty)
        target = gt.float()
        p = torch.sigmoid(logits)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = p * target + (1 - p) * (1 - target)
        focal = ce * (1 - p_t) ** self.gamma
        focal = focal * (self.alpha * target + (1 - self.alpha) * (1 - target)) * trust
        keep = (trust > self.dice_threshold).float()
        if weight is not None:
            focal = focal * weight
            keep = keep * weight
        focal = focal.flatten(1).mean(1)
        p, target = p * keep, target * keep
        inter = (p * target).flatten(1).sum(1)
        dice = 1 - (2 * inter + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
        return self.focal_weight * focal + self.dice_weight * dice
