"""The shapes world v2: stuff, composite objects, parts, salience (panoptic scenes).

A v2 scene (see ``DESIGN.md``, "The shapes world v2") is a background split into
1-3 **stuff** regions by wavy, roughly horizontal or diagonal boundaries, with
1-8 **things** in front of it: the seven v1 classes of :mod:`.shapes` and three
composite classes made of two **parts** each. Exactly one thing is **salient**:
the largest, the most central and unoccluded (drawn last).

Categories (the ids of every JSON this module writes; thing ids 1-7 are v1's):

====  ========  ==============  =======  ======================================
id    name      supercategory   isthing  look / parts
====  ========  ==============  =======  ======================================
1     circle    round           1        v1 shapes and fills, any rotation
2     ring      round           1
3     crescent  round           1
4     triangle  angular         1
5     square    angular         1
6     star      angular         1
7     cross     angular         1
8     house     figure          1        body (square or wider rectangle) + roof (triangle on it)
9     snowman   figure          1        head (small disk) + torso (larger disk below, touching)
10    lollipop  figure          1        candy (disk) + stick (thin rectangle below the candy)
11    wall      stuff           0        flat colour or smooth gradient, faint vertical banding
12    floor     stuff           0        checkers or tiles on an axis-aligned grid, random colours and scale
13    grass     stuff           0        green-to-yellow fine noise with short strokes
14    water     stuff           0        blue-to-teal horizontal sinusoidal waves with noise
====  ========  ==============  =======  ======================================

Part categories (``parts.json``): 1 body, 2 roof (supercategory house), 3 head,
4 torso (snowman), 5 candy, 6 stick (lollipop). Composites keep v1's sizes but
turn at most 20 degrees, so a house stays upright; each part has its own fill.

Every pixel belongs to exactly one segment: there are no distractor blobs in v2
and the stuff regions tile the image, so the panoptic map has no void (id 0 is
reserved for it by the format and never used). Segment ids are small integers:
stuff regions ``1..S`` top to bottom (along the boundaries' normal), then things
``S+1..S+T`` back to front, so the salient thing has the largest id.

Placement runs front to back: the salient thing first, near the centre, then
every other thing behind what is already placed, kept only if at least
``1 - MAX_OCCLUSION`` of it (and :data:`MIN_VISIBLE_AREA` pixels of each of its
parts) stays visible, its area is at most :data:`MAX_AREA_VS_SALIENT` of the
salient one's and its visible centroid is farther from the image centre than
the salient one's. A thing's visible mask is final the moment it is placed.

:func:`render_panoptic` is a pure function of its arguments like v1's renderers,
but draws from its own random stream, ``numpy.random.default_rng((seed,
PANOPTIC_STREAM))``: v1 scenes are untouched, and v2 scene ``s`` shares no
random numbers with v1 scene ``s``. :func:`write_panoptic` and
:func:`make_panoptic_dataset` write COCO panoptic (PNG + JSON, panopticapi's
conventions) plus instance, part, entity and salient annotations (RLE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from samantic.train.data.shapes import (
    _PAD,
    CLASSES,
    COLOUR_TRIES,
    MAX_OCCLUSION,
    MAX_SIDE,
    MIN_PATTERN_CONTRAST,
    MIN_VISIBLE_AREA,
    PLACEMENT_TRIES,
    SHRINK,
    SHRINK_EVERY,
    SUPERCLASSES,
    PathLike,
    Size,
    _blend,
    _box,
    _Canvas,
    _check_seed,
    _check_size,
    _colour,
    _contrasting,
    _disk,
    _fill,
    _grain,
    _log_uniform,
    _polygon,
    _progress_bar,
    _random_size,
    _ramp,
    _shape_mask,
    _version,
)

__all__ = [
    "CATEGORIES",
    "COMPOSITE_PARTS",
    "PANOPTIC_STREAM",
    "PART_CATEGORIES",
    "PART_CLASSES",
    "STUFF_CLASSES",
    "THING_CLASSES",
    "THING_SUPERCLASSES",
    "PanopticScene",
    "make_panoptic_dataset",
    "render_panoptic",
    "write_panoptic",
]

COMPOSITE_PARTS: Dict[str, Tuple[str, str]] = {
    "house": ("body", "roof"),
    "snowman": ("head", "torso"),
    "lollipop": ("candy", "stick"),
}
THING_CLASSES: Tuple[str, ...] = CLASSES + tuple(COMPOSITE_PARTS)
STUFF_CLASSES: Tuple[str, ...] = ("wall", "floor", "grass", "water")
PART_CLASSES: Tuple[str, ...] = tuple(p for parts in COMPOSITE_PARTS.values() for p in parts)
THING_SUPERCLASSES: Dict[str, str] = {**SUPERCLASSES, **{name: "figure" for name in COMPOSITE_PARTS}}

# category ids: things 1-10 (v1's 1-7 first), stuff 11-14; parts 1-6 in their own file
CATEGORIES: Tuple[dict, ...] = tuple(
    [
        {"id": i + 1, "name": n, "supercategory": THING_SUPERCLASSES[n], "isthing": 1}
        for i, n in enumerate(THING_CLASSES)
    ]
    + [
        {"id": len(THING_CLASSES) + i + 1, "name": n, "supercategory": "stuff", "isthing": 0}
        for i, n in enumerate(STUFF_CLASSES)
    ]
)
PART_CATEGORIES: Tuple[dict, ...] = tuple(
    {"id": i + 1, "name": p, "supercategory": next(c for c, parts in COMPOSITE_PARTS.items() if p in parts)}
    for i, p in enumerate(PART_CLASSES)
)

# A tag no v1 renderer seeds with (render_scene: seed; render_single: (seed, class index 0-6)).
PANOPTIC_STREAM = 0x7632

MAX_THINGS = 8
MAX_STUFF_REGIONS = 3
MIN_STUFF_SHARE = 0.15  # of the image area, per region before the waves move the boundaries
STUFF_BOUNDARY_ANGLE = 40.0  # degrees from horizontal, either way
STUFF_WAVE = (0.01, 0.04)  # boundary wave amplitude, of the short side
STUFF_WAVE_GAP = 0.3  # at most this fraction of the gap to a neighbouring boundary, so boundaries never cross

# Extents (diameter of the circle around the thing's centre) as fractions of the short side.
SALIENT_FRACTION = (0.35, 0.55)
SALIENT_CENTRE_JITTER = 0.05  # of each side
OTHER_FRACTION = (0.06, 0.35)
COMPOSITE_MIN_FRACTION, COMPOSITE_MIN_EXTENT = 0.1, 24.0  # parts stay big enough to see
MAX_AREA_VS_SALIENT = 0.6
MAX_TILT = 20.0  # degrees a composite may turn

# Composite geometry (relative units; the whole is scaled to its extent afterwards).
HOUSE_BODY_ASPECT = (1.0, 1.6)  # width / height
HOUSE_ROOF_HEIGHT = (0.45, 0.8)  # of the body's height
HOUSE_ROOF_OVERHANG = (0.0, 0.12)  # of the body's width, each side
SNOWMAN_HEAD = (0.55, 0.75)  # head radius / torso radius
SNOWMAN_TOUCH = 0.9  # centre distance / sum of radii: the disks overlap a little, so the figure is one piece
LOLLIPOP_STICK_WIDTH = (0.14, 0.22)  # of the candy's radius
LOLLIPOP_STICK_LENGTH = (1.3, 2.0)  # below the candy, of its radius
MIN_STICK_PX = 2.0


@dataclass(frozen=True)
class PanopticScene:
    """One v2 image with its panoptic, instance, part, entity and salient ground truth.

    Attributes:
        image: uint8 ``[H, W, 3]`` RGB.
        panoptic: int32 ``[H, W]``, the segment id of every pixel (never 0: no void).
        masks: bool ``[T, H, W]``, the visible part of each thing, back to front; the salient thing last.
        labels: int64 ``[T]``, indices into :data:`THING_CLASSES` (category id = label + 1).
        thing_ids: int32 ``[T]``, each thing's segment id in ``panoptic``.
        stuff_masks: bool ``[S, H, W]``, the visible part of each stuff region, top to bottom.
        stuff_labels: int64 ``[S]``, indices into :data:`STUFF_CLASSES` (category id = 11 + label);
            each stuff class occurs at most once per scene.
        stuff_ids: int32 ``[S]``, each region's segment id in ``panoptic``.
        part_masks: bool ``[P, H, W]``, visible part masks of the composite things; the parts
            of a composite are disjoint and their union is the composite's mask.
        part_labels: int64 ``[P]``, indices into :data:`PART_CLASSES` (part category id = label + 1).
        part_of: int64 ``[P]``, index into ``masks`` of the thing each part belongs to.
        salient: Index into ``masks`` of the salient thing (always ``T - 1``).
        seed: The seed the scene was rendered from.
    """

    image: np.ndarray
    panoptic: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    thing_ids: np.ndarray
    stuff_masks: np.ndarray
    stuff_labels: np.ndarray
    stuff_ids: np.ndarray
    part_masks: np.ndarray
    part_labels: np.ndarray
    part_of: np.ndarray
    salient: int
    seed: int

    @property
    def size(self) -> Size:
        """(H, W)."""
        return self.image.shape[0], self.image.shape[1]

    @property
    def names(self) -> Tuple[str, ...]:
        """Class name of each thing."""
        return tuple(THING_CLASSES[int(i)] for i in self.labels)

    @property
    def stuff_names(self) -> Tuple[str, ...]:
        """Class name of each stuff region."""
        return tuple(STUFF_CLASSES[int(i)] for i in self.stuff_labels)

    @property
    def part_names(self) -> Tuple[str, ...]:
        """Part class name of each part."""
        return tuple(PART_CLASSES[int(i)] for i in self.part_labels)

    @property
    def salient_mask(self) -> np.ndarray:
        """bool ``[H, W]``: the salient thing's whole mask (it is never occluded)."""
        return self.masks[self.salient]

    @property
    def entity_masks(self) -> np.ndarray:
        """bool ``[T + S, H, W]``: every thing as a whole, then every stuff region."""
        return np.concatenate([self.masks, self.stuff_masks])

    @property
    def entity_category_ids(self) -> np.ndarray:
        """int64 ``[T + S]``: the category id of each of :attr:`entity_masks`."""
        return np.concatenate([self.labels + 1, self.stuff_labels + len(THING_CLASSES) + 1])

    @property
    def segments(self) -> Tuple[Tuple[int, int], ...]:
        """``(segment id, category id)`` of every segment in ``panoptic``, by id."""
        ids = np.concatenate([self.stuff_ids, self.thing_ids]).tolist()
        categories = np.concatenate([self.stuff_labels + len(THING_CLASSES) + 1, self.labels + 1]).tolist()
        return tuple(sorted(zip(ids, categories)))


# ---------------------------------------------------------------------------
# stuff: float32 RGB looks over the whole image, in [0, 255] give or take grain


def _jitter(rng: np.random.Generator, lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    return rng.uniform(lo, hi).astype(np.float32)


def _wall(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c1 = _colour(rng)
    c2 = np.clip(c1 + rng.uniform(-50.0, 50.0, 3), 0.0, 255.0).astype(np.float32)
    t = np.zeros((h, w), np.float32) if rng.random() < 0.5 else _ramp(rng, h, w)
    period = rng.uniform(max(4.0, min(h, w) / 40), max(8.0, min(h, w) / 8))
    xs = np.arange(w, dtype=np.float32)
    bands = rng.uniform(2.0, 6.0) * np.sin(2 * math.pi * xs / period + rng.uniform(0.0, 2 * math.pi))
    return _blend(c1, c2, t, np.ascontiguousarray(np.broadcast_to(bands.astype(np.float32), (h, w))))


def _floor(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c1 = _colour(rng)
    c2 = _contrasting(rng, c1)
    cell = rng.uniform(max(6.0, min(h, w) / 24), max(10.0, min(h, w) / 6))
    ys, xs = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    oy, ox = rng.uniform(0.0, cell, 2)
    iy, ix = np.floor((ys + oy) / cell).astype(np.int64), np.floor((xs + ox) / cell).astype(np.int64)
    grain = _grain(rng, h, w, rng.uniform(2.0, 5.0))
    if rng.random() < 0.5:  # checkers
        return _blend(c1, c2, ((iy + ix) % 2).astype(np.float32), grain)
    # tiles: grout lines of colour c2, each tile a little lighter or darker
    grout = max(1.0, cell * rng.uniform(0.05, 0.12))
    t = (((ys + oy) % cell < grout) | ((xs + ox) % cell < grout)).astype(np.float32)
    shade = rng.uniform(-12.0, 12.0, (int(iy.max()) + 1, int(ix.max()) + 1)).astype(np.float32)
    return _blend(c1, c2, t, grain + shade[iy, ix] * (1.0 - t))


def _grass(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    green = _jitter(rng, (30, 110, 20), (80, 170, 60))
    yellow = _jitter(rng, (160, 180, 40), (215, 225, 90))
    cells = int(rng.integers(4, 13))
    coarse = rng.uniform(0.0, 1.0, (cells, max(2, round(cells * w / h)))).astype(np.float32)
    t = np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
    image = _blend(green, yellow, t, _grain(rng, h, w, rng.uniform(8.0, 15.0)))
    # short, nearly vertical blades in a darker and a lighter shade
    length = max(3.0, min(h, w) * rng.uniform(0.01, 0.025))
    for shade in (0.7 * green, np.minimum(1.1 * yellow, 255.0)):
        n = int(h * w / rng.uniform(60.0, 120.0))
        start = rng.uniform((0.0, 0.0), (w, h), (n, 2))
        angle = rng.uniform(-0.4, 0.4, n)
        size = length * rng.uniform(0.5, 1.0, n)
        end = start + np.stack([size * np.sin(angle), -size * np.cos(angle)], axis=1)
        blades = np.round(np.stack([start, end], axis=1)).astype(np.int32)
        cv2.polylines(image, list(blades), False, tuple(float(c) for c in shade), 1, cv2.LINE_8)
    return image


def _water(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    blue = _jitter(rng, (20, 50, 150), (60, 110, 230))
    teal = _jitter(rng, (20, 130, 140), (70, 180, 190))
    side = min(h, w)
    ys, xs = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    sway = rng.uniform(0.01, 0.03) * side * np.sin(2 * math.pi * xs / (rng.uniform(0.2, 0.6) * w) + rng.uniform(0, 7))
    period = rng.uniform(max(6.0, side / 40), max(10.0, side / 12))
    t = 0.5 + 0.5 * np.sin(2 * math.pi * (ys + sway) / period + rng.uniform(0.0, 2 * math.pi))
    return _blend(blue, teal, t.astype(np.float32), _grain(rng, h, w, rng.uniform(4.0, 10.0)))


_LOOKS = {"wall": _wall, "floor": _floor, "grass": _grass, "water": _water}


def _stuff_regions(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, int]:
    """uint8 ``[H, W]`` region index 0..k-1 and k (1-3): regions split by wavy roughly horizontal or diagonal lines."""
    k = int(rng.integers(1, MAX_STUFF_REGIONS + 1))
    if k == 1:
        return np.zeros((h, w), np.uint8), k
    theta = math.radians(rng.uniform(-STUFF_BOUNDARY_ANGLE, STUFF_BOUNDARY_ANGLE))
    ys, xs = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    across = ys * math.cos(theta) - xs * math.sin(theta)  # grows downwards for a horizontal boundary
    along = xs * math.cos(theta) + ys * math.sin(theta)
    # boundaries at area quantiles, every region keeping MIN_STUFF_SHARE
    shares = MIN_STUFF_SHARE + (1.0 - k * MIN_STUFF_SHARE) * rng.dirichlet(np.ones(k))
    levels = np.quantile(across[::4, ::4], np.cumsum(shares)[:-1])
    bounds = np.concatenate([[-np.inf], levels, [np.inf]])
    side, long_side = min(h, w), max(h, w)
    region = np.zeros((h, w), np.uint8)
    for i, level in enumerate(levels.tolist()):
        gap = min(level - bounds[i], bounds[i + 2] - level)
        amp = min(rng.uniform(*STUFF_WAVE) * side, STUFF_WAVE_GAP * gap)
        # a long swell and a short ripple
        for share, wavelength in ((0.75, (0.3, 1.0)), (0.25, (0.05, 0.15))):
            phase = rng.uniform(0.0, 2 * math.pi)
            level = level + share * amp * np.sin(2 * math.pi * along / (rng.uniform(*wavelength) * long_side) + phase)
        region += (across > level).astype(np.uint8)
    _one_piece(region, k)
    return region, k


def _one_piece(region: np.ndarray, k: int) -> None:
    """Gives the specks a ripple cuts off at the image border to the region around them."""
    for r in range(k):
        count, pieces, stats, _ = cv2.connectedComponentsWithStats((region == r).astype(np.uint8), connectivity=4)
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        for piece in (pieces == p for p in range(1, count) if p != largest):
            ring = cv2.dilate(piece.astype(np.uint8), np.ones((3, 3), np.uint8)).view(bool) & ~piece
            votes = np.bincount(region[ring], minlength=k)
            votes[r] = -1
            region[piece] = int(np.argmax(votes))


# ---------------------------------------------------------------------------
# things: uint8 part maps (0 outside, 1 the first part or a simple thing, 2 the second part)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    # the same rotation shapes._polygon applies, for disk centres
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _composite(rng: np.random.Generator, name: str, extent: float) -> np.ndarray:
    """A composite thing whose circle around its box centre has diameter ``extent``, parts 1 and 2."""
    first, centre = _box(extent)
    second = np.zeros_like(first)
    angle = math.radians(rng.uniform(-MAX_TILT, MAX_TILT))
    if name == "house":
        bw = 1.0
        bh = bw / rng.uniform(*HOUSE_BODY_ASPECT)
        rb = bw * (1.0 + 2.0 * rng.uniform(*HOUSE_ROOF_OVERHANG))
        rh = bh * rng.uniform(*HOUSE_ROOF_HEIGHT)
        body = np.array([(-bw / 2, 0.0), (bw / 2, 0.0), (bw / 2, bh), (-bw / 2, bh)])
        roof = np.array([(-rb / 2, 0.0), (0.0, -rh), (rb / 2, 0.0)])
        mid = np.array([0.0, (bh - rh) / 2])
        scale = extent / 2 / np.linalg.norm(np.concatenate([body, roof]) - mid, axis=1).max()
        _polygon(first, centre, (body - mid) * scale, angle)
        _polygon(second, centre, (roof - mid) * scale, angle)
        first[second > 0] = 0  # the roof owns the seam
    elif name == "snowman":
        r = rng.uniform(*SNOWMAN_HEAD)
        head = np.array([0.0, -(1.0 + r) * SNOWMAN_TOUCH])
        mid = np.array([0.0, (1.0 + head[1] - r) / 2])
        scale = extent / 2 / max(np.linalg.norm(head - mid) + r, np.linalg.norm(mid) + 1.0)
        _disk(second, centre + _rotate(-mid * scale, angle), scale, 1)
        _disk(first, centre + _rotate((head - mid) * scale, angle), r * scale, 1)
        second[first > 0] = 0  # the head is drawn over the torso
    else:  # lollipop
        width = rng.uniform(*LOLLIPOP_STICK_WIDTH)
        length = rng.uniform(*LOLLIPOP_STICK_LENGTH)
        mid = np.array([0.0, length / 2])
        scale = extent / 2 / (1.0 + length / 2)
        half = max(width * scale, MIN_STICK_PX) / 2 / scale
        stick = np.array([(-half, 0.0), (half, 0.0), (half, 1.0 + length), (-half, 1.0 + length)])
        _polygon(second, centre, (stick - mid) * scale, angle)
        _disk(first, centre + _rotate(-mid * scale, angle), scale, 1)
        second[first > 0] = 0  # the stick disappears into the candy
    return first + 2 * second


def _thing_mask(rng: np.random.Generator, label: int, extent: float) -> np.ndarray:
    name = THING_CLASSES[label]
    return _composite(rng, name, extent) if name in COMPOSITE_PARTS else _shape_mask(rng, label, extent)


@dataclass
class _Placed:
    label: int
    parts: np.ndarray  # uint8 [side, side] part map
    y: int
    x: int


class _Layout:
    """Things placed front to back: what is in front of a new thing is already there."""

    def __init__(self, h: int, w: int) -> None:
        self.occupied = np.zeros((h, w), bool)
        self.placed: List[_Placed] = []
        self.salient_area = 0
        self.salient_distance = 0.0

    def _visible(self, parts: np.ndarray, y: int, x: int) -> np.ndarray:
        side = parts.shape[0]
        return np.where(self.occupied[y : y + side, x : x + side], 0, parts)

    def _distance(self, visible: np.ndarray, y: int, x: int) -> float:
        h, w = self.occupied.shape
        ys, xs = np.nonzero(visible)
        return math.hypot(ys.mean() + y - (h - 1) / 2, xs.mean() + x - (w - 1) / 2)

    def fits(self, parts: np.ndarray, y: int, x: int) -> bool:
        """Whether a thing placed here (behind everything placed so far) meets the rules."""
        visible = self._visible(parts, y, x)
        full = np.bincount(parts.ravel(), minlength=3)[1:]
        seen = np.bincount(visible.ravel(), minlength=3)[1:]
        used = full > 0
        if not used.any() or np.any(seen[used] < MIN_VISIBLE_AREA):
            return False
        if not self.placed:
            return True  # the salient thing: nothing in front of it
        if seen.sum() < (1.0 - MAX_OCCLUSION) * full.sum() or full.sum() > MAX_AREA_VS_SALIENT * self.salient_area:
            return False
        return self._distance(visible, y, x) > self.salient_distance

    def add(self, label: int, parts: np.ndarray, y: int, x: int) -> None:
        side = parts.shape[0]
        if not self.placed:
            self.salient_area = int(np.count_nonzero(parts))
            self.salient_distance = self._distance(parts, y, x)
        self.occupied[y : y + side, x : x + side] |= parts > 0
        self.placed.append(_Placed(label, parts, y, x))

    def place(
        self,
        rng: np.random.Generator,
        label: int,
        extent: float,
        min_extent: float,
        centre: Optional[Tuple[float, float]] = None,
    ) -> bool:
        """Tries to place a thing, shrinking it now and then; False if it found no room."""
        h, w = self.occupied.shape
        for attempt in range(PLACEMENT_TRIES):
            if attempt and attempt % SHRINK_EVERY == 0:
                extent = max(extent * SHRINK, min_extent)
            parts = _thing_mask(rng, label, extent)
            side = parts.shape[0]
            if side > h or side > w:
                extent = min_extent = max(min(h, w) - 2 * _PAD - 1, 1)
                continue
            if self.placed and np.count_nonzero(parts) > MAX_AREA_VS_SALIENT * self.salient_area:
                extent = max(extent * SHRINK, min_extent)
                continue
            if centre is None:
                y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            else:
                y = int(np.clip(round(centre[0] - (side - 1) / 2), 0, h - side))
                x = int(np.clip(round(centre[1] - (side - 1) / 2), 0, w - side))
            if self.fits(parts, y, x):
                self.add(label, parts, y, x)
                return True
        return False


def _paint_parts(rng: np.random.Generator, canvas: _Canvas, thing: _Placed) -> None:
    """Paints a thing's parts (one canvas layer each), each part with its own fill."""
    side = thing.parts.shape[0]
    behind = canvas.behind(side, thing.y, thing.x)
    previous = None
    for value in (1, 2):
        mask = (thing.parts == value).astype(np.uint8)
        if not mask.any():
            continue
        fill = _fill(rng, side, behind)
        if previous is not None:  # the second part must not melt into the first
            for _ in range(COLOUR_TRIES):
                if np.linalg.norm(fill[mask > 0].mean(axis=0) - previous) >= MIN_PATTERN_CONTRAST:
                    break
                fill = _fill(rng, side, behind)
        previous = fill[mask > 0].mean(axis=0)
        canvas.paint(mask, thing.y, thing.x, fill, thing.label)


# ---------------------------------------------------------------------------
# public renderer


def render_panoptic(seed: int, size: Optional[Sequence[int]] = None, n_things: Optional[int] = None) -> PanopticScene:
    """A v2 scene: 1-3 stuff regions, 1-8 things (composites with parts), one salient thing.

    Args:
        seed: Non-negative integer; the random stream is ``(seed, PANOPTIC_STREAM)``.
        size: ``(H, W)``, or None for a random aspect ratio from ``shapes.ASPECT_RATIOS``
            with sides in [256, 1024].
        n_things: Things to try to place, salient one included, 1-8; None for a uniform
            draw. The salient thing is always placed; another that finds no room
            behind the ones in front is left out.

    Returns:
        A :class:`PanopticScene`.
    """
    seed = _check_seed(seed)
    if n_things is not None and (
        isinstance(n_things, bool) or not isinstance(n_things, (int, np.integer)) or not 1 <= n_things <= MAX_THINGS
    ):
        raise ValueError(f"n_things must be an integer in [1, {MAX_THINGS}] or None, got {n_things!r}")
    rng = np.random.default_rng((seed, PANOPTIC_STREAM))
    h, w = _random_size(rng, MAX_SIDE) if size is None else _check_size(size)
    side = min(h, w)
    # step: stuff regions, each with its own class and look
    region, k = _stuff_regions(rng, h, w)
    stuff = rng.permutation(len(STUFF_CLASSES))[:k]
    image = np.empty((h, w, 3), np.float32)
    for r, s in enumerate(stuff.tolist()):
        np.copyto(image, _LOOKS[STUFF_CLASSES[s]](rng, h, w), where=(region == r)[..., None])
    # step: things front to back, the salient one first
    count = int(rng.integers(1, MAX_THINGS + 1)) if n_things is None else int(n_things)
    labels = rng.integers(0, len(THING_CLASSES), count).tolist()
    layout = _Layout(h, w)
    max_extent = side - 2 * _PAD - 1
    for i, label in enumerate(labels):
        composite = THING_CLASSES[label] in COMPOSITE_PARTS
        lo = max(COMPOSITE_MIN_FRACTION * side, COMPOSITE_MIN_EXTENT) if composite else OTHER_FRACTION[0] * side
        if i == 0:
            extent = min(max(rng.uniform(*SALIENT_FRACTION) * side, lo), max_extent)
            jitter = rng.uniform(-SALIENT_CENTRE_JITTER, SALIENT_CENTRE_JITTER, 2) * (h, w)
            centre = ((h - 1) / 2 + jitter[0], (w - 1) / 2 + jitter[1])
            if not layout.place(rng, label, extent, extent, centre):
                raise RuntimeError(f"could not place the salient {THING_CLASSES[label]} in {h}x{w} (seed {seed})")
        else:
            extent = max(_log_uniform(rng, *OTHER_FRACTION) * side, lo)
            layout.place(rng, label, min(extent, max_extent), min(lo, max_extent))
    # step: paint back to front over the stuff
    canvas = _Canvas(image)
    for thing in reversed(layout.placed):
        _paint_parts(rng, canvas, thing)
    return _ground_truth(canvas, layout, region, stuff, seed)


def _ground_truth(
    canvas: _Canvas, layout: _Layout, region: np.ndarray, stuff: np.ndarray, seed: int
) -> PanopticScene:
    # canvas layers are parts, back to front; map them to things (back to front) and part classes
    layer_thing, layer_part = [], []
    things = list(reversed(layout.placed))
    for t, thing in enumerate(things):
        name = THING_CLASSES[thing.label]
        for value in (1, 2):
            if np.any(thing.parts == value):
                layer_thing.append(t)
                part = COMPOSITE_PARTS[name][value - 1] if name in COMPOSITE_PARTS else None
                layer_part.append(PART_CLASSES.index(part) if part else -1)
    owner = canvas.owner
    layer_thing_lut = np.full(256, -1, np.int64)
    layer_thing_lut[1 : len(layer_thing) + 1] = layer_thing
    thing_of = layer_thing_lut[owner]
    n_things = len(things)
    masks = thing_of[None] == np.arange(n_things)[:, None, None]
    # stuff regions under no thing; a region a thing hides completely is no segment
    region_masks = (region[None] == np.arange(len(stuff))[:, None, None]) & (thing_of < 0)[None]
    kept = np.flatnonzero(region_masks.any(axis=(1, 2)))
    stuff_masks = region_masks[kept]
    stuff_labels = stuff[kept].astype(np.int64)
    stuff_ids = np.arange(1, len(kept) + 1, dtype=np.int32)
    thing_ids = np.arange(len(kept) + 1, len(kept) + 1 + n_things, dtype=np.int32)
    panoptic = np.zeros(owner.shape, np.int32)
    for i, m in zip(stuff_ids.tolist(), stuff_masks):
        panoptic[m] = i
    for i, m in zip(thing_ids.tolist(), masks):
        panoptic[m] = i
    parts = [(i + 1, p, t) for i, (t, p) in enumerate(zip(layer_thing, layer_part)) if p >= 0]
    part_masks = np.stack([owner == layer for layer, _, _ in parts]) if parts else np.zeros((0,) + owner.shape, bool)
    image = cv2.add(canvas.image, 0.0, dtype=cv2.CV_8U)  # rounds and saturates
    return PanopticScene(
        image=image,
        panoptic=panoptic,
        masks=masks,
        labels=np.array([t.label for t in things], np.int64),
        thing_ids=thing_ids,
        stuff_masks=stuff_masks,
        stuff_labels=stuff_labels,
        stuff_ids=stuff_ids,
        part_masks=part_masks,
        part_labels=np.array([p for _, p, _ in parts], np.int64),
        part_of=np.array([t for _, _, t in parts], np.int64),
        salient=n_things - 1,
        seed=seed,
    )


# ---------------------------------------------------------------------------
# COCO output


def _segments_info(scene: PanopticScene) -> List[dict]:
    info = []
    for segment_id, category_id in scene.segments:
        mask = scene.panoptic == segment_id
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x, y = int(cols[0]), int(rows[0])
        info.append(
            {
                "id": int(segment_id),
                "category_id": int(category_id),
                "iscrowd": 0,
                "area": int(np.count_nonzero(mask)),
                "bbox": [x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1],
            }
        )
    return info


def _rle_annotations(masks: np.ndarray, image_id: int, first_id: int, extra: Sequence[dict]) -> List[dict]:
    from samantic.ops import rle_area, rle_encode, rle_to_bbox

    if not len(masks):
        return []
    rles = rle_encode(masks)
    out = []
    for i, (rle, area, box, fields) in enumerate(
        zip(rles.to_dicts(compressed=True), rle_area(rles), rle_to_bbox(rles), extra)
    ):
        out.append(
            {
                "id": first_id + i,
                "image_id": image_id,
                **fields,
                "segmentation": rle,
                "area": int(area),
                "bbox": [float(v) for v in box],
                "iscrowd": 0,
            }
        )
    return out


def write_panoptic(
    out_dir: PathLike, scenes: Iterable[PanopticScene], progress: bool = True, *, total: Optional[int] = None
) -> Path:
    """Writes v2 scenes as COCO panoptic plus instance, part, entity and salient annotations.

    Layout (image ``i`` of the iterator gets id ``i + 1`` and files ``<id:06d>.png``)::

        out_dir/images/000001.png     RGB
        out_dir/panoptic/000001.png   segment ids as R + 256 G + 256^2 B (0 = void, unused)
        out_dir/panoptic.json         COCO panoptic: images, annotations (image_id, file_name,
                                      segments_info: id, category_id, iscrowd, area, bbox [x, y, w, h]),
                                      categories (id, name, supercategory, isthing)
        out_dir/instances.json        things: COCO instances, compressed RLE, the 10 thing categories
        out_dir/parts.json            parts of composites: part categories 1-6, ``instance_id`` of the thing
        out_dir/entities.json         every thing as a whole and every stuff region, all 14 categories
        out_dir/salient.json          one annotation per image: the salient thing (its thing category)

    Every annotation in ``instances``, ``entities`` and ``salient`` carries the
    ``segment_id`` of its segment in the panoptic PNG; ``images`` records carry the
    ``seed``. Every file is written atomically; files of the same name are replaced.

    Args:
        out_dir: Dataset folder (created if missing).
        scenes: Scenes to write, e.g. a generator of :func:`render_panoptic` results.
        progress: Show a rich progress bar on stderr (when it is a terminal).
        total: Number of scenes, for the progress bar (default: ``len(scenes)`` if it has one).

    Returns:
        Path of ``panoptic.json``.
    """
    from samantic.io import atomic_write_image, atomic_write_json
    from samantic.io.panoptic import id_to_rgb

    if total is None and hasattr(scenes, "__len__"):
        total = len(scenes)
    out = Path(out_dir)
    images: List[dict] = []
    panoptic: List[dict] = []
    instances: List[dict] = []
    parts: List[dict] = []
    entities: List[dict] = []
    salient: List[dict] = []
    with _progress_bar(progress, total) as advance:
        for index, scene in enumerate(scenes):
            image_id = index + 1
            file_name = f"{image_id:06d}.png"
            atomic_write_image(out / "images" / file_name, scene.image)
            atomic_write_image(out / "panoptic" / file_name, id_to_rgb(scene.panoptic))
            h, w = scene.size
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w, "seed": int(scene.seed)})
            panoptic.append({"image_id": image_id, "file_name": file_name, "segments_info": _segments_info(scene)})
            # step: things, then the parts of composites and the salient thing point at them
            first = len(instances) + 1
            instance_of = zip(scene.labels.tolist(), scene.thing_ids.tolist())
            thing = [{"category_id": c + 1, "segment_id": i} for c, i in instance_of]
            instances += _rle_annotations(scene.masks, image_id, first, thing)
            part_of = zip(scene.part_labels.tolist(), scene.part_of.tolist())
            owner = [{"category_id": p + 1, "instance_id": first + t} for p, t in part_of]
            parts += _rle_annotations(scene.part_masks, image_id, len(parts) + 1, owner)
            regions = zip(scene.stuff_labels.tolist(), scene.stuff_ids.tolist())
            stuff = [{"category_id": len(THING_CLASSES) + 1 + c, "segment_id": i} for c, i in regions]
            entities += _rle_annotations(scene.entity_masks, image_id, len(entities) + 1, thing + stuff)
            k = scene.salient
            one = [{**thing[k], "instance_id": first + k}]
            salient += _rle_annotations(scene.masks[k : k + 1], image_id, len(salient) + 1, one)
            advance()
    things = [c for c in CATEGORIES if c["isthing"]]
    categories, part_categories = list(CATEGORIES), list(PART_CATEGORIES)
    info = {"description": "samantic procedural shapes world v2 (panoptic)", "version": _version()}

    def dataset(annotations: List[dict], categories: Sequence[dict]) -> dict:
        return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}

    atomic_write_json(out / "instances.json", dataset(instances, things))
    atomic_write_json(out / "parts.json", dataset(parts, part_categories))
    atomic_write_json(out / "entities.json", dataset(entities, categories))
    atomic_write_json(out / "salient.json", dataset(salient, things))
    return atomic_write_json(out / "panoptic.json", dataset(panoptic, categories))


def make_panoptic_dataset(out_dir: PathLike, n: int = 100, seed: int = 0, progress: bool = True) -> Path:
    """Renders ``n`` v2 scenes (image ``i`` from seed ``seed + i``) and writes them with :func:`write_panoptic`.

    Args:
        out_dir: Dataset folder.
        n: Number of images, at least 1.
        seed: Non-negative base seed.
        progress: Show a progress bar.

    Returns:
        Path of ``panoptic.json``.
    """
    seed = _check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    scenes = (render_panoptic(seed + i) for i in range(n))
    return write_panoptic(out_dir, scenes, progress=progress, total=int(n))
