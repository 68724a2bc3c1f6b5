"""What SAM-CP adds to segment-everything's time per image, per stage, on held-out v2 scenes.

Both paths run in one process on the same scenes, alternating per image:

  amg    segment-everything alone (the Segmenter without a head), with the grid and
         thresholds the SAM-CP head was trained on
  samcp  the same, then the SAM-CP head on its patches, the merge kernel and panoptic fusion

Reported: seconds per image of each path (median over scenes), SAM-CP's own stages
(head, merge, fusion) and the added fraction ``samcp / amg - 1``.

    python benchmarks/samcp_overhead.py --samcp runs/samcp/samcp.safetensors --seeds 0:10 --out benchmarks/results
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
    ap.add_argument("--samcp", required=True, type=Path, help="SAM-CP head file")
    ap.add_argument("--model", default="sam_nano")
    ap.add_argument("--seeds", default="0:10", help="held-out v2 scene seeds START:STOP")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    import torch

    from samantic.models import create_model
    from samantic.runtime import Segmenter
    from samantic.train.data.panoptic import render_panoptic

    if args.threads:
        torch.set_num_threads(args.threads)
    a, b = (int(v) for v in args.seeds.split(":"))
    sam = create_model(args.model)
    with_head = Segmenter(sam, samcp=args.samcp)
    alone = Segmenter(sam, config=with_head.config)
    rows = {"amg": [], "samcp": [], "head": [], "merge": [], "fusion": []}
    segments = []
    for seed in range(a, b):
        image = render_panoptic(seed).image
        t0 = time.perf_counter()
        alone(image)
        rows["amg"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = with_head(image)
        rows["samcp"].append(time.perf_counter() - t0)
        for k in ("head", "merge", "fusion"):
            rows[k].append(res.output.timings[k])
        segments.append(len(res))
    med = {k: float(np.median(v)) for k, v in rows.items()}
    added = med["samcp"] / med["amg"] - 1.0
    stage = med["head"] + med["merge"] + med["fusion"]
    cfg = with_head.config
    payload = {"machine": machine(), "model": args.model, "samcp": str(args.samcp), "seeds": args.seeds,
               "threads": torch.get_num_threads(), "points_per_side": cfg.points_per_side,
               "pred_iou_thresh": cfg.pred_iou_thresh, "stability_score_thresh": cfg.stability_score_thresh,
               "median_seconds": med, "added_fraction": added, "samcp_stages_over_amg": stage / med["amg"],
               "segments_per_image": float(np.mean(segments)), "per_image": rows}
    header = ["path / stage", "median s / image", "vs segment-everything"]
    table = [["segment-everything", f"{med['amg']:.3f}", "1.00"],
             ["segment-everything + SAM-CP", f"{med['samcp']:.3f}", f"{med['samcp'] / med['amg']:.2f}"],
             ["  SAM-CP head (backbone, patch encoder, affinity decoder)", f"{med['head']:.3f}", f"{med['head'] / med['amg']:.3f}"],
             ["  merge (samantic._C.merge_patches)", f"{med['merge']:.4f}", f"{med['merge'] / med['amg']:.4f}"],
             ["  panoptic fusion", f"{med['fusion']:.4f}", f"{med['fusion'] / med['amg']:.4f}"]]
    command = (f"python benchmarks/samcp_overhead.py --samcp {args.samcp} --model {args.model} --seeds {args.seeds}"
               + (f" --threads {args.threads}" if args.threads else ""))
    pre = (f"`{command}`\n\n{b - a} held-out v2 scenes, {cfg.points_per_side}x{cfg.points_per_side} grid, thresholds "
           f"{cfg.pred_iou_thresh}/{cfg.stability_score_thresh}, {torch.get_num_threads()} torch thread(s), this CPU. "
           f"SAM-CP adds {100 * added:.1f}% to segment-everything's time per image "
           f"({np.mean(segments):.1f} segments per image).\n")
    json_path, md_path = write_report(args.out, "samcp_overhead", payload, table, header, pre)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
