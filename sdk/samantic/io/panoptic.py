"""COCO panoptic files (PNG of RGB-encoded segment ids + JSON) and indexed semantic PNGs.

The conventions are COCO panoptic's, as panopticapi reads and writes them: a
segment id is ``R + 256 G + 256^2 B`` of its pixels, 0 is void (unlabelled), and
each ``segments_info`` entry has ``id``, ``category_id``, ``iscrowd``, ``area``
(pixels) and ``bbox`` (``[x, y, w, h]``, integers, of the segment's pixels).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from samantic.io.atomic import PathLike, atomic_write_image, atomic_write_json
from samantic.io.writers import write_label_png

__all__ = [
    "MAX_SEGMENT_ID",
    "id_to_rgb",
    "panoptic_to_semantic",
    "read_panoptic",
    "rgb_to_id",
    "write_panoptic",
    "write_segment_pngs",
    "write_semantic_png",
]

MAX_SEGMENT_ID = 256**3 - 1  # the largest id three 8-bit channels hold
_SEGMENT_KEYS = ("id", "category_id", "iscrowd", "area", "bbox")


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids as COCO panoptic colours.

    Args:
        ids: int ``[...]`` ids in ``0..MAX_SEGMENT_ID``.

    Returns:
        uint8 ``[..., 3]``: ``(id % 256, id // 256 % 256, id // 256^2)``.
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"segment ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"segment id {bad} does not fit a COCO panoptic PNG (0..{MAX_SEGMENT_ID})")
    ids = ids.astype(np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic colours as segment ids: int32 ``[...]`` from uint8 ``[..., 3]``, ``R + 256 G + 256^2 B``."""
    rgb = np.asarray(rgb)
    if rgb.ndim < 1 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"a panoptic colour image must be uint8 [..., 3], got {rgb.dtype} {rgb.shape}")
    c = rgb.astype(np.int32)
    return c[..., 0] + 256 * c[..., 1] + 65536 * c[..., 2]


def _segment_ids(panoptic: Any) -> np.ndarray:
    arr = np.asarray(panoptic)
    if arr.ndim != 2:
        raise ValueError(f"a panoptic map must be [H, W] segment ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"a panoptic map must hold integer segment ids, got dtype {arr.dtype}")
    return arr


def _areas_and_boxes(panoptic: np.ndarray) -> Dict[int, Tuple[int, List[int]]]:
    """``{id: (area, [x, y, w, h])}`` of every non-zero id in ``panoptic``, in one pass over the pixels."""
    ids, inverse, counts = np.unique(panoptic, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(panoptic.shape)
    n = len(ids)
    h, w = panoptic.shape
    x0, y0 = np.full(n, w), np.full(n, h)
    x1, y1 = np.full(n, -1), np.full(n, -1)
    cols = np.broadcast_to(np.arange(w), (h, w)).ravel()
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w)).ravel()
    flat = inverse.ravel()
    np.minimum.at(x0, flat, cols)
    np.minimum.at(y0, flat, rows)
    np.maximum.at(x1, flat, cols)
    np.maximum.at(y1, flat, rows)
    return {
        int(i): (int(a), [int(x0[k]), int(y0[k]), int(x1[k] - x0[k] + 1), int(y1[k] - y0[k] + 1)])
        for k, (i, a) in enumerate(zip(ids.tolist(), counts.tolist()))
        if i != 0
    }


def _check_categories(categories: Sequence[Mapping[str, Any]]) -> Dict[int, Mapping[str, Any]]:
    by_id: Dict[int, Mapping[str, Any]] = {}
    for i, c in enumerate(categories):
        missing = [k for k in ("id", "name", "isthing") if k not in c]
        if missing:
            raise ValueError(f"categories[{i}] lacks {missing}; COCO panoptic categories need 'id', 'name', 'isthing'")
        if int(c["id"]) in by_id:
            raise ValueError(f"category id {int(c['id'])} appears twice in categories")
        by_id[int(c["id"])] = c
    return by_id


def write_panoptic(
    png_path: PathLike,
    json_path: PathLike,
    panoptic: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    image_info: Mapping[str, Any],
    categories: Sequence[Mapping[str, Any]],
) -> Tuple[Path, Path]:
    """Writes one image's panoptic segmentation as a COCO panoptic PNG and JSON, atomically.

    The JSON is ``{"images": [image_info], "annotations": [{"image_id", "file_name",
    "segments_info"}], "categories": categories}``, with ``file_name`` the PNG's name.
    Each segment's ``area`` and ``bbox`` are measured on ``panoptic`` (input values are
    replaced); ``iscrowd`` defaults to 0; other keys (``score``, ``category_name``, ...)
    are kept after the standard ones. The PNG is written before the JSON that points at it.

    Args:
        png_path: Where the RGB-encoded ids go (``.png``).
        json_path: Where the JSON goes.
        panoptic: int ``[H, W]`` segment ids, 0 = void; ids up to :data:`MAX_SEGMENT_ID`.
        segments_info: One dict per segment with ``id`` and ``category_id``; exactly the
            non-zero ids of ``panoptic``, in the order the JSON lists them.
        image_info: The COCO image record; needs ``id``. ``height`` and ``width`` are
            filled in from ``panoptic`` (and must agree with it when given).
        categories: COCO panoptic categories (``id``, ``name``, ``isthing``, optionally
            ``supercategory``, ``color``), written as given.

    Returns:
        ``(png path, json path)``.

    Raises:
        ValueError: on a map that is not ``[H, W]`` integer ids in range, a segment id
            listed twice, listed without pixels or present in the map but not listed, an
            unknown ``category_id``, categories without ``id``/``name``/``isthing``, or an
            ``image_info`` without ``id`` or of another size.
    """
    panoptic = _segment_ids(panoptic)
    rgb = id_to_rgb(panoptic)  # range check first: nothing is written for a bad map
    known = _check_categories(categories)
    if "id" not in image_info:
        raise ValueError(f"image_info needs the image's 'id', got keys {sorted(image_info)}")
    h, w = panoptic.shape
    image = dict(image_info)
    for key, size in (("height", h), ("width", w)):
        if int(image.setdefault(key, size)) != size:
            raise ValueError(f"image_info {key}={image[key]} disagrees with the panoptic map's {size}")

    # step: segments, measured on the map
    measured = _areas_and_boxes(panoptic)
    seen = set()
    segments = []
    for i, seg in enumerate(segments_info):
        if "id" not in seg or "category_id" not in seg:
            raise ValueError(f"segments_info[{i}] needs 'id' and 'category_id', got keys {sorted(seg)}")
        sid, cat = int(seg["id"]), int(seg["category_id"])
        if sid in seen:
            raise ValueError(f"segments_info lists segment id {sid} twice")
        seen.add(sid)
        if sid not in measured:
            raise ValueError(f"segments_info[{i}] has id {sid}, which has no pixels in the panoptic map")
        if cat not in known:
            raise ValueError(f"segments_info[{i}] (id {sid}) has unknown category_id {cat}; known: {sorted(known)}")
        area, bbox = measured[sid]
        extra = {k: v for k, v in seg.items() if k not in _SEGMENT_KEYS}
        segments.append({"id": sid, "category_id": cat, "iscrowd": int(seg.get("iscrowd", 0)),
                         "area": area, "bbox": bbox, **extra})
    unlisted = sorted(set(measured) - seen)
    if unlisted:
        raise ValueError(f"the panoptic map holds segment ids {unlisted[:10]} missing from segments_info")

    # step: PNG, then the JSON that names it
    png_path = atomic_write_image(png_path, rgb)
    annotation = {"image_id": image["id"], "file_name": png_path.name, "segments_info": segments}
    dataset = {"images": [image], "annotations": [annotation], "categories": [dict(c) for c in categories]}
    return png_path, atomic_write_json(json_path, dataset)


def read_panoptic(png_path: PathLike, json_path: PathLike) -> Tuple[np.ndarray, List[dict]]:
    """Reads a COCO panoptic PNG and its ``segments_info`` from a panoptic JSON.

    The JSON may hold one image (as :func:`write_panoptic` writes) or a whole dataset;
    the annotation whose ``file_name`` is the PNG's name is used.

    Returns:
        ``(ids, segments_info)``: int32 ``[H, W]`` segment ids (0 = void) and the segments' dicts.
    """
    from PIL import Image

    png_path = Path(png_path)
    with Image.open(png_path) as img:
        if img.mode != "RGB":
            raise ValueError(f"{png_path} is a {img.mode!r} image; a COCO panoptic PNG is RGB")
        rgb = np.asarray(img)
    data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    annotations = data.get("annotations", [])
    match = [a for a in annotations if a.get("file_name") == png_path.name]
    if len(match) != 1:
        names = [a.get("file_name") for a in annotations][:10]
        raise ValueError(f"{json_path} has {len(match)} annotations for {png_path.name!r} (file names: {names})")
    return rgb_to_id(rgb), list(match[0]["segments_info"])


def panoptic_to_semantic(panoptic: np.ndarray, segments_info: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The category id of every pixel: int32 ``[H, W]``, 0 where ``panoptic`` is void.

    Raises:
        ValueError: when ``panoptic`` holds an id that ``segments_info`` does not list.
    """
    panoptic = _segment_ids(panoptic)
    ids, inverse = np.unique(panoptic, return_inverse=True)
    category = {int(s["id"]): int(s["category_id"]) for s in segments_info}
    unlisted = [int(i) for i in ids if i != 0 and int(i) not in category]
    if unlisted:
        raise ValueError(f"the panoptic map holds segment ids {unlisted[:10]} missing from segments_info")
    lut = np.array([category.get(int(i), 0) for i in ids], np.int32)
    return lut[inverse.reshape(panoptic.shape)]


def write_semantic_png(path: PathLike, labels: np.ndarray) -> Path:
    """Writes a label map as a palette ("P") PNG with the PASCAL VOC palette, atomically.

    The pixel values are the labels (0 = unlabelled, black); the palette only colours them.
    A map with labels above 255 (a vocabulary of 256 classes or more) is written as a 16-bit
    grayscale PNG instead, the labels unchanged.

    Args:
        path: Where to write (``.png``).
        labels: int ``[H, W]`` labels in ``0..65535``.

    Raises:
        ValueError: for a map that is not ``[H, W]``, not integer, or has labels outside 0..65535.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a semantic label map must be [H, W], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"a semantic label map must hold integer labels, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise ValueError(f"label {bad} does not fit a PNG label map (labels 0..65535)")
    return write_label_png(Path(path), labels.astype(np.uint8 if labels.max(initial=0) <= 255 else np.uint16))


def write_segment_pngs(folder: PathLike, panoptic: np.ndarray, segments_info: Sequence[Mapping[str, Any]]) -> Path:
    """One binary PNG per panoptic segment (``0.png``, ``1.png``, ... in the order of ``segments_info``) and
    ``metadata.csv`` (``id``, ``segment_id``, ``category_id``, ``category_name``, ``isthing``, ``score``,
    ``area``, ``bbox_x0``, ``bbox_y0``, ``bbox_w``, ``bbox_h``), atomically: ``segment --mask-pngs`` with a
    SAM-CP head, as segment-anything's amg.py writes its masks.

    Raises:
        ValueError: a map that is not ``[H, W]`` integer ids, or a listed segment without ``id``.
    """
    import csv
    import io

    from samantic.io.atomic import atomic_write_bytes

    panoptic = _segment_ids(panoptic)
    folder = Path(folder)
    fields = ["id", "segment_id", "category_id", "category_name", "isthing", "score", "area",
              "bbox_x0", "bbox_y0", "bbox_w", "bbox_h"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(fields)
    for i, seg in enumerate(segments_info):
        if "id" not in seg:
            raise ValueError(f"segments_info[{i}] has no 'id'")
        mask = panoptic == int(seg["id"])
        atomic_write_image(folder / f"{i}.png", mask.astype(np.uint8) * 255)
        ys, xs = np.nonzero(mask)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)] if len(xs) \
            else [0, 0, 0, 0]
        writer.writerow([i, int(seg["id"]), seg.get("category_id", ""), seg.get("category_name", ""),
                         int(bool(seg.get("isthing", 0))), seg.get("score", ""), int(mask.sum()), *bbox])
    atomic_write_bytes(folder / "metadata.csv", buf.getvalue().encode())
    return folder
