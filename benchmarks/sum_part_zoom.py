"""Is drawing a composite's part a matter of resolution? One click per part, on the whole image and zoomed in (issue 18).

The part target needs a composite thing's parts (a house's roof, a snowman's head) drawn where the unspecified
answer is the whole thing. Every model of sam_nano's line draws them poorly, fully supervised too
(``sum_task_ceiling.py``). This script asks whether that is the encoder's grid: for every composite's part of
the held-out v2 scenes it clicks the part's centre on the whole image (zoom 1: what ``samantic eval sum`` and
``sum_task_ceiling.py`` score) and on a square crop around the click of side ``longest image side / zoom``,
which the model sees ``zoom`` times larger, and scores the output with the highest predicted IoU (picked) and
the best of three (oracle) against the part, asked "part" and asked "unspecified" (the same answer for a model
without a task table). Parts are binned by their area in encoder tokens at zoom 1 (pixels scaled to the
model's input, over the encoder stride squared). The crop is a diagnostic, not a pipeline: nothing in the SDK
zooms.

    python benchmarks/sum_part_zoom.py --column base=sam_nano --column sum=runs/sum_v7/ft/sum_r2k.safetensors \
        --seeds 0:30 --zoom 1,2,3 --out benchmarks/results/sum_v7/part_zoom
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from samantic.cli.eval import load_column, parse_seeds
from samantic.io.atomic import atomic_write_bytes, atomic_write_json
from samantic.pipeline.predictor import Predictor
from samantic.train.metrics import TRAIN_SEED_START, centre_point, mask_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sum_task_ceiling import COMPOSITE, rows, task_scenes  # noqa: E402

# Bins of a part's area in encoder tokens at zoom 1: [lo, hi)
BINS: Tuple[Tuple[float, float], ...] = ((0, 2), (2, 4), (4, float("inf")))
ASKED = ("part", "unspecified")


def crop_box(xy: Tuple[float, float], shape: Tuple[int, int], zoom: float) -> Tuple[int, int, int, int]:
    """``(x0, y0, w, h)`` of the square of side ``round(max(H, W) / zoom)`` centred on ``xy``, moved inside the image
    (and cut to it where the image is narrower than the square)."""
    h_img, w_img = shape
    side = int(round(max(h_img, w_img) / zoom))
    w, h = min(side, w_img), min(side, h_img)
    x0 = int(min(max(xy[0] - w / 2, 0), w_img - w))
    y0 = int(min(max(xy[1] - h / 2, 0), h_img - h))
    return x0, y0, w, h


def token_area(mask: np.ndarray, sam) -> float:
    """The mask's area in encoder tokens at the model's input scale (longest side resized to ``img_size``)."""
    img_size = int(sam.image_encoder.img_size)
    stride = img_size / int(sam.prompt_encoder.image_embedding_size[0])
    return float(mask.sum()) * (img_size / max(mask.shape)) ** 2 / stride ** 2


def click_zoomed(predictor: Predictor, image: np.ndarray, part: np.ndarray, zoom: float,
                 tasks: Sequence[str]) -> Dict[str, Tuple[float, float]]:
    """task -> ``(picked IoU, oracle IoU)`` of one click at the part's centre, on the crop of ``zoom`` (1: the whole
    image), the crop encoded once for every task asked."""
    x, y = centre_point(part)
    x0, y0, w, h = crop_box((x, y), image.shape[:2], zoom)
    predictor.set_image(np.ascontiguousarray(image[y0:y0 + h, x0:x0 + w]))
    res = {}
    for task in tasks:
        masks, scores, _ = predictor.predict(point_coords=np.array([[x - x0, y - y0]]), point_labels=np.array([1]),
                                             multimask_output=True, task=task)
        full = np.zeros((len(masks),) + part.shape, bool)
        full[:, y0:y0 + h, x0:x0 + w] = masks
        ious = [mask_iou(m, part) for m in full]
        res[task] = (float(ious[int(np.argmax(scores))]), float(max(ious)))
    return res


def measure(cols: Dict[str, object], seeds: Sequence[int], zooms: Sequence[float]) -> Dict[str, dict]:
    """column -> {"area": [tokens per part], "<zoom>": {asked: {"picked": [...], "oracle": [...]}}}."""
    out: Dict[str, dict] = {c: {"area": [], **{str(z): {q: {"picked": [], "oracle": []} for q in ASKED}
                                               for z in zooms}} for c in cols}
    predictors = {c: Predictor(m.eval()) for c, m in cols.items()}
    with torch.no_grad():
        for scene, masks, tasks in task_scenes(seeds):
            for part in masks[dict(rows(masks, tasks))[COMPOSITE]]:
                for c, pr in predictors.items():
                    out[c]["area"].append(token_area(part, pr.model))
                    for z in zooms:
                        for q, (picked, oracle) in click_zoomed(pr, scene.image, part, z, ASKED).items():
                            out[c][str(z)][q]["picked"].append(picked)
                            out[c][str(z)][q]["oracle"].append(oracle)
    return out


def summarise(raw: Dict[str, dict], zooms: Sequence[float]) -> Dict[str, dict]:
    """Means per column, zoom, prompt and area bin (``"all"`` and ``"[lo, hi)"``), with the bins' part counts."""
    res: Dict[str, dict] = {}
    for c, d in raw.items():
        area = np.asarray(d["area"])
        sels = {"all": np.ones(len(area), bool)}
        sels.update({f"[{lo:g}, {hi:g})": (area >= lo) & (area < hi) for lo, hi in BINS})
        res[c] = {"parts": {k: int(s.sum()) for k, s in sels.items()}}
        for z in zooms:
            res[c][str(z)] = {q: {k: {m: (float(np.mean(np.asarray(d[str(z)][q][m])[s])) if s.any() else None)
                                      for m in ("picked", "oracle")} for k, s in sels.items()} for q in ASKED}
    return res


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--column", action="append", required=True,
                   help="NAME=WEIGHTS[@SIDE]: a registered model or sam_nano weights file, optionally at input side SIDE "
                        "(default: the side the file was fine-tuned at, else the config's)")
    p.add_argument("--seeds", default="0:30")
    p.add_argument("--zoom", default="1,2,3", help="comma-separated zoom factors (1: the whole image)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    seeds = parse_seeds(a.seeds)
    if seeds.stop > TRAIN_SEED_START:
        raise SystemExit(f"--seeds {a.seeds}: reaches the training seeds (>= {TRAIN_SEED_START}); held-out seeds only")
    zooms = [float(z) for z in a.zoom.split(",")]
    if any(z < 1 for z in zooms):
        raise SystemExit(f"--zoom {a.zoom}: zoom factors must be >= 1")
    cols = {name: sam for name, _, sam in (load_column(s) for s in a.column)}
    t0 = time.perf_counter()
    res = summarise(measure(cols, seeds, zooms), zooms)
    cmd = ("python benchmarks/sum_part_zoom.py " + " ".join(f"--column {s}" for s in a.column)
           + f" --seeds {a.seeds} --zoom {a.zoom}")
    bins = list(next(iter(res.values()))["parts"])
    lines = [f"`{cmd}`", "", f"Held-out v2 scenes {a.seeds}: composite things' parts, one click at each part's centre on "
             "a crop of side (longest image side / zoom) around it (zoom 1: the whole image); mIoU of the picked "
             "output (oracle: best of three) asked \"part\" / asked \"unspecified\"; parts binned by area in encoder "
             "tokens at zoom 1.", "",
             "| column | zoom | " + " | ".join(f"{b} tokens ({res[next(iter(res))]['parts'][b]} parts)" for b in bins)
             + " |", "|---|---|" + "---|" * len(bins)]
    for c, d in res.items():
        for z in zooms:
            cells = []
            for b in bins:
                pa, un = d[str(z)]["part"][b], d[str(z)]["unspecified"][b]
                cells.append("-" if pa["picked"] is None else
                             f"{pa['picked']:.3f} ({pa['oracle']:.3f}) / {un['picked']:.3f} ({un['oracle']:.3f})")
            lines.append(f"| {c} | {z:g} | " + " | ".join(cells) + " |")
    lines += ["", f"({time.perf_counter() - t0:.0f} s)"]
    atomic_write_bytes(a.out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    atomic_write_json(a.out.with_suffix(".json"), {"command": cmd, "seeds": a.seeds, "zoom": zooms, "results": res},
                      indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
