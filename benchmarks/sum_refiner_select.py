"""Can SUM's refiner be chosen on labelled scenes? Score trained refiners on labelled v2 scenes none of them
trained on, beside the held-out AUROC their own reports give.

A refiner's quality varies widely from seed to seed (``benchmarks/results/sum_v7/README.md``, "The refiner's
run-to-run spread"). SUM has labelled scenes of its own: if a refiner's score on some of them that it did not
train on ranks refiners as the held-out pool's AUROC does, a run can train a few seeds and keep the best without
touching held-out data. The validation scenes are labelled seeds after the ones the refiners trained on
(default ``3000120:3000150``; the refiners' 120 are 3,000,000-3,000,119): SAM (frozen) is prompted on them as for
the refiner's training data (:func:`~samantic.train.sum_refine.refiner_examples`), and each refiner is scored by

- ``loss``: its training loss (cross-entropy + dice) against the labelled masks;
- ``AUROC``: how well ``U = |sigmoid(SAM) - sigmoid(refined)|`` finds the pixels where SAM's mask (> 0.5) differs
  from the labelled one (> 0.5), over the images' valid pixels.

    python benchmarks/sum_refiner_select.py --refiner runs/spread/s1.safetensors=runs/spread/s1 --refiner ...

``PATH=REPORT_DIR`` adds the held-out AUROC from ``REPORT_DIR/sum_uncertainty.json`` to the row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_report  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refiner", action="append", required=True,
                    help="PATH or PATH=REPORT_DIR (a sum_uncertainty.py --out directory); repeatable")
    ap.add_argument("--model", default="sam_nano")
    ap.add_argument("--val-seeds", default="3000120:3000150", help="labelled v2 scenes START:STOP")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write sum_refiner_select.{json,md} here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from torchmetrics.functional import spearman_corrcoef

    from samantic.models import create_model
    from samantic.cli.eval import parse_seeds
    from samantic.train.sum import LABELLED_SEED, LabelledScenes
    from samantic.train.sum_refine import _valid_mask, auroc, load_refiner, refiner_examples, refiner_loss

    torch.set_num_threads(args.threads)
    try:
        seeds = parse_seeds(args.val_seeds)
    except Exception as e:  # typer's BadParameter outside a typer command
        raise SystemExit(f"--val-seeds: {e}") from None
    start, stop = seeds.start, seeds.stop
    if start < LABELLED_SEED:
        raise SystemExit(f"--val-seeds {args.val_seeds}: validation scenes are labelled scenes (>= {LABELLED_SEED})")
    model = create_model(args.model).eval()
    ex = refiner_examples(model, LabelledScenes(start, stop - start), seed=1234, progress=not args.no_progress)
    low = int(ex.coarse.shape[-1])
    valid = _valid_mask(ex.valid[ex.owner], low)
    sam_p = torch.sigmoid(ex.coarse.float())
    target = ex.target.float() / 255
    wrong = ((sam_p > 0.5) != (target > 0.5))[valid].numpy()
    rows = []
    for spec in args.refiner:
        path, _, report = spec.partition("=")
        refiner = load_refiner(path)
        refined = []
        with torch.no_grad():
            for i in range(0, len(ex), 32):
                own = ex.owner[i:i + 32]
                refined.append(refiner(ex.images[own].float(), ex.coarse[i:i + 32].float(), ex.embeddings[own].float()))
        refined = torch.cat(refined)
        loss = float(refiner_loss(refined, target, valid))
        u = (sam_p - torch.sigmoid(refined)).abs()[valid].numpy()
        row = {"refiner": path, "val_loss": loss, "val_auroc": auroc(u, wrong)}
        if report:
            ev = json.loads((Path(report) / "sum_uncertainty.json").read_text())["evaluation"]["auroc"]
            row["heldout_auroc"] = ev["image"]["uncertainty"]
            row["heldout_auroc_near"] = ev["near"]["uncertainty"]
        rows.append(row)
        print(json.dumps(row))
    ranked = [r for r in rows if "heldout_auroc" in r]
    corr = {}
    if len(ranked) >= 3:
        h = torch.tensor([r["heldout_auroc"] for r in ranked])
        corr = {"val_auroc": float(spearman_corrcoef(torch.tensor([r["val_auroc"] for r in ranked]), h)),
                "val_loss": float(spearman_corrcoef(torch.tensor([-r["val_loss"] for r in ranked]), h))}
        print(f"Spearman with the held-out AUROC: val AUROC {corr['val_auroc']:.3f}, -val loss {corr['val_loss']:.3f}")
    if args.out is not None:
        cmd = "python benchmarks/sum_refiner_select.py " + " ".join(argv if argv is not None else sys.argv[1:])
        result = {"command": cmd, "val_seeds": args.val_seeds, "pairs": len(ex),
                  "wrong_fraction": float(wrong.mean()), "rows": rows, "spearman": corr}
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        preamble = [f"`{cmd}`", "", f"Validation: labelled scenes {args.val_seeds}, {len(ex)} SAM outputs paired with "
                    f"their labelled masks ({wrong.mean():.3f} of the valid pixels wrong)."]
        if corr:
            preamble += ["", f"Spearman rank correlation with the held-out AUROC: val AUROC {corr['val_auroc']:.3f}, "
                             f"val loss (lower is better) {corr['val_loss']:.3f}."]
        table = [[r["refiner"], f"{r['val_loss']:.3f}", f"{r['val_auroc']:.3f}",
                  f"{fmt(r.get('heldout_auroc'))} / {fmt(r.get('heldout_auroc_near'))}"] for r in rows]
        write_report(args.out, "sum_refiner_select", result, table,
                     ["refiner", "val loss", "val AUROC of U", "held-out AUROC of U (every pixel / near)"],
                     preamble="\n".join(preamble))
    return 0


if __name__ == "__main__":
    sys.exit(main())
