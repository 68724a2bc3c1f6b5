"""Segment by class names: early class filtering vs segment-everything then classify every mask.

Both paths run the same SAM, head and settings on the same held-out scenes, in
one process, alternating per image:

  early  the head scores each mask token right after the decoder's transformer;
         masks of unrequested classes or low confidence are dropped before any
         upscaling, post-processing or NMS (``samantic segment --classes``)
  late   every mask goes through upscaling, post-processing and NMS as in
         segment-everything, is classified afterwards, and unrequested ones are
         dropped at the end

Reported: seconds per image of each path, the ratio, masks upscaled, and how
many of the late path's final masks the early path also returns (mask IoU >= 0.99).

    python benchmarks/usam_speed.py --head runs/usam/head.safetensors --classes circle,star --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402


class ClassifyAll:
    """Wraps a class scorer so that nothing is dropped early; its verdict is kept as a field."""

    def __init__(self, scorer) -> None:
        self.scorer = scorer
        self.names = scorer.names

    def __call__(self, logits, iou):
        verdict = self.scorer(logits, iou)
        fields = dict(verdict.fields, wanted=np.asarray(verdict.keep, bool))
        return type(verdict)(keep=np.ones(len(verdict.keep), bool), fields=fields)


def matched(a, b) -> int:
    """How many masks of ``b`` have a mask in ``a`` with IoU >= 0.99."""
    from samantic.ops import rle_iou

    if len(a) == 0 or len(b) == 0:
        return 0
    iou = rle_iou(a.rles, b.rles)
    return int((iou.max(0) >= 0.99).sum())


def main() -> None:
    import torch

    from samantic.heads.usam import load_head
    from samantic.models import create_model
    from samantic.runtime import Segmenter
    from samantic.train.data.shapes import render_scene

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sam_nano")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--head", required=True)
    ap.add_argument("--classes", default="circle,star")
    ap.add_argument("--seeds", default="500:510", help="held-out scene seeds START:STOP")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--pred-iou-thresh", type=float, default=0.88)
    ap.add_argument("--stability-score-thresh", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    a, b = (int(v) for v in args.seeds.split(":"))
    sam = create_model(args.model, checkpoint=args.checkpoint)
    head = load_head(args.head)
    opts = dict(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                stability_score_thresh=args.stability_score_thresh)
    early = Segmenter(sam, head, classes=args.classes, **opts)
    late = Segmenter(sam, head, classes=args.classes, **opts)
    late.generator.class_scorer = ClassifyAll(late.generator.class_scorer)
    rows: List[Dict[str, Any]] = []
    scene = render_scene(a)
    early(scene.image), late(scene.image)  # warm-up
    for seed in range(a, b):
        image = render_scene(seed).image
        t = time.perf_counter()
        re = early(image)
        te = time.perf_counter() - t
        up_e = early.stats["masks_upscaled"]
        t = time.perf_counter()
        rl = late(image)
        wanted = rl.masks.fields.get("wanted", np.zeros(len(rl.masks), bool))  # absent when nothing survived
        ms = rl.masks.select(np.nonzero(wanted)[0])
        tl = time.perf_counter() - t
        up_l = late.stats["masks_upscaled"]
        rows.append({"seed": seed, "early_s": te, "late_s": tl, "early_masks": len(re), "late_masks": len(ms),
                     "early_upscaled": up_e, "late_upscaled": up_l, "late_matched_by_early": matched(re.masks, ms)})
    tot = {k: float(sum(r[k] for r in rows)) for k in rows[0] if k != "seed"}
    n = len(rows)
    summary = {
        "early_s_per_image": tot["early_s"] / n, "late_s_per_image": tot["late_s"] / n,
        "speedup": tot["late_s"] / tot["early_s"],
        "late_masks_matched_by_early": tot["late_matched_by_early"] / max(1, tot["late_masks"]),
        "early_masks": int(tot["early_masks"]), "late_masks": int(tot["late_masks"]),
        "early_upscaled": int(tot["early_upscaled"]), "late_upscaled": int(tot["late_upscaled"]),
    }
    command = "python benchmarks/usam_speed.py " + " ".join(sys.argv[1:])
    payload = {"command": command, "machine": machine(), "model": args.model, "head": args.head,
               "classes": args.classes, "seeds": args.seeds, "summary": summary, "rows": rows}
    table = [["early (filter before upscaling)", f"{summary['early_s_per_image']:.3f}", str(summary["early_upscaled"]),
              str(summary["early_masks"]), ""],
             ["late (segment everything, then classify)", f"{summary['late_s_per_image']:.3f}",
              str(summary["late_upscaled"]), str(summary["late_masks"]), f"{summary['speedup']:.2f}x slower"]]
    write_report(args.out, "usam_speed", payload, table,
                 ["path", "s / image", "masks upscaled", "final masks", "ratio"],
                 preamble=f"`{command}`\n\n{n} held-out scenes, classes {args.classes}; late-path masks also returned "
                          f"by the early path (IoU >= 0.99): {summary['late_masks_matched_by_early']:.3f}")
    print(f"early {summary['early_s_per_image']:.3f} s/img, late {summary['late_s_per_image']:.3f} s/img, "
          f"speedup {summary['speedup']:.2f}x, agreement {summary['late_masks_matched_by_early']:.3f}")


if __name__ == "__main__":
    main()
