"""How much can a task prompt add? The one-click oracle over SAM's three outputs, per task (issue 18).

A task prompt can only help where the model's own pick among its three outputs (the highest predicted
IoU) is the wrong granularity. For every held-out v2 task mask, one click at its centre, asked as
"unspecified" and as its own task: the IoU of the picked output (what ``samantic eval sum`` scores at one
point) and of the best of the three against the ground truth (the oracle, which no prompt can beat
without better masks). The gap between the unspecified pick and the unspecified oracle bounds what
choosing the granularity can give; the oracle itself bounds what a task prompt that only chooses can reach.
The part task is also reported split: composite things' parts (where the unspecified answer, the whole
thing, scores about 0.5) and simple things (their own part: the same mask as the unspecified answer), since
only the first can gain from the part prompt.

    python benchmarks/sum_task_ceiling.py --column base=sam_nano --column ft=runs/sum/ft/X.safetensors \
        --seeds 0:30 --out benchmarks/results/sum_stability/task_ceiling
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from samantic.cli.eval import load_column, parse_seeds
from samantic.models import TASKS
from samantic.pipeline.predictor import Predictor
from samantic.train.data.panoptic import render_panoptic
from samantic.train.metrics import TRAIN_SEED_START, centre_point, mask_iou
from samantic.train.sum import scene_task_masks
from samantic.train.sum_eval import prompt_coords


def one_click(predictor: Predictor, image: np.ndarray, masks: np.ndarray, task_ids: np.ndarray):
    """IoU of each of the three outputs, the predicted IoUs and the IoU of the mean of the three outputs' logits:
    ``(iou [N, 3], score [N, 3], mean_iou [N])``."""
    c = prompt_coords(predictor, np.array([[centre_point(m)] for m in masks], np.float64), image.shape[:2])
    lab = torch.ones(len(masks), 1, dtype=torch.int)
    logits, scores, _ = predictor.predict_torch(c, lab, multimask_output=True, task=torch.as_tensor(task_ids),
                                                return_logits=True)
    threshold = predictor.model.mask_threshold
    pred = (logits > threshold).cpu().numpy()
    mean = (logits.mean(1) > threshold).cpu().numpy()
    iou = np.array([[mask_iou(p, g) for p in ps] for ps, g in zip(pred, masks)])
    mean_iou = np.array([mask_iou(p, g) for p, g in zip(mean, masks)])
    return iou, scores.cpu().numpy(), mean_iou


# The part task's masks split: a composite thing's parts (the whole thing answers one at IoU about 0.5) and
# simple things (their own part, the same mask as the unspecified answer): only the first can gain from a prompt.
COMPOSITE, SIMPLE = "part: of composites", "part: simple things"
ROWS = tuple(TASKS) + (COMPOSITE, SIMPLE)


def rows(masks: np.ndarray, tasks: np.ndarray):
    """``(row name, bool selection)`` per task, then the part task split into composites' parts and simple things."""
    for t, name in enumerate(TASKS):
        yield name, tasks == t
    things = masks[tasks == TASKS.index("unspecified")]
    part = tasks == TASKS.index("part")
    whole = np.array([any(np.array_equal(m, th) for th in things) for m in masks]) & part
    yield COMPOSITE, part & ~whole
    yield SIMPLE, whole


def task_scenes(seeds):
    """``(scene, task masks, task ids)`` of every v2 scene of ``seeds`` that has task masks."""
    for seed in seeds:
        scene = render_panoptic(seed)
        masks, tasks = scene_task_masks(scene)
        if len(masks):
            yield scene, masks, tasks


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--column", action="append", required=True,
                   help="NAME=WEIGHTS[@SIDE]: a registered model or sam_nano weights file, optionally at input side SIDE "
                        "(default: the side the file was fine-tuned at, else the config's)")
    p.add_argument("--seeds", default="0:30")
    p.add_argument("--training-seeds", action="store_true",
                   help="allow seeds the training draws from (>= 1,000,000): how well a column fits its own "
                        "labelled scenes, a diagnostic (learnt or not, or only memorised), never a held-out result")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    seeds = parse_seeds(a.seeds)
    in_training_range = seeds.stop > TRAIN_SEED_START
    if in_training_range and not a.training_seeds:
        raise SystemExit(f"--seeds {a.seeds}: reaches the training seeds (>= {TRAIN_SEED_START}); "
                         "--training-seeds to measure the fit on them")
    cols = {name: sam for name, _, sam in (load_column(s) for s in a.column)}
    t0 = time.perf_counter()
    # rows: column -> prompt -> task -> lists of (picked IoU, oracle IoU, IoU of the three outputs' mean)
    acc: Dict[str, Dict[str, Dict[str, List[List[float]]]]] = {
        c: {q: {t: [[], [], []] for t in ROWS} for q in ("unspecified", "own")} for c in cols}
    predictors = {c: Predictor(m.eval()) for c, m in cols.items()}
    with torch.no_grad():
        for scene, masks, tasks in task_scenes(seeds):
            for c, pr in predictors.items():
                pr.set_image(scene.image)
                for q, ids in (("unspecified", np.zeros(len(masks), np.int64)), ("own", tasks.astype(np.int64))):
                    iou, score, mean_iou = one_click(pr, scene.image, masks, ids)
                    picked = iou[np.arange(len(iou)), score.argmax(1)]
                    for t, sel in rows(masks, tasks):
                        acc[c][q][t][0].extend(picked[sel].tolist())
                        acc[c][q][t][1].extend(iou[sel].max(1).tolist())
                        acc[c][q][t][2].extend(mean_iou[sel].tolist())
    res = {c: {q: {t: {"picked": float(np.mean(v[0])) if v[0] else None,
                              "oracle": float(np.mean(v[1])) if v[1] else None,
                              "mean_of_three": float(np.mean(v[2])) if v[2] else None, "masks": len(v[0])}
                   for t, v in per.items()} for q, per in d.items()} for c, d in acc.items()}
    cmd = ("python benchmarks/sum_task_ceiling.py " + " ".join(f"--column {s}" for s in a.column) + f" --seeds {a.seeds}"
           + (" --training-seeds" if a.training_seeds else ""))
    held = "TRAINING-RANGE (fit, not held-out accuracy)" if in_training_range else "Held-out"
    lines = [f"`{cmd}`", "", f"{held} v2 scenes {a.seeds}; one click at each task mask's centre; mIoU of the output "
             "with the highest predicted IoU (picked, what `samantic eval sum` scores) and of the best of the three "
             "against the ground truth (oracle); with the own task prompt also the mask of the three outputs' mean logits "
             "(a diagnostic: a fine-tune with task answers trains all three toward the task's one mask).", "",
             "| column | task | masks | unspecified prompt: picked | oracle | own task prompt: picked | oracle "
             "| mean of three |",
             "|---|---|---|---|---|---|---|---|"]
    for c, d in res.items():
        for t in ROWS:
            u, o = d["unspecified"][t], d["own"][t]
            if not u["masks"]:
                continue
            lines.append(f"| {c} | {t} | {u['masks']} | {u['picked']:.3f} | {u['oracle']:.3f} | "
                         f"{o['picked']:.3f} | {o['oracle']:.3f} | {o['mean_of_three']:.3f} |")
    lines += ["", f"({time.perf_counter() - t0:.0f} s)"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps({"command": cmd, "seeds": a.seeds, "results": res}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
