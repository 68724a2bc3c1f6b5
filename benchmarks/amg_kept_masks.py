"""What segment-everything's kept masks are: matches, duplicates, background pieces; and which objects it misses.

Each kept mask, greedy by IoU with the scene's objects: a match (IoU >= 0.5 with an object not yet matched), a
duplicate (IoU >= 0.5 with an object already matched), background (under 30% of its pixels on objects), merged
(over 15% of its pixels on each of two objects or more) or partial (the rest).

    python benchmarks/amg_kept_masks.py v7 0.8 0.95                          # the shipped weights
    python benchmarks/amg_kept_masks.py FILE.safetensors 0.5 0.93 --seeds 500:530
    python benchmarks/amg_kept_masks.py v7 0.8 0.9 --box-nms 0.3             # at another box NMS (default 0.7)
"""
import argparse

import numpy as np
import torch

from samantic.models import create_model
from samantic.ops import rle_decode, rle_encode, rle_iou
from samantic.pipeline import AutomaticMaskGenerator
from samantic.train.data.shapes import render_scene


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", help="sam_nano weights, or v7 for the shipped file")
    ap.add_argument("pred_iou", type=float)
    ap.add_argument("stability", type=float)
    ap.add_argument("--box-nms", type=float, default=0.7, help="the generator's box_nms_thresh")
    ap.add_argument("--seeds", default="500:530")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lo, hi = (int(v) for v in a.seeds.split(":"))
    model = create_model("sam_nano", checkpoint=None if a.weights == "v7" else a.weights).eval()
    gen = AutomaticMaskGenerator(model, pred_iou_thresh=a.pred_iou, stability_score_thresh=a.stability,
                                 box_nms_thresh=a.box_nms)
    cats = dict(match=0, duplicate=0, background=0, merged=0, partial=0)
    n_obj, missed = 0, []
    for s in range(lo, hi):
        scene = render_scene(s)
        found = gen.generate_masks(scene.image)
        gm = np.asarray(scene.masks, bool)
        n_obj += len(gm)
        used = set()
        if len(found) and len(gm):
            iou = rle_iou(found.rles, rle_encode(gm))
            pm = rle_decode(found.rles).astype(np.float32)
            inter = np.einsum("phw,ghw->pg", pm, gm.astype(np.float32))
            cover = inter / np.maximum(pm.reshape(len(pm), -1).sum(1, keepdims=True), 1)
            for i in np.argsort(-iou.max(1)):
                j = int(np.argmax(iou[i]))
                if iou[i, j] >= 0.5 and j not in used:
                    used.add(j)
                    cats["match"] += 1
                elif iou[i, j] >= 0.5:
                    cats["duplicate"] += 1
                elif cover[i].sum() < 0.3:
                    cats["background"] += 1
                elif (cover[i] > 0.15).sum() >= 2:
                    cats["merged"] += 1
                else:
                    cats["partial"] += 1
        missed += [float(gm[j].mean()) for j in range(len(gm)) if j not in used]
    print(f"{a.weights} at {a.pred_iou} / {a.stability}, seeds {a.seeds}: {n_obj} objects; kept {sum(cats.values())}: "
          f"{cats}; missed {len(missed)} (under 0.5% of the image: {sum(m < 0.005 for m in missed)}); missed areas %: "
          f"{np.round(np.sort(missed) * 100, 2).tolist()}")


if __name__ == "__main__":
    main()
