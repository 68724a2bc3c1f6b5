"""Why does a SAM-CP head miss segments? Every missed ground-truth segment of held-out v2 scenes, by cause.

PQ counts a ground-truth segment as recognised when a predicted segment of its category overlaps
it at IoU above 0.5. For every segment the head misses on held-out panoptic (v2) scenes, this
looks at what the head had before it chose (all its candidates: a Type-II query per patch for
things, a Type-I query per stuff class, each the union of the patches its affinities select, at
any score) and names the first cause that applies:

  patches     no union of the patches reaches IoU 0.5: the perfect head (the training targets as
              scores, ``OracleSamcpScorer``) misses it too; a better SAM, not a better head
  score       a candidate of the right class reaches IoU 0.5, but scores under the score threshold
  fusion      such a candidate passes the threshold but is gone after NMS or panoptic fusion
              (a better candidate of its class overlapping it, or it kept too little of its mask)
  class       a candidate of another class reaches IoU 0.5 (confusion)
  mask        the right class's best candidate overlaps it at IoU 0.2-0.5 (patches merged with a
              neighbour's, or too few of its own)
  none        no candidate of its class overlaps it at IoU 0.2

Per category: segments, recognised (the head's recall, RQ's), and the misses by cause.

    python benchmarks/samcp_misses.py --samcp pkg:assets/samcp_nano_panoptic.safetensors --seeds 0:40 \
        --out benchmarks/results/samcp_nano_panoptic_v2/misses
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402

CAUSES = ("patches", "score", "fusion", "class", "mask", "none")


def _ious(masks: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of each of ``masks`` ``[N, H, W]`` bool with ``gt`` ``[H, W]`` bool."""
    if len(masks) == 0:
        return np.zeros(0)
    inter = (masks & gt).reshape(len(masks), -1).sum(1)
    union = (masks | gt).reshape(len(masks), -1).sum(1)
    return inter / np.maximum(union, 1)


def _recognised(panoptic: np.ndarray, segments: list, cat: int, gt: np.ndarray, cat_of_name: dict) -> bool:
    """A segment of ``cat`` in a predicted panoptic map covers ``gt`` at IoU > 0.5 (PQ's match)."""
    for s in segments:
        if cat_of_name[s["category_name"]] == cat and _ious((panoptic == s["id"])[None], gt)[0] > 0.5:
            return True
    return False


def classify(cands: list, cat: int, gt: np.ndarray, score_thresh: float, head_hit: bool, oracle_hit: bool):
    """(cause, the confused category id for "class" else None) of one segment (``cands``: (category id,
    score, mask) of every candidate); the cause is "recognised" when the head found it."""
    if head_hit:
        return "recognised", None
    if not oracle_hit:
        return "patches", None
    same = [(s, m) for c, s, m in cands if c == cat]
    other = [(c, s, m) for c, s, m in cands if c != cat]
    iou_same = _ious(np.array([m for _, m in same]), gt) if same else np.zeros(0)
    if len(iou_same) and iou_same.max() > 0.5:
        good = [s for (s, _), v in zip(same, iou_same) if v > 0.5]
        return ("fusion" if max(good) >= score_thresh else "score"), None
    if other:
        iou_other = _ious(np.array([m for _, _, m in other]), gt)
        if iou_other.max() > 0.5:
            return "class", other[int(iou_other.argmax())][0]
    if len(iou_same) and iou_same.max() > 0.2:
        return "mask", None
    return "none", None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samcp", default="pkg:assets/samcp_nano_panoptic.safetensors", help="SAM-CP head file")
    ap.add_argument("--model", default=None, help="SAM (default: the one the head was trained on)")
    ap.add_argument("--seeds", default="0:40", help="held-out v2 scene seeds START:STOP")
    ap.add_argument("--cache", type=Path, default=Path("runs/cache/samcp"), help="patch cache root")
    ap.add_argument("--out", type=Path, default=Path("runs/eval/samcp_misses"))
    args = ap.parse_args()

    from samantic.heads.samcp import load_samcp
    from samantic.models import create_model
    from samantic.ops import merge_patches, rle_decode
    from samantic.pipeline.panoptic import SamcpPredictor
    from samantic.train.data.panoptic import CATEGORIES, render_panoptic
    from samantic.train.samcp_cache import STREAM_PREFIX, GroundTruth, PanopticSample, PatchCache
    from samantic.train.samcp_eval import OracleSamcpScorer

    t0 = time.perf_counter()
    start, stop = (int(v) for v in args.seeds.split(":"))
    path = args.samcp
    if path.startswith("pkg:"):
        from samantic.models import resolve_checkpoint

        path = str(resolve_checkpoint(path))
    head = load_samcp(path)
    model = head.sam_for(args.model, path)
    sam = create_model(model)
    pred = SamcpPredictor(head, instance_thresh=0.0)  # every Type-II query's candidate, at any score
    patch_opts = pred.patch_options()
    cache = PatchCache(args.cache, sam, **patch_opts)
    oracle = SamcpPredictor(OracleSamcpScorer(cache, CATEGORIES), flip=False)
    cat_of_name = {c["name"]: int(c["id"]) for c in CATEGORIES}
    names = {int(c["id"]): c["name"] for c in CATEGORIES}
    things = {int(c["id"]) for c in CATEGORIES if c["isthing"]}
    tally, confusion = defaultdict(Counter), defaultdict(Counter)
    for seed in range(start, stop):
        scene = render_panoptic(seed)
        gt = GroundTruth.from_panoptic(scene.panoptic, scene.segments, things)
        sample = PanopticSample(f"{STREAM_PREFIX}{seed}", scene.image, gt)
        entry = cache.get(sample.image)
        if entry is None:
            entry = cache.compute(sample)
        batch, boxes = entry.patch_batch(), entry.patch_boxes
        out = pred(sample.image, batch, boxes)
        out_o = oracle(sample.image, batch, boxes)
        # every candidate the head had, before NMS and fusion
        aff, cls, presence = pred.scores(sample.image, batch, boxes)
        cands = pred.candidates(aff, cls, presence)
        groups = np.stack([sel for _, _, sel in cands]) if cands else np.zeros((0, len(batch)), bool)
        masks = np.asarray(rle_decode(merge_patches(batch, groups).rles), bool) if cands else np.zeros((0,) + scene.panoptic.shape, bool)
        cand = [(cat_of_name[pred.names[k]], s, m) for (k, s, _), m in zip(cands, masks)]
        for sid, cat in scene.segments:
            g = scene.panoptic == int(sid)
            if not g.any():
                continue
            cause, confused = classify(cand, int(cat), g, pred.score_thresh,
                             _recognised(out.panoptic, out.segments_info, int(cat), g, cat_of_name),
                             _recognised(out_o.panoptic, out_o.segments_info, int(cat), g, cat_of_name))
            tally[int(cat)][cause] += 1
            if confused is not None:
                confusion[int(cat)][names[confused]] += 1
    rows, payload = [], {"samcp": args.samcp, "model": model, "seeds": args.seeds, "options": pred.options,
                         "patches": patch_opts, "machine": machine(), "per_category": {}}
    total = Counter()
    for cat in sorted(tally):
        c = tally[cat]
        total.update(c)
        payload["per_category"][names[cat]] = {**c, "taken_for": dict(confusion[cat])}
    for label, c in [(names[cat], tally[cat]) for cat in sorted(tally)] + [("**all**", total)]:
        n = sum(c.values())
        cat = cat_of_name.get(label)
        taken = ", ".join(f"{k} {v}" for k, v in confusion[cat].most_common()) if cat in confusion else ""
        rows.append([label, str(n), f"{c['recognised'] / max(n, 1):.3f}"] + [str(c[k]) for k in CAUSES] + [taken])
    payload["total"] = dict(total)
    payload["seconds"] = round(time.perf_counter() - t0, 1)
    pre = (f"`python benchmarks/samcp_misses.py --samcp {args.samcp} --seeds {args.seeds}`\n\n"
           f"Held-out v2 scenes {args.seeds}, head {args.samcp} on {model}'s patches ({patch_opts}), inference "
           f"options {pred.options}. Per ground-truth segment: recognised (a predicted segment of its category at "
           "IoU > 0.5, as PQ matches), else the first cause that applies (the script's docstring). "
           f"({payload['seconds']:.0f} s)")
    write_report(args.out, "samcp_misses", payload, rows,
                 ["category", "segments", "recognised"] + list(CAUSES) + ["class: taken for"], pre)
    print((args.out / "samcp_misses.md").read_text())


if __name__ == "__main__":
    main()
