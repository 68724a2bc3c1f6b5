"""How good can SAM-CP be on a SAM's patches? Single-point IoU and the oracle-merge ceiling on v2 scenes.

SAM-CP only labels and merges the patches segment-everything gives it, so its PQ is
bounded by the patches. For a SAM (shipped or ``--checkpoint``) this measures, on v2
(panoptic) scenes and, for the single-point part, v1 scenes:

  point    single-point IoU of SAM's highest-scoring mask, prompted at the most
           interior pixel of every thing and stuff segment (and the best of its 3 masks;
           the image edge not counted as a boundary: samantic.train.metrics.single_point_ious)
  ceiling  per threshold pair: patches per image, and per GT segment the IoU of the
           union of the patches lying at least 80% inside it (SAM-CP's positive
           assignment: a perfect head merges exactly these), averaged over things
           and stuff, and the fraction of segments whose union reaches IoU 0.5

    python benchmarks/samcp_ceiling.py --seeds 500000:500006 --grid 16 --thresholds 0.6,0.95 0.4,0.85 0.3,0.8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sam_nano")
    ap.add_argument("--checkpoint", default=None, help="weights (default: the shipped ones)")
    ap.add_argument("--seeds", default="500000:500006", help="v2 scene seeds START:STOP (not the eval seeds 0:60)")
    ap.add_argument("--point-seeds", default="0:10", help="v1 and v2 scene seeds for the single-point part ('' skips it)")
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--box-nms-thresh", type=float, default=None,
                    help="segment-everything's box NMS (default: the patch cache's, 0.7); higher keeps more overlapping patches")
    ap.add_argument("--thresholds", nargs="+", default=["0.6,0.95", "0.4,0.85", "0.3,0.8"],
                    help="pred_iou_thresh,stability_score_thresh pairs")
    ap.add_argument("--name", default="samcp_ceiling")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    from segment_anything import SamPredictor

    from samantic.models import create_model
    from samantic.ops import rle_decode
    from samantic.pipeline import AutomaticMaskGenerator
    from samantic.train.data.panoptic import THING_CLASSES, render_panoptic
    from samantic.train.data.shapes import render_scene
    from samantic.train.metrics import single_point_ious
    from samantic.train.samcp_cache import GENERATOR_OPTIONS, PanopticStream, patch_overlaps

    sam = create_model(args.model, checkpoint=args.checkpoint)
    predictor = SamPredictor(sam)
    # single point
    point = {"v1 things": [], "v2 things": [], "v2 stuff": []}
    best3 = {k: [] for k in point}
    a, b = (int(v) for v in args.point_seeds.split(":")) if args.point_seeds else (0, 0)
    for kind in ("v1", "v2"):
        for seed in range(a, b):
            if kind == "v1":
                sc = render_scene(seed)
                segs = [(m.astype(bool), "v1 things") for m in sc.masks]
            else:
                sc = render_panoptic(seed)
                segs = [(sc.panoptic == sid, "v2 things" if cat <= len(THING_CLASSES) else "v2 stuff")
                        for sid, cat in sc.segments]
            top, b3 = single_point_ious(predictor, sc.image, [m for m, _ in segs], image_edge_is_boundary=False)
            for (_, key), t, b3_iou in zip(segs, top, b3):
                point[key].append(t)
                best3[key].append(b3_iou)
    # ceiling of an oracle merge of the patches
    a, b = (int(v) for v in args.seeds.split(":"))
    data = PanopticStream(a, b - a)
    ceiling = []
    options = dict(GENERATOR_OPTIONS)
    if args.box_nms_thresh is not None:
        options["box_nms_thresh"] = args.box_nms_thresh
    for pair in args.thresholds:
        iou_t, stab_t = (float(v) for v in pair.split(","))
        gen = AutomaticMaskGenerator(sam, points_per_side=args.grid, pred_iou_thresh=iou_t,
                                     stability_score_thresh=stab_t, **options)
        things, stuff, counts, seconds = [], [], [], 0.0
        for i in range(len(data)):
            s = data.load(i)
            t0 = time.perf_counter()
            masks = gen.generate_masks(s.image)
            seconds += time.perf_counter() - t0
            iop = patch_overlaps(masks.rles, masks.boxes, s.gt.rles)["iop"]
            counts.append(iop.shape[0])
            gt = rle_decode(s.gt.rles).astype(bool)
            pm = rle_decode(masks.rles).astype(bool) if iop.shape[0] else np.zeros((0,) + gt.shape[1:], bool)
            for g in range(len(gt)):
                sel = iop[:, g] >= 0.8
                u = pm[sel].any(0) if sel.any() else np.zeros_like(gt[g])
                (things if s.gt.isthing[g] else stuff).append(float((u & gt[g]).sum() / max((u | gt[g]).sum(), 1)))
        ceiling.append({"pred_iou_thresh": iou_t, "stability_score_thresh": stab_t,
                        "patches_per_image": float(np.mean(counts)),
                        "things_union_iou": float(np.mean(things)), "things_at_0.5": float(np.mean(np.array(things) >= 0.5)),
                        "stuff_union_iou": float(np.mean(stuff)), "stuff_at_0.5": float(np.mean(np.array(stuff) >= 0.5)),
                        "seconds_per_image": seconds / len(data)})
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731  (None: JSON null, not NaN)
    payload = {"machine": machine(), "model": args.model, "checkpoint": args.checkpoint, "grid": args.grid,
               "box_nms_thresh": options["box_nms_thresh"], "seeds": args.seeds, "point_seeds": args.point_seeds,
               "single_point": {k: mean(v) for k, v in point.items()},
               "single_point_best_of_3": {k: mean(v) for k, v in best3.items()}, "ceiling": ceiling}
    header = ["pred_iou / stability", "patches / image", "things: union IoU", "things >= 0.5", "stuff: union IoU",
              "stuff >= 0.5", "s / image"]
    table = [[f"{c['pred_iou_thresh']} / {c['stability_score_thresh']}", f"{c['patches_per_image']:.1f}",
              f"{c['things_union_iou']:.3f}", f"{c['things_at_0.5']:.2f}", f"{c['stuff_union_iou']:.3f}",
              f"{c['stuff_at_0.5']:.2f}", f"{c['seconds_per_image']:.1f}"] for c in ceiling]
    command = ("python benchmarks/samcp_ceiling.py --model " + args.model
               + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "") + f" --seeds {args.seeds} --point-seeds "
               f"'{args.point_seeds}' --grid {args.grid}" + (f" --box-nms-thresh {args.box_nms_thresh}" if args.box_nms_thresh
               is not None else "") + f" --thresholds {' '.join(args.thresholds)} --name {args.name}")
    sp, b3 = payload["single_point"], payload["single_point_best_of_3"]
    point_line = "" if not args.point_seeds else (
        f"Single-point IoU (highest-scoring mask / best of 3) on scenes {args.point_seeds}: "
        + ", ".join(f"{k} {v:.3f} / {b3[k]:.3f}" for k, v in sp.items() if v is not None) + ".\n\n")
    pre = (f"`{command}`\n\n{point_line}Oracle merge of the {args.grid}x{args.grid}-grid "
           f"patches on v2 scenes {args.seeds}, box NMS {options['box_nms_thresh']} (union of the patches >= 80% inside each GT "
           "segment):\n")
    _, md = write_report(args.out, args.name, payload, table, header, pre)
    print(md.read_text())


if __name__ == "__main__":
    main()
