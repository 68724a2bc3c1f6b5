"""Why did SUM fine-tunes with a trained image encoder lose plain-scene accuracy? Batch norm.

sam_nano's convolutional encoder has batch norm, trained on 32-image batches. A fine-tune on this
CPU uses 4-image batches in train mode, so (1) the embeddings it trains on are not the ones it
computes at inference, and (2) its running statistics drift toward the new data. This measures,
on plain (v1) scenes from the replay range:

  embed   relative squared difference ``mean((e - e0)^2) / mean(e0^2)`` of image embeddings
          against the base in eval mode: the base in train mode (batch statistics of 4 images),
          and each ``--checkpoint`` in eval mode
  swap    single-point mIoU on held-out plain scenes (``--seeds``) of the base, of each checkpoint,
          and of each checkpoint with the base's running statistics put back

    python benchmarks/sum_batchnorm.py --checkpoint runs/sum/ft/f_enc01.safetensors --seeds 0:60 \
        --out benchmarks/results/sum_ablation_v3

About 3 CPU minutes a checkpoint (2 threads).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, help="fine-tuned sam_nano weights (repeatable)")
    ap.add_argument("--seeds", default="0:60", help="held-out plain scenes for single-point mIoU, START:STOP")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sum_ablation_v3"))
    args = ap.parse_args()

    import numpy as np
    import torch

    from samantic.models import create_model
    from samantic.train.metrics import evaluate_sam
    from samantic.train.sam import Preparer, SamTrainConfig, SamTrainer, ShapesStream, collate
    from samantic.train.sum_train import REPLAY_SEED

    torch.set_num_threads(args.threads)
    start, stop = (int(x) for x in args.seeds.split(":"))
    base = create_model("sam_nano").eval()
    prep = Preparer(base.image_encoder.img_size, base.prompt_encoder.mask_input_size[0],
                    SamTrainConfig(zoom_prob=0.0, flat_steps=0))
    rng = np.random.default_rng(0)
    items = [prep(ShapesStream(REPLAY_SEED)[i], rng, 0) for i in range(8)]
    batch = collate([it for it in items if it is not None][:4])
    x = SamTrainer(base, SamTrainConfig(), None)._images(batch)

    def rel(e, ref):
        return float(((e - ref) ** 2).mean() / (ref ** 2).mean())

    def miou(model):
        return evaluate_sam(model, range(start, stop), range(0), progress=False).metrics["miou_1pt_top"]

    with torch.no_grad():
        ref = base.image_encoder(x)
        fresh = create_model("sam_nano").image_encoder.train()  # a train-mode forward updates running statistics
        train_mode = rel(fresh(x), ref)
    rows = [["base, train mode (4-image batch statistics)", f"{train_mode:.3f}", "", ""],
            ["base", "0", f"{miou(base):.4f}", ""]]
    payload = {"machine": machine(), "seeds": args.seeds, "base_train_mode": train_mode, "checkpoints": {}}
    stats = {k: v for k, v in base.image_encoder.state_dict().items() if "running_" in k}
    for ck in args.checkpoint:
        tuned = create_model("sam_nano", checkpoint=ck).eval()
        with torch.no_grad():
            drift = rel(tuned.image_encoder(x), ref)
        own = miou(tuned)
        state = tuned.image_encoder.state_dict()
        state.update(stats)
        tuned.image_encoder.load_state_dict(state)
        swapped = miou(tuned)
        payload["checkpoints"][ck] = {"embedding_drift": drift, "miou_1pt": own, "miou_1pt_base_bn_stats": swapped}
        rows.append([ck, f"{drift:.3f}", f"{own:.4f}", f"{swapped:.4f}"])
        print(rows[-1], flush=True)
    cmd = "python benchmarks/sum_batchnorm.py " + " ".join(f"--checkpoint {c}" for c in args.checkpoint) + \
        f" --seeds {args.seeds}"
    write_report(args.out, "batchnorm", payload, rows,
                 ["encoder", "embedding difference vs base (eval)", "plain 1-pt mIoU", "with the base's BN statistics"],
                 preamble=f"`{cmd}`")


if __name__ == "__main__":
    main()
