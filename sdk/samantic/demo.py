"""The embedded-default demo run by ``make demo``.

Until the segment-everything pipeline and the trained ``sam_nano`` land, the
demo exercises the compiled kernels end to end on a bundled image: it builds
SAM-style low-res mask logits (256 x 256, the decoder's output size) for the
objects of the image from a colour cue, then runs the fused post-processing
kernel (two-stage upscale, threshold, stability, box, RLE), NMS, and writes a
COCO results JSON that pycocotools reads, plus an overlay PNG.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

DEMO_IMAGE = Path(__file__).parent / "assets" / "demo" / "shapes.png"

IMG_SIZE = 1024  # SAM's padded model input
LOW_RES = 256  # SAM's mask decoder output size
LOGIT_SLOPE = 4.0  # logits per low-res pixel of signed distance, like SAM's sharp decoder outputs


@dataclass
class DemoResult:
    image: Path
    results_json: Path
    overlay: Path
    n_masks: int
    seconds: float


def preprocess_shape(h: int, w: int, long_side: int) -> Tuple[int, int]:
    """segment-anything's ResizeLongestSide.get_preprocess_shape."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def colour_cue_logits(image: np.ndarray) -> np.ndarray:
    """Low-res logits, one per connected saturated region: signed distance x slope.

    Stands in for SAM's mask decoder in this demo only.
    """
    import cv2

    h, w = image.shape[:2]
    in_h, in_w = preprocess_shape(h, w, IMG_SIZE)
    resized = cv2.resize(image, (in_w, in_h), interpolation=cv2.INTER_LINEAR)
    padded = np.zeros((IMG_SIZE, IMG_SIZE, 3), np.uint8)
    padded[:in_h, :in_w] = resized
    small = cv2.resize(padded, (LOW_RES, LOW_RES), interpolation=cv2.INTER_AREA)
    sat = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)[..., 1]
    fg = (sat > 90).astype(np.uint8)
    n, labels = cv2.connectedComponents(fg)
    logits = []
    for k in range(1, n):
        m = (labels == k).astype(np.uint8)
        if m.sum() < 4:
            continue
        inside = cv2.distanceTransform(m, cv2.DIST_L2, 3)
        outside = cv2.distanceTransform(1 - m, cv2.DIST_L2, 3)
        logits.append(((inside - outside) * LOGIT_SLOPE).astype(np.float32))
    return np.stack(logits) if logits else np.zeros((0, LOW_RES, LOW_RES), np.float32)


def run(out_dir: Path, image_path: Optional[Path] = None) -> DemoResult:
    from samantic.io import atomic_write_image, atomic_write_json, overlay_masks, read_image
    from samantic.ops import nms, postprocess_masks, rle_decode

    image_path = Path(image_path or DEMO_IMAGE)
    image = read_image(image_path)
    h, w = image.shape[:2]
    t0 = time.perf_counter()
    # step: SAM-style low-res logits for the demo's objects
    logits = colour_cue_logits(image)
    # step: fused post-processing at full resolution (no float mask is ever materialised)
    res = postprocess_masks(logits, input_size=preprocess_shape(h, w, IMG_SIZE), original_size=(h, w), img_size=IMG_SIZE)
    # step: drop unstable masks and duplicates
    keep = np.nonzero(np.nan_to_num(res.stability_score) > 0.9)[0]
    res = res.select(keep)
    keep = nms(res.boxes.astype(np.float32), res.stability_score.astype(np.float32), 0.7)
    res = res.select(keep)
    seconds = time.perf_counter() - t0

    rles = res.to_dicts(compressed=True)
    records = []
    for i, rle in enumerate(rles):
        x0, y0, x1, y1 = (int(v) for v in res.boxes[i])
        records.append(
            {
                "image_id": 1,
                "category_id": 1,
                "segmentation": rle,
                "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                "area": int(res.area[i]),
                "score": float(res.stability_score[i]),
            }
        )
    out_dir = Path(out_dir)
    stem = image_path.stem
    results_json = atomic_write_json(out_dir / f"{stem}.json", records)
    masks = rle_decode(res.rles) if len(res) else np.zeros((0, h, w), np.uint8)
    labels: List[str] = [f"#{i} {s:.2f}" for i, s in enumerate(res.stability_score)]
    overlay = atomic_write_image(out_dir / f"{stem}_overlay.png", overlay_masks(image, masks, labels))
    return DemoResult(image_path, results_json, overlay, len(res), seconds)
