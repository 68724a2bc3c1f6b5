"""SAM-CP's patch cache: SAM's grid-prompted patches of each image and their overlaps with the ground truth.

SAM-CP labels and merges the patches that segment-everything finds. Its
training needs, per image, the patches (mask, box, predicted IoU, stability)
and how much of each patch lies in each ground-truth segment; both cost a full
segment-everything pass, so they are computed once, with the project's own
generator (:class:`~samantic.pipeline.AutomaticMaskGenerator`), and stored.

Layout::

    out_dir/<model_key>/meta.json            what the key stands for (model, weights, grid, thresholds)
    out_dir/<model_key>/<image_sha256>.npz   one entry per image

``model_key`` is ``<model name>-<12 hex digits>``, a digest of the model's
parameters (SHA-256 of its state dict), the grid and the generator's thresholds
and options: other weights or thresholds get another folder, so an old cache is
never read for them. ``image_sha256`` is the SHA-256 of the image's shape and
RGB pixels, so the same scene found in a dataset folder or rendered on the fly
shares its entry. Entries are written atomically and existing ones are reused,
so an interrupted build resumes where it stopped.

An entry (``numpy.load``, no pickle) holds, for P patches and G ground-truth
segments (thing instances and stuff regions of the panoptic annotation):

=================  ===============  ================================================
array              dtype, shape     meaning
=================  ===============  ================================================
patch_rle_bytes    uint8 [B]        compressed COCO RLE strings (ascii) back to back
patch_rle_offsets  int64 [P + 1]    patch i is ``patch_rle_bytes[o[i]:o[i + 1]]``
patch_boxes        int64 [P, 4]     XYXY, max inclusive
patch_iou          float32 [P]      SAM's predicted IoU
patch_stability    float32 [P]      stability score
patch_points       float64 [P, 2]   the grid point (x, y) that prompted the patch
patch_areas        int64 [P]        pixels
gt_rle_bytes       uint8 [B']       the segments' compressed RLEs, as above
gt_rle_offsets     int64 [G + 1]
gt_ids             int32 [G]        segment id in the panoptic PNG
gt_categories      int32 [G]        category id
gt_isthing         bool [G]         thing (True) or stuff region
gt_areas           int64 [G]        pixels
gt_boxes           int64 [G, 4]     XYXY, max inclusive
iop                float32 [P, G]   |patch & gt| / |patch|   (intersection over patch)
iog                float32 [P, G]   |patch & gt| / |gt|      (intersection over GT)
iou                float32 [P, G]   |patch & gt| / |patch | gt|
box_iop            float32 [P, G]   |patch box & gt box| / |patch box|  (boxes in pixels)
size               int64 [2]        (H, W)
meta               str (0-d)        JSON: meta.json's fields plus image_sha256, source, height, width
=================  ===============  ================================================

Thresholds default to the model's calibrated ones
(:func:`samantic.models.recommended_thresholds`), not the paper's 0.8 / 0.9; the box NMS stays
segment-anything's 0.7 whatever the model recommends (SAM-CP merges over-segmented patches; a lower
one would drop patches the head can use).
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

from samantic.models.weights import state_sha256

__all__ = [
    "CACHE_FORMAT",
    "CacheReport",
    "ConcatPanoptic",
    "GroundTruth",
    "PanopticFolder",
    "PanopticSample",
    "PanopticStream",
    "PatchCache",
    "Patches",
    "ShapesStream",
    "build_patch_cache",
    "image_sha256",
    "load_patches",
    "open_panoptic",
    "parse_stream",
    "patch_overlaps",
    "state_sha256",
    "weights_sha256",
]

CACHE_FORMAT = "samantic.samcp_patches/1"
STREAM_PREFIX = "shapes-panoptic:"
V1_STREAM_PREFIX = "shapes:"  # v1 scenes as panoptic samples (things only)
DEFAULT_STREAM_N = 100  # as `samantic data shapes --n`
# generator options besides the grid and thresholds; fixed here, recorded in every key
GENERATOR_OPTIONS = {"stability_score_offset": 1.0, "box_nms_thresh": 0.7, "crop_n_layers": 0,
                     "min_mask_region_area": 0}

PathLike = Union[str, Path]


# ---------------------------------------------------------------- datasets


@dataclass
class GroundTruth:
    """The segments of one panoptic image: thing instances and stuff regions.

    Attributes:
        rles: the segments' masks (:class:`~samantic.ops.RleBatch`, G of them).
        segment_ids: int32 [G], ids in the panoptic PNG.
        category_ids: int32 [G].
        isthing: bool [G].
    """

    rles: Any
    segment_ids: np.ndarray
    category_ids: np.ndarray
    isthing: np.ndarray

    def __len__(self) -> int:
        return len(self.segment_ids)

    @staticmethod
    def from_panoptic(panoptic: np.ndarray, segments: Sequence[Tuple[int, int]], thing_categories) -> "GroundTruth":
        """``panoptic``: int [H, W] segment ids; ``segments``: (id, category id) pairs."""
        from samantic.ops import rle_encode

        ids = np.array([s for s, _ in segments], np.int32)
        categories = np.array([c for _, c in segments], np.int32)
        masks = panoptic[None] == ids[:, None, None] if len(ids) else np.zeros((0,) + panoptic.shape, bool)
        isthing = np.array([int(c) in thing_categories for c in categories.tolist()], bool)
        return GroundTruth(rle_encode(masks), ids, categories, isthing)

    @staticmethod
    def from_scene(scene: Any, category_ids: Sequence[int]) -> "GroundTruth":
        """A v1 scene's objects (:func:`~samantic.train.data.shapes.render_scene`), all things, ids 1..n,
        with the given category id per object (its label mapped onto the caller's categories)."""
        from samantic.ops import rle_encode

        n = len(scene.labels)
        return GroundTruth(rle_encode(np.asarray(scene.masks, bool)), np.arange(1, n + 1, dtype=np.int32),
                           np.asarray(category_ids, np.int32).reshape(n), np.ones(n, bool))


@dataclass
class PanopticSample:
    """One image of a panoptic dataset with its ground truth; ``key`` names where it came from."""

    key: str
    image: np.ndarray
    gt: GroundTruth
    stuff_annotated: bool = True  # False: things only (v1 scenes); stuff classes are unknown, not absent


class PanopticFolder:
    """A dataset written by ``samantic data shapes --kind panoptic`` (or any COCO panoptic folder with
    ``panoptic.json``, ``images/`` and ``panoptic/``).

    :meth:`load` raises :class:`~samantic.io.ImageReadError` naming the file when an image or its
    panoptic PNG cannot be used.
    """

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        path = self.root / "panoptic.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.root}: no panoptic.json (write one with `samantic data shapes --kind panoptic`)"
            )
        try:
            data = json.loads(path.read_text())
            self.images = list(data["images"])
            self.annotations = {a["image_id"]: a for a in data["annotations"]}
            self.categories = [dict(c) for c in data["categories"]]
            self.things = {int(c["id"]) for c in self.categories if c.get("isthing", 1)}
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a COCO panoptic file ({e})") from None

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return str(self.root)

    def key(self, i: int) -> str:
        return str(self.root / "images" / self.images[i]["file_name"])

    def load(self, i: int) -> PanopticSample:
        from PIL import Image

        from samantic.io import ImageReadError, read_image

        record = self.images[i]
        image = read_image(self.key(i))
        ann = self.annotations.get(record["id"])
        if ann is None:
            raise ImageReadError(f"{self.key(i)}: no panoptic annotation for image id {record['id']}")
        png = self.root / "panoptic" / ann["file_name"]
        try:
            with Image.open(png) as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint32)
        except (OSError, ValueError) as e:
            raise ImageReadError(f"{png}: cannot read the panoptic PNG ({e})") from None
        if rgb.shape[:2] != image.shape[:2]:
            raise ImageReadError(f"{png}: panoptic PNG is {rgb.shape[1]}x{rgb.shape[0]}, "
                                 f"the image {image.shape[1]}x{image.shape[0]}")
        panoptic = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        segments = [(int(s["id"]), int(s["category_id"])) for s in ann["segments_info"]]
        return PanopticSample(self.key(i), image, GroundTruth.from_panoptic(panoptic, segments, self.things))


class _SeededScenes:
    """``n`` scenes rendered on the fly from seeds ``seed .. seed + n - 1`` (``size`` (H, W) or a random
    one), keyed ``PREFIX + seed``; subclasses render and annotate them (:meth:`load`)."""

    prefix = ""

    def __init__(self, seed: int, n: int, size: Optional[Sequence[int]] = None) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed, self.n, self.size = int(seed), int(n), size

    @property
    def categories(self) -> List[dict]:
        """The v2 world's COCO categories (``id``, ``name``, ``isthing``, ``supercategory``)."""
        from samantic.train.data.panoptic import CATEGORIES

        return [dict(c) for c in CATEGORIES]

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"{self.prefix}{self.seed}:{self.n}"

    def key(self, i: int) -> str:
        return f"{self.prefix}{self.seed + i}"

    def load(self, i: int) -> PanopticSample:
        raise NotImplementedError


class PanopticStream(_SeededScenes):
    """``n`` v2 scenes rendered on the fly from seeds ``seed .. seed + n - 1``
    (:func:`~samantic.train.data.panoptic.render_panoptic`; ``size`` (H, W) or a random one)."""

    prefix = STREAM_PREFIX

    def load(self, i: int) -> PanopticSample:
        from samantic.train.data.panoptic import CATEGORIES, render_panoptic

        scene = render_panoptic(self.seed + i, size=self.size)
        things = {c["id"] for c in CATEGORIES if c["isthing"]}
        gt = GroundTruth.from_panoptic(scene.panoptic, scene.segments, things)
        return PanopticSample(self.key(i), scene.image, gt)


class ShapesStream(_SeededScenes):
    """``n`` v1 scenes (:func:`~samantic.train.data.shapes.render_scene`, seeds ``seed .. seed + n - 1``;
    ``size`` (H, W) or a random one) as panoptic samples in the v2 vocabulary: their things carry the v2
    category of the same name, the background and the distractor blobs are unlabelled (no segment),
    there is no stuff.

    Mixed into a v2 set (``shapes-panoptic:A:N,shapes:B:M``) it shows a SAM-CP head the v1 shapes on
    v1 backgrounds, where it is asked to name them by class (``eval samcp --v1-seeds``).
    """

    prefix = V1_STREAM_PREFIX

    def load(self, i: int) -> PanopticSample:
        from samantic.train.data.panoptic import CATEGORIES
        from samantic.train.data.shapes import CLASSES, render_scene

        scene = render_scene(self.seed + i, size=self.size)
        ids = {c["name"]: int(c["id"]) for c in CATEGORIES}
        gt = GroundTruth.from_scene(scene, [ids[CLASSES[int(k)]] for k in scene.labels])
        return PanopticSample(self.key(i), scene.image, gt, stuff_annotated=False)


class ConcatPanoptic:
    """Several panoptic datasets one after another (``DIR,shapes-panoptic:S:N,shapes:S:M``).

    Their categories must agree: a name has one id and one ``isthing`` everywhere; the union is the
    vocabulary (a part without stuff, such as v1 scenes, simply never shows those classes).
    """

    def __init__(self, parts: Sequence[Any]) -> None:
        if not parts:
            raise ValueError("ConcatPanoptic needs at least one dataset")
        self.parts = list(parts)
        by_name: Dict[str, dict] = {}
        for part in self.parts:
            for c in part.categories:
                seen = by_name.setdefault(c["name"], dict(c))
                if int(seen["id"]) != int(c["id"]) or bool(seen.get("isthing", 1)) != bool(c.get("isthing", 1)):
                    raise ValueError(f"{part!r}: category {c['name']!r} is id {c['id']} (isthing "
                                     f"{c.get('isthing', 1)}), another dataset has id {seen['id']} (isthing "
                                     f"{seen.get('isthing', 1)}); datasets mixed together must share their ids")
        ids = [int(c["id"]) for c in by_name.values()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"datasets {self!r} give one category id to different names")
        self.categories = sorted(by_name.values(), key=lambda c: int(c["id"]))
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return ",".join(repr(p) for p in self.parts)

    def _locate(self, i: int) -> Tuple[Any, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k], i - int(self._starts[k])

    def key(self, i: int) -> str:
        part, j = self._locate(i)
        return part.key(j)

    def load(self, i: int) -> PanopticSample:
        part, j = self._locate(i)
        return part.load(j)


def parse_stream(text: str, prefix: str, lead: str, tail: str = "") -> Tuple[int, int]:
    """(seed, n) of ``PREFIX + SEED[:N]`` (N defaults to ``DEFAULT_STREAM_N``); a malformed spec raises
    ``ValueError(f"{lead} with SEED >= 0 and N >= 1{tail}, got {text!r}")``."""
    parts = text[len(prefix):].split(":")
    try:
        if len(parts) > 2:
            raise ValueError
        seed = int(parts[0])
        n = int(parts[1]) if len(parts) == 2 else DEFAULT_STREAM_N
        if seed < 0 or n < 1:
            raise ValueError
        return seed, n
    except ValueError:
        raise ValueError(f"{lead} with SEED >= 0 and N >= 1{tail}, got {text!r}") from None


def _parse_stream(text: str, prefix: str) -> Tuple[int, int]:
    return parse_stream(text, prefix, f"data spec must be DIR, {STREAM_PREFIX}SEED[:N] or {V1_STREAM_PREFIX}SEED[:N]",
                        " (several joined by commas)")


def open_panoptic(spec: Union[str, Path, PanopticFolder, PanopticStream, ShapesStream, ConcatPanoptic]
                  ) -> Union[PanopticFolder, PanopticStream, ShapesStream, ConcatPanoptic]:
    """``DIR`` (a panoptic dataset folder), ``shapes-panoptic:SEED[:N]`` (N v2 scenes rendered on the
    fly, default 100), ``shapes:SEED[:N]`` (N v1 scenes, things only, see :class:`ShapesStream`), or
    several of them joined by commas (:class:`ConcatPanoptic`); a dataset object is returned as it is."""
    if isinstance(spec, (PanopticFolder, _SeededScenes, ConcatPanoptic)):
        return spec
    text = str(spec)
    if "," in text and not Path(text).is_dir():
        items = [t.strip() for t in text.split(",")]
        if any(not t for t in items):
            raise ValueError(f"data spec {text!r} has an empty item between its commas")
        return ConcatPanoptic([open_panoptic(t) for t in items])
    if text.startswith(STREAM_PREFIX):
        return PanopticStream(*_parse_stream(text, STREAM_PREFIX))
    if text.startswith(V1_STREAM_PREFIX):
        return ShapesStream(*_parse_stream(text, V1_STREAM_PREFIX))
    return PanopticFolder(text)


# ---------------------------------------------------------------- keys


def image_sha256(image: np.ndarray) -> str:
    """SHA-256 (hex) of an image's shape and pixels: its cache key."""
    image = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{image.dtype.str}{list(image.shape)}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def weights_sha256(model, checkpoint: Optional[PathLike] = None) -> str:
    """SHA-256 of the file ``model``'s weights came from, for the record.

    Args:
        model: from :func:`~samantic.models.create_model`.
        checkpoint: the file or weight tag the weights were loaded from. None: the registry's
            default weights are recognised by content; anything else is recorded as ``"random"``
            (pass ``checkpoint`` for weights loaded by other means; the cache key is the state
            dict's own hash either way, so this label never decides a cache hit).
    """
    import torch

    from samantic.models import get_model_entry, read_state_dict, resolve_checkpoint
    from samantic.models.weights import file_sha256

    name = getattr(model, "samantic_name", None)
    if checkpoint is not None:
        return file_sha256(resolve_checkpoint(checkpoint, name, progress=False))
    default = get_model_entry(name).default_weights if name else None
    if default is None:
        return "random"
    path = resolve_checkpoint(default, name, progress=False)
    state, ours = read_state_dict(path), model.state_dict()
    same = state.keys() == ours.keys() and all(
        state[k].shape == v.shape and torch.equal(state[k].to(v.device, v.dtype), v) for k, v in ours.items()
    )
    return file_sha256(path) if same else "random"


# ---------------------------------------------------------------- overlaps


def patch_overlaps(patch_rles, patch_boxes: np.ndarray, gt_rles) -> Dict[str, np.ndarray]:
    """Overlaps of P patches with G ground-truth segments, from their RLEs (nothing decoded).

    Args:
        patch_rles: P RLEs (:class:`~samantic.ops.RleBatch` or COCO dicts).
        patch_boxes: int [P, 4] XYXY, max inclusive.
        gt_rles: G RLEs of the same size.

    Returns:
        ``iop``, ``iog``, ``iou``, ``box_iop`` float32 [P, G] (0 where a denominator is 0);
        ``patch_areas`` int64 [P], ``gt_areas`` int64 [G], ``gt_boxes`` int64 [G, 4] XYXY inclusive.
    """
    from samantic.ops import RleBatch, rle_area, rle_iou, rle_to_bbox

    p = patch_rles if isinstance(patch_rles, RleBatch) else RleBatch.from_dicts(patch_rles, "patch_rles")
    g = gt_rles if isinstance(gt_rles, RleBatch) else RleBatch.from_dicts(gt_rles, "gt_rles")
    boxes = np.asarray(patch_boxes, np.int64).reshape(-1, 4)
    if len(boxes) != len(p):
        raise ValueError(f"patch_boxes must have one row per patch ({len(p)}), got shape {list(boxes.shape)}")
    pa, ga = rle_area(p).astype(np.int64), rle_area(g).astype(np.int64)
    xywh = rle_to_bbox(g).astype(np.int64).reshape(-1, 4)
    gt_boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + np.maximum(xywh[:, 2:] - 1, 0)], axis=1)
    n_p, n_g = len(p), len(g)
    if n_p == 0 or n_g == 0:
        z = np.zeros((n_p, n_g), np.float32)
        return {"iop": z, "iog": z.copy(), "iou": z.copy(), "box_iop": z.copy(), "patch_areas": pa,
                "gt_areas": ga, "gt_boxes": gt_boxes}
    # every GT as a crowd region: pycocotools' "IoU" is then |patch & gt| / |patch|, exactly the intersection
    inter = np.rint(rle_iou(p, g, np.ones(n_g, np.uint8)) * pa[:, None]).astype(np.int64)
    union = pa[:, None] + ga[None, :] - inter
    lo = np.maximum(boxes[:, None, :2], gt_boxes[None, :, :2])
    hi = np.minimum(boxes[:, None, 2:], gt_boxes[None, :, 2:])
    box_inter = np.clip(hi - lo + 1, 0, None).prod(-1)
    box_area = (boxes[:, 2:] - boxes[:, :2] + 1).clip(0, None).prod(-1)
    return {
        "iop": _ratio(inter, pa[:, None]),
        "iog": _ratio(inter, ga[None, :]),
        "iou": _ratio(inter, union),
        "box_iop": _ratio(box_inter, box_area[:, None]),
        "patch_areas": pa,
        "gt_areas": ga,
        "gt_boxes": gt_boxes,
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.broadcast_arrays(num.astype(np.float64), den.astype(np.float64))
    out = np.zeros(num.shape, np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out.astype(np.float32)


# ---------------------------------------------------------------- entries


def _pack_strings(rles: List[dict]) -> Tuple[np.ndarray, np.ndarray]:
    data = [r["counts"].encode("ascii") if isinstance(r["counts"], str) else bytes(r["counts"]) for r in rles]
    offsets = np.zeros(len(data) + 1, np.int64)
    offsets[1:] = np.cumsum([len(d) for d in data])
    return np.frombuffer(b"".join(data), np.uint8).copy(), offsets


def _unpack_strings(data: np.ndarray, offsets: np.ndarray, size: Sequence[int]) -> List[dict]:
    raw = data.tobytes()
    h, w = (int(v) for v in size)
    return [{"size": [h, w], "counts": raw[offsets[i]:offsets[i + 1]].decode("ascii")} for i in range(len(offsets) - 1)]


@dataclass
class Patches:
    """One cache entry: P patches of an image and their overlaps with its G ground-truth segments.

    Arrays as the module docstring lists them; ``patch_rles`` and ``gt_rles`` are compressed COCO dicts.
    """

    patch_rles: List[dict]
    patch_boxes: np.ndarray
    patch_iou: np.ndarray
    patch_stability: np.ndarray
    patch_points: np.ndarray
    patch_areas: np.ndarray
    gt_rles: List[dict]
    gt_ids: np.ndarray
    gt_categories: np.ndarray
    gt_isthing: np.ndarray
    gt_areas: np.ndarray
    gt_boxes: np.ndarray
    iop: np.ndarray
    iog: np.ndarray
    iou: np.ndarray
    box_iop: np.ndarray
    size: Tuple[int, int]
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.patch_rles)

    def patch_batch(self):
        """The patches as an :class:`~samantic.ops.RleBatch` (the kernels' form)."""
        from samantic.ops import RleBatch

        return RleBatch.from_dicts(self.patch_rles, "patch_rles") if self.patch_rles else \
            RleBatch(np.zeros(0, np.uint32), np.zeros(1, np.int64), tuple(self.size))

    def to_bytes(self) -> bytes:
        pb, po = _pack_strings(self.patch_rles)
        gb, go = _pack_strings(self.gt_rles)
        buf = io.BytesIO()
        np.savez_compressed(
            buf, patch_rle_bytes=pb, patch_rle_offsets=po, patch_boxes=self.patch_boxes, patch_iou=self.patch_iou,
            patch_stability=self.patch_stability, patch_points=self.patch_points, patch_areas=self.patch_areas,
            gt_rle_bytes=gb, gt_rle_offsets=go, gt_ids=self.gt_ids, gt_categories=self.gt_categories,
            gt_isthing=self.gt_isthing, gt_areas=self.gt_areas, gt_boxes=self.gt_boxes, iop=self.iop, iog=self.iog,
            iou=self.iou, box_iop=self.box_iop, size=np.asarray(self.size, np.int64),
            meta=np.array(json.dumps(self.meta, sort_keys=True)),
        )
        return buf.getvalue()

    @staticmethod
    def from_file(path: PathLike) -> "Patches":
        with np.load(path, allow_pickle=False) as z:
            size = tuple(int(v) for v in z["size"])
            return Patches(
                patch_rles=_unpack_strings(z["patch_rle_bytes"], z["patch_rle_offsets"], size),
                patch_boxes=z["patch_boxes"], patch_iou=z["patch_iou"], patch_stability=z["patch_stability"],
                patch_points=z["patch_points"], patch_areas=z["patch_areas"],
                gt_rles=_unpack_strings(z["gt_rle_bytes"], z["gt_rle_offsets"], size),
                gt_ids=z["gt_ids"], gt_categories=z["gt_categories"], gt_isthing=z["gt_isthing"],
                gt_areas=z["gt_areas"], gt_boxes=z["gt_boxes"], iop=z["iop"], iog=z["iog"], iou=z["iou"],
                box_iop=z["box_iop"], size=size, meta=json.loads(str(z["meta"])),
            )


class PatchCache:
    """The cache folder of one model, grid and thresholds: ``out_dir/<model_key>/``.

    Args:
        out_dir: cache root (created on the first write).
        model: a SAM from :func:`~samantic.models.create_model`.
        points_per_side: the prompt grid is ``points_per_side`` squared.
        pred_iou_thresh, stability_score_thresh: None for the model's recommended ones.
        checkpoint: the file or tag the weights came from, for the record (see :func:`weights_sha256`).
    """

    def __init__(self, out_dir: PathLike, model, *, points_per_side: int = 32,
                 pred_iou_thresh: Optional[float] = None, stability_score_thresh: Optional[float] = None,
                 checkpoint: Optional[PathLike] = None) -> None:
        from samantic import __version__
        from samantic.models import recommended_thresholds

        pps = points_per_side
        if isinstance(pps, bool) or not isinstance(pps, (int, np.integer)) or pps < 1:
            raise ValueError(f"points_per_side must be a positive integer, got {points_per_side!r}")
        recommended = recommended_thresholds(model)
        given = {"pred_iou_thresh": pred_iou_thresh, "stability_score_thresh": stability_score_thresh}
        for k, v in given.items():
            if v is not None and not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{k} must be in [0, 1], got {v!r}")
        thresholds = {k: float(recommended[k] if v is None else v) for k, v in given.items()}
        self.model = model
        name = getattr(model, "samantic_name", None) or type(model).__name__
        keyed = {
            "format": CACHE_FORMAT,
            "model": name,
            "state_sha256": state_sha256(model),
            "points_per_side": int(points_per_side),
            **thresholds,
            **GENERATOR_OPTIONS,
        }
        digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
        self.key = f"{name}-{digest}"
        self.dir = Path(out_dir) / self.key
        self.metadata: Dict[str, Any] = {
            **keyed,
            "model_key": self.key,
            "grid": f"{int(points_per_side)}x{int(points_per_side)}",
            "thresholds_source": {k: "given" if v is not None else "model" for k, v in given.items()},
            "weights_sha256": weights_sha256(model, checkpoint),
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "samantic_version": __version__,
        }
        self._generator = None

    def path(self, image: np.ndarray) -> Path:
        return self.dir / f"{image_sha256(image)}.npz"

    def get(self, image: np.ndarray) -> Optional[Patches]:
        """The entry of ``image``, or None if there is none (a damaged or foreign entry counts as none)."""
        path = self.path(image)
        if not path.is_file():
            return None
        try:
            entry = Patches.from_file(path)
        except Exception:  # a damaged entry is recomputed, never trusted
            return None
        if entry.meta.get("model_key") != self.key or entry.meta.get("image_sha256") != path.stem:
            return None
        return entry

    def compute(self, sample: PanopticSample) -> Patches:
        """Segments everything in ``sample.image``, measures the overlaps and writes the entry."""
        from samantic.io import atomic_write_bytes, atomic_write_json

        if self._generator is None:
            from samantic.pipeline import AutomaticMaskGenerator

            m = self.metadata
            self._generator = AutomaticMaskGenerator(
                self.model, points_per_side=m["points_per_side"], pred_iou_thresh=m["pred_iou_thresh"],
                stability_score_thresh=m["stability_score_thresh"], **GENERATOR_OPTIONS)
        image = sample.image
        masks = self._generator.generate_masks(image)
        overlaps = patch_overlaps(masks.rles, masks.boxes, sample.gt.rles)
        h, w = image.shape[:2]
        digest = image_sha256(image)
        entry = Patches(
            patch_rles=masks.rles.to_dicts(compressed=True),
            patch_boxes=np.asarray(masks.boxes, np.int64).reshape(-1, 4),
            patch_iou=np.asarray(masks.iou_preds, np.float32),
            patch_stability=np.asarray(masks.stability_score, np.float32),
            patch_points=np.asarray(masks.points, np.float64).reshape(-1, 2),
            patch_areas=overlaps["patch_areas"],
            gt_rles=sample.gt.rles.to_dicts(compressed=True) if len(sample.gt) else [],
            gt_ids=np.asarray(sample.gt.segment_ids, np.int32),
            gt_categories=np.asarray(sample.gt.category_ids, np.int32),
            gt_isthing=np.asarray(sample.gt.isthing, bool),
            gt_areas=overlaps["gt_areas"],
            gt_boxes=overlaps["gt_boxes"],
            iop=overlaps["iop"], iog=overlaps["iog"], iou=overlaps["iou"], box_iop=overlaps["box_iop"],
            size=(h, w),
            meta={**self.metadata, "image_sha256": digest, "source": sample.key, "height": h, "width": w},
        )
        if not (self.dir / "meta.json").is_file():
            atomic_write_json(self.dir / "meta.json", self.metadata, indent=2)
        atomic_write_bytes(self.dir / f"{digest}.npz", entry.to_bytes())
        return entry


# ---------------------------------------------------------------- build and load


@dataclass
class CacheReport:
    """What :func:`build_patch_cache` did.

    Attributes:
        dir: the model's cache folder (``out_dir/<model_key>``).
        key: ``model_key``.
        metadata: the fields of ``meta.json``.
        entries: (source, entry path) of every image cached, in dataset order.
        computed, reused: how many entries were computed now and found from an earlier run.
        patches: patches over all entries.
        failed: (source, reason) of the images that could not be used.
        seconds: wall time.
    """

    dir: Path
    key: str
    metadata: Dict[str, Any]
    entries: List[Tuple[str, Path]] = field(default_factory=list)
    computed: int = 0
    reused: int = 0
    patches: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def build_patch_cache(
    model,
    dataset,
    out_dir: PathLike,
    *,
    points_per_side: int = 32,
    pred_iou_thresh: Optional[float] = None,
    stability_score_thresh: Optional[float] = None,
    checkpoint: Optional[PathLike] = None,
    progress: bool = True,
    on_error: Optional[Callable[[str, str], None]] = None,
    on_entry: Optional[Callable[[Any, "Patches"], None]] = None,
) -> CacheReport:
    """Caches the grid-prompted patches of every image of a panoptic dataset and their overlaps with its segments.

    Args:
        model: a SAM from :func:`~samantic.models.create_model`.
        dataset: ``DIR`` (written by ``samantic data shapes --kind panoptic``), ``shapes-panoptic:SEED[:N]``,
            ``shapes:SEED[:N]``, several joined by commas (:func:`open_panoptic`), or a dataset object.
        out_dir: cache root; entries go to ``out_dir/<model_key>/<image_sha256>.npz``.
        points_per_side: prompt grid side (the paper prompts 48 x 48; segment-anything's default is 32).
        pred_iou_thresh, stability_score_thresh: None for :func:`~samantic.models.recommended_thresholds`.
        checkpoint: the file or tag the weights came from, recorded as ``weights_sha256``.
        progress: show a progress bar on stderr (when it is a terminal).
        on_error: called with (source, reason) for an image that cannot be used; it is skipped either way.
        on_entry: called with (sample, entry) for every image cached or found in the cache, in the dataset's
            order: a caller that needs the images and their patches gets them without loading (rendering) each
            image, or reading its entry, a second time.

    Returns:
        A :class:`CacheReport`; entries that exist already are reused, not recomputed.

    Raises:
        ValueError, FileNotFoundError: a bad option or data spec.
    """
    from samantic.io import ImageReadError

    start = time.perf_counter()
    data = open_panoptic(dataset)
    cache = PatchCache(out_dir, model, points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                       stability_score_thresh=stability_score_thresh, checkpoint=checkpoint)
    report = CacheReport(cache.dir, cache.key, cache.metadata)
    with _progress_bar(progress, len(data)) as advance:
        for i in range(len(data)):
            # step: the image and its segments (a bad file is reported and skipped)
            try:
                sample = data.load(i)
            except (ImageReadError, OSError, ValueError) as e:
                reason = str(e)
                report.failed.append((data.key(i), reason))
                if on_error is not None:
                    on_error(data.key(i), reason)
                advance()
                continue
            # step: reuse the entry, else segment everything and measure the overlaps
            entry = cache.get(sample.image)
            if entry is None:
                entry = cache.compute(sample)
                report.computed += 1
            else:
                report.reused += 1
            report.patches += len(entry)
            report.entries.append((sample.key, cache.path(sample.image)))
            if on_entry is not None:
                on_entry(sample, entry)
            advance()
    report.seconds = time.perf_counter() - start
    return report


def load_patches(path: PathLike, image: Optional[np.ndarray] = None) -> Patches:
    """Reads one cache entry.

    Args:
        path: an entry file (``.npz``), or a model's cache folder (``out_dir/<model_key>``) with ``image``.
        image: uint8 RGB [H, W, 3]; its entry is found by :func:`image_sha256`.

    Raises:
        FileNotFoundError: no such entry.
        ValueError: ``path`` is a folder and no ``image`` was given.
    """
    p = Path(path)
    if p.is_dir():
        if image is None:
            raise ValueError(f"{p} is a cache folder: pass the image whose entry to load")
        p = p / f"{image_sha256(image)}.npz"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such cache entry")
    return Patches.from_file(p)


@contextmanager
def _progress_bar(enabled: bool, total: Optional[int]) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("patches"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("patches", total=total)
        yield lambda: bar.advance(task)
