"""Result writers: COCO results JSON with RLE masks, per-mask PNG folders, overlays."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from samantic.io.atomic import atomic_write_bytes, atomic_write_image, atomic_write_json


def coco_results(records: Sequence[Dict[str, Any]], image_id: int = 1, category_id: int = 1) -> List[Dict[str, Any]]:
    """Generator records (``output_mode="coco_rle"``) as COCO results entries.

    Each entry keeps the generator's fields and adds ``image_id``, ``category_id``
    and ``score`` (the predicted IoU, or the record's own ``score``), so
    ``COCO.loadRes`` and ``pycocotools.mask.decode`` read it directly.
    """
    out = []
    for i, r in enumerate(records):
        seg = r["segmentation"]
        if not isinstance(seg, dict) or not isinstance(seg.get("counts"), str):
            raise ValueError(f"record {i}: segmentation must be a compressed COCO RLE (output_mode='coco_rle')")
        entry = {"id": i + 1, "image_id": image_id, "category_id": int(r.get("category_id", category_id)),
                 "score": float(r.get("score", r.get("predicted_iou", 1.0)))}
        entry.update({k: v for k, v in r.items() if k not in entry})
        out.append(entry)
    return out


def write_results_json(path: Path, image_info: Dict[str, Any], results: List[Dict[str, Any]], **extra: Any) -> Path:
    """``{"image": {...}, "annotations": [...], ...}`` written atomically."""
    return atomic_write_json(path, {"image": image_info, **extra, "annotations": results})


def record_diffs(theirs: Any, ours: Any, where: str = "", sep: str = ".") -> List[str]:
    """``"key old -> new"`` for each leaf where two JSON-like records differ (nested keys joined by ``sep``):
    what a results file's or a checkpoint's run record says against this run's."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        out: List[str] = []
        for k in sorted(set(theirs) | set(ours)):
            out += record_diffs(theirs.get(k), ours.get(k), f"{where}{sep}{k}" if where else str(k), sep)
        return out
    return [] if theirs == ours else [f"{where or 'value'} {theirs!r} -> {ours!r}"]


def write_mask_pngs(folder: Path, masks: np.ndarray, records: Sequence[Dict[str, Any]]) -> Path:
    """One binary PNG per mask (``0.png``, ``1.png``, ...) plus ``metadata.csv``, like segment-anything's amg.py."""
    folder = Path(folder)
    fields = ["id", "area", "bbox_x0", "bbox_y0", "bbox_w", "bbox_h", "point_input_x", "point_input_y",
              "predicted_iou", "stability_score", "crop_box_x0", "crop_box_y0", "crop_box_w", "crop_box_h"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(fields)
    for i, (m, r) in enumerate(zip(masks, records)):
        atomic_write_image(folder / f"{i}.png", (np.asarray(m) > 0).astype(np.uint8) * 255)
        writer.writerow([i, r["area"], *r["bbox"], *r["point_coords"][0], r["predicted_iou"], r["stability_score"],
                         *r["crop_box"]])
    atomic_write_bytes(folder / "metadata.csv", buf.getvalue().encode())
    return folder


def voc_palette(n: int = 256) -> np.ndarray:
    """PASCAL VOC's label colours (uint8 ``[n, 3]``): 0 black, 1 dark red, 2 dark green, ..."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        out[i] = (r, g, b)
    return out


def write_label_png(path: Path, label_map: np.ndarray) -> Path:
    """A label map (0 = background, ``k`` = class k) as an indexed PNG with the VOC palette, atomically.

    The pixel values are the labels (what segmentation tools read); the palette only colours them.
    Maps with labels above 255 are written as 16-bit grayscale PNGs.
    """
    from PIL import Image

    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"a label map must be [H, W], got {label_map.shape}")
    buf = io.BytesIO()
    if label_map.max(initial=0) <= 255:
        img = Image.fromarray(label_map.astype(np.uint8), mode="P")
        img.putpalette(voc_palette(256).reshape(-1).tolist())
    else:
        img = Image.fromarray(label_map.astype(np.uint16))
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
