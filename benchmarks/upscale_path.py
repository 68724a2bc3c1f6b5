"""The mask decoder's upscaling on the CPU: pixelwise rows (the default) against segment-anything's modules.

`PromptMaskDecoder.masks` computes the 4x upscaling of the selected prompts one prompt at a time on
channels-last rows (two matrix products, a LayerNorm over the channels, the activations) instead of running
``output_upscaling``'s five modules on [U, c, 4h, 4w] tensors (see samantic.pipeline.decoder). Both paths run
in this one process on the same model, image and settings, alternating, ``--repeats`` timed calls each after
a warm-up; reported: median seconds of segment-everything end to end and of its upscaling stage, the speed
ratio of the medians, masks, and whether the two paths' masks are identical (RLE for RLE) and their scores
differences (a logit within rounding of a stability threshold moves a score by a pixel's worth).

    python benchmarks/upscale_path.py --threads 2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402

# model: (pred_iou_thresh, stability_score_thresh) cases; None = the model's recommended thresholds, (0.3, 0.8) the
# shipped SAM-CP head's patches, (0, 0) every mask
CASES = {
    "sam_nano": [None, (0.0, 0.0)],
    "sam_nano_panoptic": [None, (0.3, 0.8), (0.0, 0.0)],
}


def _generator(model, thresholds, points_per_side: int):
    from samantic.pipeline import AutomaticMaskGenerator

    kw: Dict[str, Any] = {}
    if thresholds is not None:
        kw = {"pred_iou_thresh": thresholds[0], "stability_score_thresh": thresholds[1]}
    return AutomaticMaskGenerator(model, points_per_side=points_per_side, output_mode="coco_rle", **kw)


def _timed(gen, image, modules: bool) -> Dict[str, Any]:
    import samantic.pipeline.decoder as decoder

    original = decoder._pixelwise_upscaling
    spent = [0.0]

    def timed_masks(self, *a, **k):
        t = time.perf_counter()
        try:
            return masks(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    masks = decoder.PromptMaskDecoder.masks
    decoder.PromptMaskDecoder.masks = timed_masks
    if modules:
        decoder._pixelwise_upscaling = lambda *a: None
    try:
        t0 = time.perf_counter()
        out = gen.generate(image)
        total = time.perf_counter() - t0
    finally:
        decoder._pixelwise_upscaling = original
        decoder.PromptMaskDecoder.masks = masks
    return {"seconds": total, "upscale_seconds": spent[0], "masks": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", default="900001,900002", help="held-out shapes-world v2 scenes (800 x 600)")
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from samantic.models import create_model, recommended_thresholds
    from samantic.train.data.panoptic import render_panoptic

    torch.set_num_threads(args.threads)
    rows: List[Dict[str, Any]] = []
    for name, cases in CASES.items():
        model = create_model(name)
        for thresholds in cases:
            shown = thresholds or tuple(recommended_thresholds(model)[k]
                                        for k in ("pred_iou_thresh", "stability_score_thresh"))
            for seed in [int(s) for s in args.seeds.split(",")]:
                image = render_panoptic(seed, size=(600, 800)).image
                gen = _generator(model, thresholds, args.points_per_side)
                _timed(gen, image, False)  # warm-up of both paths
                _timed(gen, image, True)
                runs: Dict[str, List[Dict[str, Any]]] = {"pixelwise": [], "modules": []}
                for _ in range(args.repeats):  # alternating, so drift of the machine hits both alike
                    runs["pixelwise"].append(_timed(gen, image, False))
                    runs["modules"].append(_timed(gen, image, True))
                a, b = runs["pixelwise"][-1]["masks"], runs["modules"][-1]["masks"]
                same = len(a) == len(b) and all(
                    x["segmentation"]["counts"] == y["segmentation"]["counts"] for x, y in zip(a, b))
                scores = max([abs(x["predicted_iou"] - y["predicted_iou"]) + abs(x["stability_score"]
                              - y["stability_score"]) for x, y in zip(a, b)] or [0.0])
                med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
                up = {k: statistics.median(r["upscale_seconds"] for r in v) for k, v in runs.items()}
                rows.append({
                    "model": name, "pred_iou_thresh": shown[0], "stability_score_thresh": shown[1], "seed": seed,
                    "seconds": med, "upscale_seconds": up, "speedup": med["modules"] / med["pixelwise"],
                    "upscale_speedup": up["modules"] / up["pixelwise"] if up["pixelwise"] else float("nan"),
                    "masks": [len(a), len(b)], "identical_masks": bool(same), "max_score_difference": float(scores),
                })
                r = rows[-1]
                print(f"{name} {shown} scene {seed}: {med['modules']:.2f} s -> {med['pixelwise']:.2f} s "
                      f"({r['speedup']:.2f}x; upscaling {up['modules']:.2f} -> {up['pixelwise']:.2f} s), "
                      f"{len(a)} masks, identical {same}", flush=True)
    command = f"python benchmarks/upscale_path.py --threads {args.threads} --seeds {args.seeds} " \
              f"--points-per-side {args.points_per_side} --repeats {args.repeats} --out {args.out}"
    header = ["model", "thresholds (IoU, stability)", "scene", "modules s", "pixelwise s", "speed-up",
              "upscaling modules s", "upscaling pixelwise s", "upscaling speed-up", "masks", "identical masks", "max score difference"]
    table = [[r["model"], f"{r['pred_iou_thresh']:g}, {r['stability_score_thresh']:g}", str(r["seed"]),
              f"{r['seconds']['modules']:.2f}", f"{r['seconds']['pixelwise']:.2f}", f"**{r['speedup']:.2f}x**",
              f"{r['upscale_seconds']['modules']:.2f}", f"{r['upscale_seconds']['pixelwise']:.2f}",
              f"{r['upscale_speedup']:.2f}x", str(r["masks"][0]), "yes" if r["identical_masks"] else "no",
              f"{r['max_score_difference']:.1e}"]
             for r in rows]
    preamble = (f"Segment everything on the CPU ({args.threads} threads, {args.points_per_side} x "
                f"{args.points_per_side} grid), the decoder's upscaling as pixelwise rows (samantic's default) "
                f"against segment-anything's modules, side by side in one process, median of {args.repeats} "
                f"alternating runs. Held-out v2 scenes, 800 x 600.\n\nCommand: `{command}`")
    write_report(args.out, "upscale_path", {"machine": machine(), "command": command, "rows": rows}, table, header,
                 preamble)


if __name__ == "__main__":
    main()
