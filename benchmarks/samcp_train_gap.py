"""How much of a SAM-CP head's accuracy is memorised? The same metrics on training and held-out scenes.

A head scored on scenes it was trained on, beside held-out ones, with a perfect head (the oracle:
the training targets as scores) on both: the gap between the two head rows is what it memorised,
the head's train row against the oracle's how far it fits its own training targets. Training
scenes come from the patch cache the head was trained from (nothing is recomputed when the
cache holds them). Never a reported accuracy: `samantic eval samcp` refuses training seeds.

    python benchmarks/samcp_train_gap.py runs/samcp/v6b/samcp_tuned.safetensors \\
        --checkpoint runs/nano6b/sam_nano6b.safetensors --train-seeds 1000000:1000040 --seeds 0:40
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("head", type=Path)
    ap.add_argument("--model", default="sam_nano")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--cache", default="runs/cache/samcp")
    ap.add_argument("--train-seeds", default="1000000:1000040", help="v2 training scenes START:STOP")
    ap.add_argument("--seeds", default="0:40", help="held-out v2 scenes START:STOP")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--name", default="samcp_train_gap")
    args = ap.parse_args()

    from samantic.cli.eval import parse_seeds
    from samantic.heads.samcp import load_samcp
    from samantic.models import create_model
    from samantic.pipeline.panoptic import SamcpPredictor
    from samantic.train.data.panoptic import CATEGORIES
    from samantic.train.samcp_cache import PatchCache
    from samantic.train.samcp_eval import OracleSamcpScorer, evaluate_samcp

    sam = create_model(args.model, checkpoint=args.checkpoint)
    head = load_samcp(args.head)
    mismatch = head.check_weights(sam, str(args.head))
    if mismatch:  # other weights cut other patches: the training rows would not be the scenes it learned
        sys.exit(f"error: {mismatch} (give the --checkpoint it was trained with)")
    pred = SamcpPredictor(head)
    po = pred.patch_options()
    oracle = SamcpPredictor(OracleSamcpScorer(PatchCache(args.cache, sam, **po), CATEGORIES))
    rows = []
    for split, spec in (("training", args.train_seeds), ("held-out", args.seeds)):
        seeds = parse_seeds(spec)
        for who, p in (("head", pred), ("oracle", oracle)):
            r = evaluate_samcp(p, sam, seeds, args.cache, kind="v2", progress=False, training_seeds=True, **po)
            pq = r.pq["all"]
            rows.append({"scenes": f"{split} {spec}", "row": who, "pq": pq["pq"], "sq": pq["sq"], "rq": pq["rq"],
                         "pq_things": r.pq["things"]["pq"], "pq_stuff": r.pq["stuff"]["pq"], "ap50": r.ap50,
                         "miou": r.miou})
            print(rows[-1], flush=True)
    cols = ["scenes", "row", "pq", "sq", "rq", "pq_things", "pq_stuff", "ap50", "miou"]
    table = [[r[c] if isinstance(r[c], str) else f"{r[c]:.3f}" for c in cols] for r in rows]
    preamble = (f"`python benchmarks/samcp_train_gap.py {args.head} --checkpoint {args.checkpoint} "
                f"--train-seeds {args.train_seeds} --seeds {args.seeds}`\n\nHead `{args.head}`, patches {po}.")
    write_report(args.out, args.name, {"machine": machine(), "head": str(args.head), "patches": po, "rows": rows},
                 table, cols, preamble)

if __name__ == "__main__":
    main()
