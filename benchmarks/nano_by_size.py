"""Where does a SAM miss? Single-point IoU on held-out v1 scenes, by object size.

For each weights file (``--column NAME=WEIGHTS``, ``pkg:`` paths allowed), every object of the
scenes ``--seeds`` is prompted with one point at its most interior pixel (as ``samantic eval sam``
does); the IoU of the mask with the highest predicted IoU (``top``) and of the best of the three
(``oracle``) are averaged per bin of the object's area as a fraction of its image.

    python benchmarks/nano_by_size.py --column v7=pkg:assets/sam_nano.safetensors --column v6=OLD.safetensors \
        --seeds 0:40 --out benchmarks/results/sam_nano_v7 [--model sam_nano]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402

BINS = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.05, 1.0)


def per_object(model_name: str, weights: str, seeds) -> np.ndarray:
    """(area fraction, top IoU, oracle IoU) per object of the scenes."""
    import torch
    from segment_anything import SamPredictor

    from samantic.models import create_model
    from samantic.train.data.shapes import render_scene
    from samantic.train.metrics import single_point_ious

    predictor = SamPredictor(create_model(model_name, checkpoint=weights).eval())
    rows = []
    with torch.no_grad():
        for seed in seeds:
            scene = render_scene(seed)
            top, best = single_point_ious(predictor, scene.image, scene.masks)
            h, w = scene.image.shape[:2]
            rows += [(gt.sum() / (h * w), t, b) for gt, t, b in zip(scene.masks, top, best)]
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--column", action="append", required=True, help="NAME=WEIGHTS (repeatable)")
    ap.add_argument("--model", default="sam_nano", help="the architecture every column's weights load into")
    ap.add_argument("--seeds", default="0:40", help="held-out v1 scene seeds START:STOP")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    columns = []
    for c in args.column:
        name, sep, weights = c.partition("=")
        if not sep or not name or not weights:
            ap.error(f"--column {c!r}: expected NAME=WEIGHTS")
        columns.append((name, weights))
    start, stop = (int(v) for v in args.seeds.split(":"))
    t0 = time.perf_counter()
    data = {name: per_object(args.model, weights, range(start, stop)) for name, weights in columns}
    bins = [(lo, hi) for lo, hi in zip(BINS[:-1], BINS[1:])]
    table, results = [], []
    for lo, hi in bins + [(None, None)]:
        label = "all" if lo is None else f"{100 * lo:g}-{100 * hi:g}%"
        row = [label]
        for name, _ in columns:
            d = data[name]
            keep = np.ones(len(d), bool) if lo is None else (d[:, 0] >= lo) & (d[:, 0] < hi)
            top, oracle = (float(d[keep, 1].mean()), float(d[keep, 2].mean())) if keep.any() else (float("nan"),) * 2
            results.append({"column": name, "area": label, "n": int(keep.sum()), "miou_top": top, "miou_oracle": oracle})
            row.append(f"{top:.3f} / {oracle:.3f}")
        row.insert(1, str(int(keep.sum())))
        table.append(row)
    command = "python benchmarks/nano_by_size.py " + " ".join(f"--column {c}" for c in args.column) + \
        f" --model {args.model} --seeds {args.seeds}"
    payload = {"command": command, "columns": dict(columns), "seeds": args.seeds, "machine": machine(),
               "seconds": round(time.perf_counter() - t0, 1), "rows": results}
    preamble = (f"`{command}`\n\nSingle-point IoU by object area (fraction of the image), top-scoring mask / "
                f"best of 3, held-out v1 scenes {args.seeds}.")
    _, md = write_report(args.out, "by_size", payload, table, ["object area", "objects"] + [n for n, _ in columns],
                         preamble)
    print(md.read_text())


if __name__ == "__main__":
    main()
