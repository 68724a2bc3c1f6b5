"""Where one click loses: 1-point mIoU (the output with the highest predicted IoU) and the best of the three outputs,
by object size and by class, on held-out scenes, as ``samantic eval sam`` prompts them (one positive point at each
object's centre, ``centre_point``).

    python benchmarks/point_gap.py                                  # the shipped sam_nano, calibration seeds 500-529
    python benchmarks/point_gap.py --weights FILE --seeds 500:530 --json point_gap.json
"""
import argparse
import json
from collections import defaultdict

import numpy as np
import torch

from amg_missed import SIZES  # the same size groups as the segment-everything misses


def summarise(rows: list) -> dict:
    """rows: dicts with ``cls``, ``area`` (share of the image), ``top`` and ``best`` IoU -> mean IoUs per group."""
    def group(sel: list) -> dict:
        return {"objects": len(sel), "top": float(np.mean([r["top"] for r in sel])) if sel else float("nan"),
                "best_of_three": float(np.mean([r["best"] for r in sel])) if sel else float("nan")}

    by_class = defaultdict(list)
    for r in rows:
        by_class[r["cls"]].append(r)
    return {"all": group(rows),
            "by_size": {name: group([r for r in rows if lo <= r["area"] < hi]) for lo, hi, name in SIZES},
            "by_class": {c: group(v) for c, v in sorted(by_class.items())}}


def measure(model, seeds) -> list:
    from segment_anything import SamPredictor

    from samantic.train.data.shapes import render_scene
    from samantic.train.metrics import single_point_ious

    predictor = SamPredictor(model)
    rows = []
    for seed in seeds:
        scene = render_scene(seed)
        top, best = single_point_ious(predictor, scene.image, scene.masks)
        for gt, label, t, b in zip(scene.masks, scene.labels, top, best):
            name = scene.classes[int(label)] if 0 <= int(label) < len(scene.classes) else str(int(label))
            rows.append({"seed": int(seed), "cls": name, "area": float(gt.mean()), "top": t, "best": b})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="a sam_nano checkpoint (default: the shipped weights)")
    ap.add_argument("--seeds", default="500:530", help="held-out scenes, START:STOP")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the summary and every object's row here")
    args = ap.parse_args()

    from samantic.models import create_model
    from samantic.train.metrics import TRAIN_SEED_START

    torch.set_num_threads(args.threads)
    start, stop = (int(x) for x in args.seeds.split(":"))
    if stop > TRAIN_SEED_START:
        raise SystemExit(f"--seeds {args.seeds}: seeds from {TRAIN_SEED_START} on are training seeds")
    model = create_model("sam_nano", checkpoint=args.weights).eval()
    with torch.no_grad():
        rows = measure(model, range(start, stop))
    summary = summarise(rows)
    print(f"{'group':<14} {'objects':>7} {'top':>6} {'best of 3':>9}")
    groups = [("all", summary["all"])] + list(summary["by_size"].items()) + list(summary["by_class"].items())
    for name, g in groups:
        print(f"{name:<14} {g['objects']:>7} {g['top']:>6.3f} {g['best_of_three']:>9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"weights": args.weights or "shipped", "seeds": args.seeds, "summary": summary, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
