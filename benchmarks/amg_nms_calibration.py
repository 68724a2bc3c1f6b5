"""The threshold calibration (`samantic eval thresholds`' table) at several box-NMS thresholds of the generator.

    python benchmarks/amg_nms_calibration.py --weights v7 --weights runs/v8/sam_nano_refit2.safetensors --nms 0.7,0.5
"""
import argparse

import torch

from samantic.models import create_model
from samantic.train.metrics import calibrate_thresholds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", action="append", required=True, help="sam_nano weights, or v7 for the shipped file")
    ap.add_argument("--nms", default="0.7,0.5")
    ap.add_argument("--seeds", default="500:530")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lo, hi = (int(v) for v in a.seeds.split(":"))
    for w in a.weights:
        model = create_model("sam_nano", checkpoint=None if w == "v7" else w).eval()
        grid = [float(v) for v in a.nms.split(",")]
        # the candidates are generated once; each box NMS value filters them (as `eval thresholds --box-nms` does)
        r = calibrate_thresholds(model, range(lo, hi), (0.5, 0.6, 0.7, 0.8), (0.9, 0.93, 0.95), box_nms_grid=grid,
                                 progress=False)
        fmt = lambda row: ", ".join(f"{k} {v:.3f}" for k, v in row.items())  # noqa: E731
        for nms in grid:
            rows = [x for x in r.rows if x["box_nms_thresh"] == nms]
            best = max(rows, key=lambda x: (round(x["f1_50"], 3), x["recall_75"]))
            at = next(x for x in rows if (x["pred_iou_thresh"], x["stability_score_thresh"]) == (0.5, 0.93))
            print(f"{w} box NMS {nms}: best F1: {fmt(best)}; at 0.5 / 0.93: {fmt(at)}", flush=True)


if __name__ == "__main__":
    main()
