"""Diagnostic (stop 72, not a tool): which prompts should `samantic train iou-head --kind tasks` fit sam_nano_sum v1's
IoU head on? Every variant fits the head with `fit_iou_head` on examples cached by `samantic train iou-head` and is
scored on held-out validation seeds 600-659 only (v2 task clicks, v1 plain scenes); held-out v2 scenes 0-29 and v1
0-59, on which issue 18 is measured, are not read here.

    samantic train iou-head --model sam_nano_sum --kind tasks --replay 240 --out runs/refit/x.safetensors \
        --cache runs/cache/iou_tasks            # collects the four example files below (about 20 min)
    python benchmarks/results/sum_v9/iou_refit/sweep.py runs/cache/iou_tasks runs/sum_v9/ship/sam_nano_sum.safetensors > sweep.md

(the second argument: sam_nano_sum v1's file, `git show 7a02bcf:sdk/samantic/assets/sam_nano_sum.safetensors`)
"""
import sys

import numpy as np
import torch

from samantic.models import create_model
from samantic.train.iou_head import IouExamples, fit_iou_head, iou_head_quality

torch.set_num_threads(2)
d = sys.argv[1].rstrip("/") + "/"
tasks = IouExamples.load(d + "train_tasks_4clicks_3000000_120.npz")
val = IouExamples.load(d + "val_tasks_4clicks_600_60.npz")
plain = IouExamples.load(d + "train_v1_48pts_under_unspecified_46000000_240.npz")
plain_val = IouExamples.load(d + "val_v1_48pts_under_unspecified_600_60.npz")
head0 = create_model("sam_nano_sum", checkpoint=sys.argv[2]).mask_decoder.iou_prediction_head  # v1's head


def sub(ex, keep):
    return IouExamples(**{k: getattr(ex, k)[keep] for k in ("feats", "preds", "trues", "kinds", "tasks")})


def row(name, head, lr="", epochs="", weight=""):
    with torch.no_grad():
        q = iou_head_quality(head(torch.from_numpy(val.feats)).numpy(), val)
        p = iou_head_quality(head(torch.from_numpy(plain_val.feats)).numpy(), plain_val)
    print(f"| {name} | {lr} | {epochs} | {weight} | {q['task_picked']:.4f} | {p['centre_picked']:.4f} | "
          f"{p['corr_uniform']:.4f} |", flush=True)


print("| training prompts | lr | epochs | centre weight | v2 task clicks: task-averaged pick | v1 centres: pick "
      "| v1 uniform points: correlation |\n|---|---|---|---|---|---|---|")
row("v1's head, not refitted", head0)
centres = sub(tasks, tasks.kinds == 1)
one_inside = sub(tasks, (tasks.kinds == 1) | (np.arange(len(tasks)) % 5 < 2))  # centre + the first inside click
plain_centres = sub(plain, plain.kinds == 1)
variants = [("task centres", centres, 1.0), ("task centres + 4 inside", tasks, 1.0),
            ("task centres + plain centres", centres + plain_centres, 1.0),
            ("task centres + 4 inside + plain centres", tasks + plain_centres, 1.0),
            ("task centres + plain (uniform + centres)", centres + plain, 1.0),
            ("task centres + 1 inside + plain", one_inside + plain, 1.0),
            ("task centres + 4 inside + plain", tasks + plain, 1.0),
            ("task centres + 4 inside + plain", tasks + plain, 2.0)]
for name, ex, w in variants:
    for lr, epochs in ((1e-3, 30), (3e-4, 60)):
        head, _ = fit_iou_head(head0, ex, lr=lr, epochs=epochs, centre_weight=w)
        row(name, head, lr, epochs, w)
