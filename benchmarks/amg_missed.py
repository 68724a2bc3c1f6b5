"""Why segment-everything misses the objects it misses: which filter drops their good candidates, by object size.

Each scene is segmented once with loose thresholds and no NMS (as ``samantic eval thresholds`` does); for each object
its good candidates (mask IoU >= 0.5 with it) are followed through the generator's filters at the given thresholds:
found (a good candidate survives the filters and the box NMS), none (no good candidate at all, even unfiltered),
predicted IoU (every good candidate that passes stability fails the predicted-IoU threshold, and some pass
stability), stability (the converse), both (no good candidate passes either), split (some pass one, others the
other, none both) or NMS (a good candidate passes both, the box NMS drops it for a better-scored mask that does not
match the object).

    python benchmarks/amg_missed.py                                    # the shipped sam_nano at its own thresholds
    python benchmarks/amg_missed.py --weights FILE --pred-iou 0.8 --stability 0.93 --box-nms 0.3 --seeds 500:560
"""
import argparse
import json
from collections import Counter

import numpy as np
import torch

from samantic.models import create_model, recommended_thresholds
from samantic.models.registry import SAM_BOX_NMS
from samantic.ops import nms, rle_encode, rle_iou
from samantic.pipeline import AutomaticMaskGenerator
from samantic.train.data.shapes import render_scene

SIZES = ((0.0, 0.0025, "under 0.25%"), (0.0025, 0.01, "0.25-1%"), (0.01, 1.01, "over 1%"))
CAUSES = ("found", "none", "predicted IoU", "stability", "both", "split", "NMS")


def classify(iou: np.ndarray, preds: np.ndarray, stab: np.ndarray, boxes: np.ndarray, pi: float, st: float,
             bn: float) -> list:
    """The cause for each object (column of ``iou``, candidates x objects)."""
    keep_f = (preds > pi) & (stab >= st)
    sel = np.nonzero(keep_f)[0]
    kept = np.zeros(len(preds), bool)
    if len(sel):
        kept[sel[nms(boxes[sel], preds[sel], bn)]] = True
    out = []
    for j in range(iou.shape[1]):
        good = iou[:, j] >= 0.5
        p_ok, s_ok = good & (preds > pi), good & (stab >= st)
        if (good & kept).any():
            out.append("found")
        elif not good.any():
            out.append("none")
        elif (good & keep_f).any():
            out.append("NMS")
        elif s_ok.any() and not p_ok.any():
            out.append("predicted IoU")
        elif p_ok.any() and not s_ok.any():
            out.append("stability")
        elif not p_ok.any() and not s_ok.any():
            out.append("both")
        else:
            out.append("split")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sam_nano")
    ap.add_argument("--weights", default=None, help="weights file (default: the model's shipped weights)")
    ap.add_argument("--pred-iou", type=float, default=None, help="default: the weights' own threshold")
    ap.add_argument("--stability", type=float, default=None)
    ap.add_argument("--box-nms", type=float, default=None)
    ap.add_argument("--seeds", default="500:560")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the counts here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lo, hi = (int(v) for v in a.seeds.split(":"))
    model = create_model(a.model, checkpoint=a.weights).eval()
    own = recommended_thresholds(model)  # what segment-everything uses for these weights when given none
    pi = a.pred_iou if a.pred_iou is not None else own["pred_iou_thresh"]
    st = a.stability if a.stability is not None else own["stability_score_thresh"]
    bn = a.box_nms if a.box_nms is not None else own.get("box_nms_thresh", SAM_BOX_NMS)
    gen = AutomaticMaskGenerator(model, pred_iou_thresh=min(0.3, pi) - 1e-6, stability_score_thresh=min(0.7, st),
                                 box_nms_thresh=1.0)
    counts = {label: Counter() for *_, label in SIZES}
    for s in range(lo, hi):
        scene = render_scene(s)
        gm = np.asarray(scene.masks, bool)
        if not len(gm):
            continue
        found = gen.generate_masks(scene.image)
        if len(found):
            iou = rle_iou(found.rles, rle_encode(gm))
            preds = np.asarray(found.iou_preds, np.float32)
            stab = np.asarray(found.stability_score, np.float32)
            boxes = np.asarray(found.boxes, np.float32)
        else:
            iou = np.zeros((0, len(gm)))
            preds = stab = np.zeros(0, np.float32)
            boxes = np.zeros((0, 4), np.float32)
        for j, cause in enumerate(classify(iou, preds, stab, boxes, pi, st, bn)):
            area = float(gm[j].mean())
            label = next(lbl for lo_, hi_, lbl in SIZES if lo_ <= area < hi_)
            counts[label][cause] += 1
    print(f"{a.weights or a.model} at {pi} / {st} / {bn}, seeds {a.seeds}")
    print("| objects | " + " | ".join(CAUSES) + " | recall |")
    print("|---" * (len(CAUSES) + 2) + "|")
    total = Counter()
    for label, c in counts.items():
        total.update(c)
    for label, c in list(counts.items()) + [("all", total)]:
        n = sum(c.values())
        print(f"| {label} ({n}) | " + " | ".join(str(c[k]) for k in CAUSES) + f" | {c['found'] / max(n, 1):.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"thresholds": [pi, st, bn], "seeds": a.seeds, "weights": a.weights,
                       "counts": {k: dict(v) for k, v in counts.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
