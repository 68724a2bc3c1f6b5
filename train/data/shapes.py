"""The procedural shapes world: a seeded stand-in for text-to-image models and web crawls.

Seven classes of flat shapes in two superclasses (see ``DESIGN.md``, "The
procedural shapes world"):

=========  ==========================================================  =========
class      shape                                                       superclass
=========  ==========================================================  =========
circle     filled disk                                                 round
ring       annulus, inner radius 0.4-0.7 of outer; the hole is not     round
           part of the mask and shows what is behind
crescent   disk minus an overlapping offset disk                       round
triangle   filled triangle, every angle >= 30 degrees                  angular
square     filled square, any rotation                                 angular
star       five-pointed star, inner/outer radius 0.35-0.55             angular
cross      plus sign, arm width 0.25-0.4 of its length, any rotation   angular
=========  ==========================================================  =========

Two kinds of image:

- :func:`render_single`: one object, centred-ish, 20-70 % of the image side,
  maybe behind it a distractor blob or two: the single-object images U-SAM
  trains its classifier head on.
- :func:`render_scene`: 0-8 objects, 5-60 % of the image side, overlapping,
  with distractor blobs (which belong to no class) anywhere in the z-order:
  instance masks, semantic maps and superclass maps for evaluation and for
  SAM-CP / nano training.

Both are pure functions of their arguments: one ``numpy.random.Generator`` is
built from the seed and nothing else is random, so the same seed and arguments
give byte-identical images and masks (on one platform: other CPUs may take other
SIMD paths in numpy and OpenCV, and move a pixel value by one). Masks are drawn without anti-aliasing and
are exact; the image softens object edges by one pixel.

Occlusion is settled while placing, never by dropping: objects are placed back
to front and a candidate (object or blob) is rejected if it would leave any
earlier object with less than ``1 - MAX_OCCLUSION`` of its area or fewer than
``MIN_VISIBLE_AREA`` pixels visible. So every drawn object is an instance, and
every instance keeps at least 70 % of its area visible.

:func:`write_coco` and :func:`make_dataset` write a COCO dataset (images,
``instances.json`` with compressed RLE, semantic and superclass label PNGs).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

__all__ = [
    "ASPECT_RATIOS",
    "CLASSES",
    "KINDS",
    "SUPERCLASSES",
    "SUPERCLASS_NAMES",
    "Scene",
    "check_classes",
    "make_dataset",
    "render_scene",
    "render_single",
    "write_coco",
]

CLASSES: Tuple[str, ...] = ("circle", "ring", "crescent", "triangle", "square", "star", "cross")
SUPERCLASSES: Dict[str, str] = {
    "circle": "round",
    "ring": "round",
    "crescent": "round",
    "triangle": "angular",
    "square": "angular",
    "star": "angular",
    "cross": "angular",
}
SUPERCLASS_NAMES: Tuple[str, ...] = ("round", "angular")
KINDS: Tuple[str, ...] = ("single", "scenes")

# Image sizes: (width, height) ratios; sides within [MIN_SIDE, MAX_SIDE] for scenes,
# [MIN_SIDE, SINGLE_MAX_SIDE] for single-object images.
ASPECT_RATIOS: Tuple[Tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))
MIN_SIDE, MAX_SIDE, SINGLE_MAX_SIDE = 256, 1024, 512
# An explicit ``size`` may be smaller than MIN_SIDE (tests, thumbnails), not absurdly so.
SIZE_LIMITS = (64, 4096)

MAX_OBJECTS = 8
MAX_OCCLUSION = 0.3
MIN_VISIBLE_AREA = 16

# Object extent (diameter of the circumscribed circle) as a fraction of the short image side.
SCENE_OBJECT_FRACTION = (0.05, 0.6)
SINGLE_OBJECT_FRACTION = (0.2, 0.7)
SINGLE_CENTRE_JITTER = 0.1  # of each side
BLOB_FRACTION = (0.03, 0.1)
# Amplitudes of the 2nd, 3rd and 4th harmonics of a blob's radius: the 2nd keeps it elongated.
BLOB_HARMONICS = ((0.2, 0.35), (0.05, 0.2), (0.0, 0.1))
SCENE_MAX_BLOBS, SINGLE_MAX_BLOBS = 4, 2
PLACEMENT_TRIES = 30
SHRINK_EVERY, SHRINK = 3, 0.85  # failed placements shrink the candidate

# Shape parameters, relative to the outer radius (or the cross's length).
RING_INNER = (0.4, 0.7)
CRESCENT_BITE_RADIUS = (0.8, 1.0)
CRESCENT_BITE_OFFSET = (0.35, 0.6)
TRIANGLE_MIN_ANGLE = 30.0
STAR_INNER = (0.35, 0.55)
CROSS_ARM_WIDTH = (0.25, 0.4)

# Euclidean RGB distance an object's colours keep from the mean colour under it.
MIN_CONTRAST = 90.0
MIN_PATTERN_CONTRAST = 40.0  # between the two colours of a gradient / stripes / checkers
COLOUR_TRIES = 16

_PAD = 2  # empty border around a shape's mask box, room for the edge softening
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel vertex positions without anti-aliasing
_ONE = 1 << _SHIFT
_BYTE_STD = 256 / math.sqrt(12)  # of a uniform random byte
_FILLS = ("flat", "gradient", "stripes", "checkers", "noise")
_BACKGROUNDS = ("flat", "gradient", "noisy", "textured")

PathLike = Union[str, "Path"]
Size = Tuple[int, int]


@dataclass(frozen=True)
class Scene:
    """One rendered image with its ground truth.

    Attributes:
        image: uint8 ``[H, W, 3]`` RGB.
        masks: bool ``[N, H, W]``, the visible part of each instance, back to front
            (a later instance may hide part of an earlier one, never the reverse).
        labels: int64 ``[N]``, indices into :data:`CLASSES`.
        semantic: uint8 ``[H, W]``, 0 for background (and blobs), ``1 + class index`` elsewhere;
            equal to the COCO ``category_id``.
        superclass: uint8 ``[H, W]``, 0 background, ``1 + index`` into :data:`SUPERCLASS_NAMES`.
        seed: The seed the scene was rendered from.
        classes: Class names that were allowed in this image.
    """

    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    semantic: np.ndarray
    superclass: np.ndarray
    seed: int
    classes: Tuple[str, ...]

    @property
    def size(self) -> Size:
        """(H, W)."""
        return self.image.shape[0], self.image.shape[1]

    @property
    def names(self) -> Tuple[str, ...]:
        """Class name of each instance."""
        return tuple(CLASSES[int(i)] for i in self.labels)


# ---------------------------------------------------------------------------
# input checks


def check_classes(names: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    """Validates a list of class names against the vocabulary.

    Args:
        names: Class names, or one comma-separated string. Surrounding spaces and
            case are ignored.

    Returns:
        The names in the given order, normalised to lower case.

    Raises:
        ValueError: The list is empty, has duplicates or unknown names (the message
            lists the known classes and close matches).
    """
    if isinstance(names, str):
        names = names.split(",")
    cleaned = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"class names must be strings, got {name!r}; known classes: {', '.join(CLASSES)}")
        if name.strip():
            cleaned.append(name.strip().lower())
    if not cleaned:
        raise ValueError(f"no class names given; known classes: {', '.join(CLASSES)}")
    unknown = [n for n in cleaned if n not in SUPERCLASSES]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, CLASSES, n=2)
            hints.append(f"{n!r} (did you mean {' or '.join(close)}?)" if close else repr(n))
        raise ValueError(f"unknown class name(s) {', '.join(hints)}; known classes: {', '.join(CLASSES)}")
    duplicates = sorted({n for n in cleaned if cleaned.count(n) > 1}, key=CLASSES.index)
    if duplicates:
        raise ValueError(f"duplicate class name(s): {', '.join(duplicates)}")
    return tuple(cleaned)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_size(size: Sequence[int]) -> Size:
    lo, hi = SIZE_LIMITS
    try:
        h, w = (int(v) for v in size)
        ok = all(float(v) == int(v) for v in size) and lo <= h <= hi and lo <= w <= hi
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"size must be (height, width) with both sides in [{lo}, {hi}], got {size!r}")
    return h, w


def _random_size(rng: np.random.Generator, max_side: int) -> Size:
    rw, rh = ASPECT_RATIOS[rng.integers(len(ASPECT_RATIOS))]
    short_over_long = min(rw, rh) / max(rw, rh)
    long_side = int(rng.integers(math.ceil(MIN_SIDE / short_over_long), max_side + 1))
    short_side = int(long_side * short_over_long)
    return (long_side, short_side) if rh > rw else (short_side, long_side)


# ---------------------------------------------------------------------------
# shapes: uint8 masks in a square box of side ceil(extent) + 2 * _PAD, drawn without anti-aliasing


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(points * _ONE).astype(np.int32)


def _box(extent: float) -> Tuple[np.ndarray, np.ndarray]:
    side = int(math.ceil(extent)) + 2 * _PAD
    centre = np.array([(side - 1) / 2.0, (side - 1) / 2.0])
    return np.zeros((side, side), np.uint8), centre


def _disk(mask: np.ndarray, centre: np.ndarray, radius: float, value: int) -> None:
    cx, cy = _fixed(centre)
    cv2.circle(mask, (int(cx), int(cy)), int(round(radius * _ONE)), value, -1, cv2.LINE_8, _SHIFT)


def _polygon(mask: np.ndarray, centre: np.ndarray, points: np.ndarray, angle: float) -> None:
    c, s = math.cos(angle), math.sin(angle)
    rotated = points @ np.array([[c, s], [-s, c]]) + centre
    cv2.fillPoly(mask, [_fixed(rotated)], 1, cv2.LINE_8, _SHIFT)


def _polar(radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _keep_largest(mask: np.ndarray) -> None:
    count, parts, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    if count > 2:
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        mask[parts != largest] = 0


def _triangle_angles(rng: np.random.Generator) -> np.ndarray:
    free = 180.0 - 3 * TRIANGLE_MIN_ANGLE
    return TRIANGLE_MIN_ANGLE + free * rng.dirichlet((2.0, 2.0, 2.0))


def _shape_mask(rng: np.random.Generator, label: int, extent: float) -> np.ndarray:
    """Class ``label`` (or a blob for -1) whose circumscribed circle has diameter ``extent``."""
    mask, centre = _box(extent)
    r = extent / 2.0
    angle = rng.uniform(0.0, 2 * math.pi)
    name = CLASSES[label] if label >= 0 else "blob"
    if name == "circle":
        _disk(mask, centre, r, 1)
    elif name == "ring":
        _disk(mask, centre, r, 1)
        _disk(mask, centre, r * rng.uniform(*RING_INNER), 0)
    elif name == "crescent":
        _disk(mask, centre, r, 1)
        offset = r * rng.uniform(*CRESCENT_BITE_OFFSET) * np.array([math.cos(angle), math.sin(angle)])
        _disk(mask, centre + offset, r * rng.uniform(*CRESCENT_BITE_RADIUS), 0)
        _keep_largest(mask)  # rasterised horn tips can break off as stray pixels
    elif name == "triangle":
        # a vertex's angle is half the arc between the other two on the circumcircle
        a, b, _ = np.radians(_triangle_angles(rng))
        _polygon(mask, centre, _polar(np.full(3, r), np.array([0.0, 2 * a, 2 * a + 2 * b])), angle)
    elif name == "square":
        _polygon(mask, centre, _polar(np.full(4, r), np.arange(4) * (math.pi / 2)), angle)
    elif name == "star":
        radii = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(*STAR_INNER))
        _polygon(mask, centre, _polar(radii, np.arange(10) * (math.pi / 5)), angle)
    elif name == "cross":
        width = rng.uniform(*CROSS_ARM_WIDTH)
        h = r / math.sqrt(1.0 + width * width)  # half length: the arm's corners touch the circle
        t = h * width
        arm = [(t, h), (t, t), (h, t), (h, -t), (t, -t), (t, -h)]
        points = np.array(arm + [(-x, -y) for x, y in arm])
        _polygon(mask, centre, points, angle)
    else:  # blob: an elongated lumpy potato, so it never reads as one of the classes
        phi = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
        wobble = np.ones_like(phi)
        for k, (lo, hi) in zip((2, 3, 4), BLOB_HARMONICS):
            wobble += rng.uniform(lo, hi) * np.cos(k * phi + rng.uniform(0.0, 2 * math.pi))
        _polygon(mask, centre, _polar(r * wobble / wobble.max(), phi), angle)
    return mask


# ---------------------------------------------------------------------------
# appearance: float32 RGB in [0, 255]


def _ramp(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 ``[h, w]`` rising linearly from 0 to 1 in a random direction."""
    angle = rng.uniform(0.0, 2 * math.pi)
    c, s = math.cos(angle), math.sin(angle)
    corners = (0.0, (w - 1) * c, (h - 1) * s, (w - 1) * c + (h - 1) * s)
    lo, span = min(corners), max(max(corners) - min(corners), 1e-6)
    xs = (np.arange(w, dtype=np.float32) * np.float32(c / span) - np.float32(lo / span))[None, :]
    return xs + (np.arange(h, dtype=np.float32) * np.float32(s / span))[:, None]


def _grain(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """float32 ``[h, w]`` uniform noise with standard deviation ``sigma`` (random bytes: cheap)."""
    noise = np.frombuffer(rng.bytes(h * w), np.uint8).reshape(h, w).astype(np.float32)
    return (noise - np.float32(127.5)) * np.float32(sigma / _BYTE_STD)


def _blend(c1: np.ndarray, c2: np.ndarray, t: np.ndarray, grain: Optional[np.ndarray] = None) -> np.ndarray:
    """``c1 + t * (c2 - c1) + grain`` as float32 ``[h, w, 3]``: one cv2.transform, not numpy broadcasting."""
    if grain is None:
        return cv2.transform(t[..., None], np.stack([c2 - c1, c1], axis=1))
    matrix = np.stack([c2 - c1, np.ones(3, np.float32), c1], axis=1)
    return cv2.transform(cv2.merge([t, grain]), matrix)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, 3).astype(np.float32)


def _contrasting(rng: np.random.Generator, behind: np.ndarray, avoid: Optional[np.ndarray] = None) -> np.ndarray:
    """A colour far from ``behind`` (and from ``avoid``); the farthest tried if none is far enough."""
    best, best_score = None, -1.0
    for _ in range(COLOUR_TRIES):
        c = _colour(rng)
        score = float(np.linalg.norm(c - behind)) / MIN_CONTRAST
        if avoid is not None:
            score = min(score, float(np.linalg.norm(c - avoid)) / MIN_PATTERN_CONTRAST)
        if score >= 1.0:
            return c
        if score > best_score:
            best, best_score = c, score
    return best


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))]
    c1, c2 = _colour(rng), _colour(rng)
    if kind == "flat":
        return np.full((h, w, 3), c1, np.float32)
    if kind == "gradient":
        return _blend(c1, c2, _ramp(rng, h, w))
    if kind == "noisy":
        return _blend(c1, c2, _ramp(rng, h, w), _grain(rng, h, w, rng.uniform(8.0, 25.0)))
    # textured: smooth value noise, a coarse random grid blown up bicubically, plus fine grain
    cells = int(rng.integers(3, 13))
    coarse = rng.uniform(0.0, 1.0, (cells, max(2, round(cells * w / h)))).astype(np.float32)
    t = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return _blend(c1, c2, t, _grain(rng, h, w, rng.uniform(2.0, 8.0)))


def _fill(rng: np.random.Generator, side: int, behind: np.ndarray) -> np.ndarray:
    """An object's appearance over its ``[side, side]`` box, visible against the colour ``behind``."""
    kind = _FILLS[rng.integers(len(_FILLS))]
    c1 = _contrasting(rng, behind)
    if kind == "flat":
        return np.full((side, side, 3), c1, np.float32)
    if kind == "noise":
        return _blend(c1, c1, np.zeros((side, side), np.float32), _grain(rng, side, side, rng.uniform(10.0, 30.0)))
    c2 = _contrasting(rng, behind, avoid=c1)
    if kind == "gradient":
        return _blend(c1, c2, _ramp(rng, side, side))
    angle = rng.uniform(0.0, math.pi)
    c, s = math.cos(angle), math.sin(angle)
    xs, ys = np.arange(side, dtype=np.float32)[None, :], np.arange(side, dtype=np.float32)[:, None]
    period = rng.uniform(max(4.0, side / 10), max(6.0, side / 3))
    u = np.floor((xs * c + ys * s) / period)
    if kind == "checkers":
        u = u + np.floor((ys * c - xs * s) / period)
    return _blend(c1, c2, (u.astype(np.int64) % 2).astype(np.float32))


# ---------------------------------------------------------------------------
# layered canvas: painter's order with an owner map


class _Canvas:
    """An image under construction plus, per pixel, which layer is on top (1-based, 0: background)."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.owner = np.zeros(image.shape[:2], np.uint8)
        self.labels: List[int] = []  # class index per layer, -1 for a blob
        self.full: List[int] = []
        self.visible: List[int] = []

    def _hidden(self, mask: np.ndarray, y: int, x: int) -> np.ndarray:
        side = mask.shape[0]
        under = self.owner[y : y + side, x : x + side][mask.view(bool)]
        return np.bincount(under, minlength=len(self.labels) + 1)[1:]

    def fits(self, mask: np.ndarray, y: int, x: int) -> bool:
        """Whether a layer drawn here leaves every earlier object visible enough."""
        if int(np.count_nonzero(mask)) < MIN_VISIBLE_AREA:
            return False
        if not self.labels:
            return True
        left = np.array(self.visible) - self._hidden(mask, y, x)
        need = np.maximum((1.0 - MAX_OCCLUSION) * np.array(self.full), MIN_VISIBLE_AREA)
        return bool(np.all((left >= need) | (np.array(self.labels) < 0)))

    def behind(self, side: int, y: int, x: int) -> np.ndarray:
        return self.image[y : y + side : 4, x : x + side : 4].mean(axis=(0, 1))

    def paint(self, mask: np.ndarray, y: int, x: int, fill: np.ndarray, label: int) -> None:
        side = mask.shape[0]
        hidden = self._hidden(mask, y, x)
        # soft one-pixel edges in the image; the owner map (and so every mask) stays exact
        alpha = cv2.blur(mask.astype(np.float32), (3, 3))
        crop = self.image[y : y + side, x : x + side]
        crop[...] = cv2.blendLinear(fill, crop, alpha, 1.0 - alpha)
        self.owner[y : y + side, x : x + side][mask.view(bool)] = len(self.labels) + 1
        self.visible = [v - int(d) for v, d in zip(self.visible, hidden)]
        area = int(np.count_nonzero(mask))
        self.labels.append(label)
        self.full.append(area)
        self.visible.append(area)

    def place(
        self,
        rng: np.random.Generator,
        label: int,
        extent: float,
        min_extent: float,
        position: Optional[Callable[[int], Tuple[int, int]]] = None,
    ) -> bool:
        """Tries to draw a layer, shrinking it now and then; False if it found no room."""
        h, w = self.owner.shape
        for attempt in range(PLACEMENT_TRIES):
            if attempt and attempt % SHRINK_EVERY == 0:
                extent = max(extent * SHRINK, min_extent)
            mask = _shape_mask(rng, label, extent)
            side = mask.shape[0]
            if side > h or side > w:
                extent = max(min(h, w) - 2 * _PAD - 1, 1)
                continue
            if position is None:
                y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            else:
                y, x = position(side)
            if self.fits(mask, y, x):
                self.paint(mask, y, x, _fill(rng, side, self.behind(side, y, x)), label)
                return True
        return False

    def scene(self, seed: int, classes: Tuple[str, ...]) -> Scene:
        ids = np.array([i + 1 for i, label in enumerate(self.labels) if label >= 0], dtype=np.uint8)
        masks = self.owner[None] == ids[:, None, None]
        labels = np.array([self.labels[i - 1] for i in ids.tolist()], dtype=np.int64)
        semantic_lut = np.zeros(256, np.uint8)
        superclass_lut = np.zeros(256, np.uint8)
        for i, label in zip(ids.tolist(), labels.tolist()):
            semantic_lut[i] = label + 1
            superclass_lut[i] = SUPERCLASS_NAMES.index(SUPERCLASSES[CLASSES[label]]) + 1
        image = cv2.add(self.image, 0.0, dtype=cv2.CV_8U)  # rounds and saturates
        semantic = cv2.LUT(self.owner, semantic_lut)
        superclass = cv2.LUT(self.owner, superclass_lut)
        return Scene(image, masks, labels, semantic, superclass, seed, classes)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# ---------------------------------------------------------------------------
# public renderers


def render_single(class_name: str, seed: int, size: Optional[Sequence[int]] = None) -> Scene:
    """One object of ``class_name``: U-SAM's single-object training image.

    The object spans 20-70 % of the short side, near the centre, in front of 0-2
    distractor blobs. The random stream is seeded with ``(seed, class index)``, so
    equal seeds for different classes do not share colours and layout.

    Args:
        class_name: One of :data:`CLASSES`.
        seed: Non-negative integer.
        size: ``(H, W)``, or None for a random aspect ratio from :data:`ASPECT_RATIOS`
            with sides in [256, 512].

    Returns:
        A :class:`Scene` with exactly one instance.
    """
    (name,) = check_classes([class_name])
    seed = _check_seed(seed)
    label = CLASSES.index(name)
    rng = np.random.default_rng((seed, label))
    h, w = _random_size(rng, SINGLE_MAX_SIDE) if size is None else _check_size(size)
    side = min(h, w)
    canvas = _Canvas(_background(rng, h, w))
    # step: blobs first, so the object is never occluded
    for _ in range(int(rng.integers(0, SINGLE_MAX_BLOBS + 1))):
        canvas.place(rng, -1, rng.uniform(*BLOB_FRACTION) * side, BLOB_FRACTION[0] * side)
    # step: the object, near the centre
    jitter = rng.uniform(-SINGLE_CENTRE_JITTER, SINGLE_CENTRE_JITTER, 2) * (h, w)

    def centred(box: int) -> Tuple[int, int]:
        y = int(np.clip(round((h - box) / 2 + jitter[0]), 0, h - box))
        x = int(np.clip(round((w - box) / 2 + jitter[1]), 0, w - box))
        return y, x

    lo = SINGLE_OBJECT_FRACTION[0] * side
    if not canvas.place(rng, label, rng.uniform(*SINGLE_OBJECT_FRACTION) * side, lo, centred):
        raise RuntimeError(f"could not place a {name} in a {h}x{w} image (seed {seed})")  # unreachable
    return canvas.scene(seed, (name,))


def render_scene(
    seed: int,
    classes: Union[str, Sequence[str]] = CLASSES,
    n_objects: Optional[int] = None,
    size: Optional[Sequence[int]] = None,
) -> Scene:
    """A multi-object scene with instance, semantic and superclass ground truth.

    Objects (5-60 % of the short side, log-uniform) and 0-4 distractor blobs are
    placed in a random z-order at random positions. A placement that would hide
    more than ``MAX_OCCLUSION`` of an earlier object is retried elsewhere, and
    the candidate shrinks every few tries; an object that still finds no room is
    left out, so a crowded small image may hold fewer than ``n_objects``.

    Args:
        seed: Non-negative integer.
        classes: Allowed class names (objects are drawn uniformly from them).
        n_objects: Objects to place, 0-8; None for a uniform draw from 0-8.
        size: ``(H, W)``, or None for a random aspect ratio from :data:`ASPECT_RATIOS`
            with sides in [256, 1024].

    Returns:
        A :class:`Scene`; ``masks`` are in z-order, back to front.
    """
    allowed = check_classes(classes)
    seed = _check_seed(seed)
    if n_objects is not None and (
        isinstance(n_objects, bool) or not isinstance(n_objects, (int, np.integer)) or not 0 <= n_objects <= MAX_OBJECTS
    ):
        raise ValueError(f"n_objects must be an integer in [0, {MAX_OBJECTS}] or None, got {n_objects!r}")
    rng = np.random.default_rng(seed)
    h, w = _random_size(rng, MAX_SIDE) if size is None else _check_size(size)
    side = min(h, w)
    count = int(rng.integers(0, MAX_OBJECTS + 1)) if n_objects is None else int(n_objects)
    # step: what to draw, back to front
    labels = [CLASSES.index(allowed[i]) for i in rng.integers(0, len(allowed), count)]
    layers = rng.permutation(np.array(labels + [-1] * int(rng.integers(0, SCENE_MAX_BLOBS + 1)), dtype=np.int64))
    canvas = _Canvas(_background(rng, h, w))
    # step: place each layer where it hides no earlier object too much
    for label in layers.tolist():
        if label >= 0:
            lo = SCENE_OBJECT_FRACTION[0] * side
            extent = _log_uniform(rng, *SCENE_OBJECT_FRACTION) * side
        else:
            lo = BLOB_FRACTION[0] * side
            extent = rng.uniform(*BLOB_FRACTION) * side
        canvas.place(rng, label, extent, lo)
    return canvas.scene(seed, allowed)


# ---------------------------------------------------------------------------
# COCO output


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: Optional[int]) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("shapes"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task("shapes", total=total)
        yield lambda: bar.advance(task)


def write_coco(
    out_dir: PathLike,
    scenes: Iterable[Scene],
    classes: Union[str, Sequence[str]] = CLASSES,
    superclasses: bool = True,
    progress: bool = True,
    *,
    total: Optional[int] = None,
) -> Path:
    """Writes scenes as a COCO instance-segmentation dataset.

    Layout (image ``i`` of the iterator gets id ``i + 1``, file ``<id:06d>.png``)::

        out_dir/images/000001.png       RGB
        out_dir/semantic/000001.png     uint8 labels: 0 background, else the category_id
        out_dir/superclass/000001.png   uint8 labels: 0 background, 1 round, 2 angular
        out_dir/instances.json

    ``instances.json`` holds ``images`` (id, file_name, height, width, seed,
    semantic_file_name, superclass_file_name), ``annotations`` (compressed RLE
    with ``str`` counts, area, XYWH bbox, ``iscrowd`` 0), ``categories`` (id =
    1 + index in :data:`CLASSES`, so ids are stable across class subsets; name;
    supercategory) and ``superclass_categories``. Every file is written
    atomically; existing files of the same name are replaced.

    Args:
        out_dir: Dataset folder (created if missing).
        scenes: Scenes to write, e.g. a generator of :func:`render_scene` results.
        classes: Categories to declare; every instance's class must be among them.
        superclasses: Also write the superclass PNGs.
        progress: Show a rich progress bar on stderr (when it is a terminal).
        total: Number of scenes, for the progress bar (default: ``len(scenes)`` if it has one).

    Returns:
        Path of ``instances.json``.
    """
    from samantic.io import atomic_write_image, atomic_write_json
    from samantic.ops import rle_area, rle_encode, rle_to_bbox

    names = check_classes(classes)
    declared = {CLASSES.index(n) for n in names}
    if total is None and hasattr(scenes, "__len__"):
        total = len(scenes)
    out = Path(out_dir)
    images: List[dict] = []
    annotations: List[dict] = []
    with _progress_bar(progress, total) as advance:
        for index, scene in enumerate(scenes):
            image_id = index + 1
            stray = sorted({int(v) for v in scene.labels} - declared)
            if stray:
                raise ValueError(
                    f"scene {image_id} (seed {scene.seed}) has class(es) {', '.join(CLASSES[i] for i in stray)} "
                    f"that are not among the declared classes {', '.join(names)}"
                )
            file_name = f"{image_id:06d}.png"
            atomic_write_image(out / "images" / file_name, scene.image)
            atomic_write_image(out / "semantic" / file_name, scene.semantic)
            record = {
                "id": image_id,
                "file_name": file_name,
                "height": int(scene.image.shape[0]),
                "width": int(scene.image.shape[1]),
                "seed": int(scene.seed),
                "semantic_file_name": f"semantic/{file_name}",
            }
            if superclasses:
                atomic_write_image(out / "superclass" / file_name, scene.superclass)
                record["superclass_file_name"] = f"superclass/{file_name}"
            images.append(record)
            if len(scene.labels):
                rles = rle_encode(scene.masks)
                for rle, label, area, box in zip(
                    rles.to_dicts(compressed=True), scene.labels.tolist(), rle_area(rles), rle_to_bbox(rles)
                ):
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": image_id,
                            "category_id": label + 1,
                            "segmentation": rle,
                            "area": int(area),
                            "bbox": [float(v) for v in box],
                            "iscrowd": 0,
                        }
                    )
            advance()
    categories = [
        {"id": CLASSES.index(n) + 1, "name": n, "supercategory": SUPERCLASSES[n]}
        for n in sorted(names, key=CLASSES.index)
    ]
    dataset = {
        "info": {"description": "samantic procedural shapes world", "version": _version()},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
        "superclass_categories": [{"id": i + 1, "name": n} for i, n in enumerate(SUPERCLASS_NAMES)],
    }
    return atomic_write_json(out / "instances.json", dataset)


def _version() -> str:
    try:
        from samantic import __version__

        return str(__version__)
    except ImportError:
        return "unknown"


def make_dataset(
    out_dir: PathLike,
    kind: str = "scenes",
    classes: Union[str, Sequence[str]] = CLASSES,
    n: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Renders ``n`` images and writes them with :func:`write_coco`.

    Image ``i`` (0-based) is rendered from seed ``seed + i``, so any image can be
    regenerated alone from the ``seed`` stored in ``instances.json``. For
    ``kind="single"`` the classes take turns (image ``i`` shows
    ``classes[i % len(classes)]``), so each class gets ``n / len(classes)`` images
    (the first ``n % len(classes)`` classes one more).

    Args:
        out_dir: Dataset folder.
        kind: ``"scenes"`` (multi-object) or ``"single"`` (one object per image).
        classes: Class names to use.
        n: Total number of images, at least 1.
        seed: Non-negative base seed.
        progress: Show a progress bar.

    Returns:
        Path of ``instances.json``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    names = check_classes(classes)
    seed = _check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if kind == "single":
        scenes = (render_single(names[i % len(names)], seed + i) for i in range(n))
    else:
        scenes = (render_scene(seed + i, names) for i in range(n))
    return write_coco(out_dir, scenes, names, progress=progress, total=int(n))
