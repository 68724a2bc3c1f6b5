"""SUM's uncertainty map: how well U = |pseudo-label p - refined p| finds the pixels where pseudo-labels are wrong.

The chain (``samantic.train.sum_refine.uncertainty_benchmark``):
  1. SAM (sam_nano, frozen) is prompted on ``--labelled`` labelled v2 scenes (seeds from 3,000,000);
     its outputs paired with the labelled masks train the mask-refinement module (about
     ``--refiner-minutes`` of CPU);
  2. segment-everything pseudo-labels ``--pool`` unlabelled pool scenes (seeds from 4,000,000) and
     ``--heldout`` held-out pool scenes (seeds from ``--heldout-seed``, below the training range),
     cached under ``--cache-dir`` (logits kept, float16);
  3. on the held-out scenes, each pseudo-label is matched to the ground-truth segment (entity or
     part) it overlaps most, and three per-pixel scores are ranked against the pixels where they
     differ: U, the pseudo-label's own confidence 1 - |2p - 1| (the baseline) and the refined
     mask's 1 - |2r - 1|. AUROC pooled over all masks, on every pixel and near each mask.

    python benchmarks/sum_uncertainty.py --labelled 120 --pool 10 --heldout 30 --out benchmarks/results/sum_uncertainty

About 20 CPU minutes (1 thread): refiner data 1, refiner training 16 (2000 steps of 8), pool and
held-out pseudo-labels 2.5, evaluation 0.2. 2000 steps, not 1000: at 1000 the refiner's quality was a
seed lottery (held-out AUROC of U 0.70-0.92 over five draws on sam_nano v7), at 2000 three draws gave
0.889-0.909 (benchmarks/results/sum_v7/README.md, "The refiner's run-to-run spread").
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402


def main(argv=None) -> int:
    from samantic.train.sum_refine import BenchmarkConfig

    d = BenchmarkConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--labelled", type=int, default=d.labelled, help="labelled scenes the refiner learns from")
    ap.add_argument("--pool", type=int, default=d.pool, help="unlabelled pool scenes to pseudo-label (0: none)")
    ap.add_argument("--heldout", type=int, default=d.heldout, help="held-out pool scenes the uncertainty is scored on")
    ap.add_argument("--heldout-seed", type=int, default=d.heldout_seed)
    ap.add_argument("--points-per-side", type=int, default=d.points_per_side)
    ap.add_argument("--pred-iou-thresh", type=float, default=None, help="default: the model's recommended one")
    ap.add_argument("--stability-score-thresh", type=float, default=None, help="default: the model's recommended one")
    ap.add_argument("--refiner-steps", type=int, default=d.refiner_steps)
    ap.add_argument("--refiner-minutes", type=float, default=d.refiner_minutes,
                    help="wall-clock cap on refiner training (0: none; the steps decide)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr, help="refiner's peak learning rate (AdamW, cosine decay)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--cache-dir", default=d.cache_dir)
    ap.add_argument("--refiner-out", default=d.refiner_out)
    ap.add_argument("--out", type=Path, default=None, help="write sum_uncertainty.{json,md} here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from samantic.train.sum_refine import uncertainty_benchmark

    torch.set_num_threads(args.threads)
    config = BenchmarkConfig(
        model=args.model, labelled=args.labelled, pool=args.pool, heldout=args.heldout, heldout_seed=args.heldout_seed,
        points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh, refiner_steps=args.refiner_steps,
        refiner_minutes=args.refiner_minutes, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        cache_dir=args.cache_dir, refiner_out=args.refiner_out,
    )
    result = uncertainty_benchmark(config, progress=not args.no_progress)
    result["machine"] = machine()
    args_given = argv if argv is not None else sys.argv[1:]
    result["command"] = "python benchmarks/sum_uncertainty.py " + " ".join(shlex.quote(a) for a in args_given)
    ev = result["evaluation"]
    names = {"uncertainty": "U = |p - r| (SUM)", "confidence": "1 - |2p - 1| (pseudo-label's own, baseline)",
             "refined_confidence": "1 - |2r - 1| (refined mask's own)"}
    for region in ("image", "near"):
        print(f"AUROC ({region}): " + ", ".join(f"{s} {ev['auroc'][region][s]:.4f}" for s in names))
    if args.out is not None:
        header = ["score", "AUROC, every pixel", "AUROC, near the mask", "mean per-mask AUROC, every pixel",
                  "mean per-mask AUROC, near"]
        table = [[label.replace("|", "\\|"), f"{ev['auroc']['image'][s]:.4f}", f"{ev['auroc']['near'][s]:.4f}",
                  f"{ev['mean_mask_auroc']['image'][s]:.4f}", f"{ev['mean_mask_auroc']['near'][s]:.4f}"]
                 for s, label in names.items()]
        ex, rf, hp = result["examples"], result["refiner"], result["heldout_pseudo_labels"]
        hist = rf["history"]
        preamble = "\n".join([
            "# SUM uncertainty: does U find the pseudo-labels' wrong pixels?",
            "",
            f"`{result['command']}`",
            "",
            f"- refiner: {rf['parameters']:,} parameters, trained {rf['steps']} steps (batch {config.batch_size}, "
            f"lr {config.lr:g}, seed {config.seed}) in {hist[-1]['seconds']:.0f} s on {ex['pairs']} pairs from "
            f"{ex['images']} labelled v2 scenes "
            f"(seeds {config.labelled_seed}+; prompts {ex['by_prompt']}); SAM's IoU with the paired masks "
            f"{ex['coarse_iou']:.3f}; loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}",
            f"- pseudo-labels: {config.model} segment-everything, {config.points_per_side}x{config.points_per_side} "
            f"points, thresholds {hp['thresholds']}; held-out pool scenes {config.heldout_seed}:"
            f"{config.heldout_seed + config.heldout} (v2, below the training seeds) gave {hp['masks']} masks",
            f"- errors: pixels where a pseudo-label differs from the ground-truth segment (entity or part) it "
            f"overlaps most; {ev['error_fraction']['image']:.4f} of all pixels, {ev['error_fraction']['near']:.4f} "
            f"near the masks ({ev['masks_with_errors']} of {ev['masks']} masks have errors)",
            f"- mean IoU with the matched segment: pseudo-labels {ev['pseudo_iou']:.4f}, refined (r > 0.5) "
            f"{ev['refined_iou']:.4f}",
            f"- 'near': the box around the pseudo-label and its segment, widened by {ev['margin']} of its size "
            f"each way; pooled AUROC from {ev['bins']} log-spaced score bins (ties within a bin count half)",
            f"- {result['machine']['processor']}, {result['machine']['cpus']} CPUs (shared), "
            f"torch threads {args.threads}",
        ])
        write_report(args.out, "sum_uncertainty", result, table, header, preamble=preamble)
    return 0


if __name__ == "__main__":
    sys.exit(main())
