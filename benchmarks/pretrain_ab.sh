#!/usr/bin/env bash
# Encoder pretraining A/B (issue 15, item 2): does pretraining sam_nano's encoder on image-level class labels
# (`samantic train encoder`, the ImageNet stand-in) before SAM's recipe beat SAM's recipe alone, for the same
# minutes? Two arms side by side, each on THREADS threads and one data worker, from the same random init:
#   scratch     `samantic train sam` for MINUTES
#   pretrained  `samantic train encoder` for PRE_MINUTES, then `samantic train sam --checkpoint` for MINUTES - PRE_MINUTES
# then both scored on the same held-out scenes: `samantic eval sam` (1-point / 3-point mIoU) and `samantic eval
# probe` (class accuracy of a linear probe on the mask token and on the pooled embedding).
#
#   benchmarks/pretrain_ab.sh OUT_DIR [MINUTES] [PRE_MINUTES]      (defaults 30 and 10; DEVICE=cuda THREADS=8 on a GPU)
#
# Writes OUT_DIR/{scratch,pretrained}/ (weights, logs, eval_sam.*, eval_probe.*) and OUT_DIR/summary.md.
set -euo pipefail
OUTDIR=${1:?usage: pretrain_ab.sh OUT_DIR [MINUTES] [PRE_MINUTES]}
MINUTES=${2:-30}
PRE=${3:-10}
DEVICE=${DEVICE:-cpu}
THREADS=${THREADS:-1}
S=${SAMANTIC:-samantic}
POINT_SEEDS=${POINT_SEEDS:-0:100}; PROBE_TRAIN=${PROBE_TRAIN:-500000:500080}; PROBE_SEEDS=${PROBE_SEEDS:-0:40}
AMG_SEEDS=${AMG_SEEDS:-0:10}  # smaller: a smoke run
REST=$(python3 -c "print(round($MINUTES - $PRE, 3))")
mkdir -p "$OUTDIR/scratch" "$OUTDIR/pretrained"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1
# SAM's recipe for both arms (the CPU batch: 4 images x 8 masks x 3 rounds; v5's loss weights)
RECIPE=(--data shapes:1000000 --steps 100000 --lr 8e-4 --warmup-steps 30 --flat-steps 100 --focal-weight 2
        --focal-alpha 0.5 --focal-gamma 0 --workers 1 --device "$DEVICE" --checkpoint-every 50 --log-every 10
        --no-progress --resume)

arm_scratch() {
    $S train sam "${RECIPE[@]}" --time-budget "$MINUTES" --out "$OUTDIR/scratch/sam.safetensors"
}
arm_pretrained() {
    $S train encoder --minutes "$PRE" --steps 100000 --workers 1 --device "$DEVICE" --eval-seeds 0:100 \
        --no-progress --resume --out "$OUTDIR/pretrained/encoder.safetensors"
    $S train sam "${RECIPE[@]}" --time-budget "$REST" --checkpoint "$OUTDIR/pretrained/encoder.safetensors" \
        --out "$OUTDIR/pretrained/sam.safetensors"
}
date
arm_scratch > "$OUTDIR/scratch/train.log" 2>&1 &
A=$!
arm_pretrained > "$OUTDIR/pretrained/train.log" 2>&1 &
B=$!
wait $A
wait $B
date
for arm in scratch pretrained; do
    (
        W="$OUTDIR/$arm/sam.safetensors"
        [ -f "$OUTDIR/$arm/eval_sam.json" ] || $S eval sam --model sam_nano --checkpoint "$W" --seeds "$POINT_SEEDS" \
            --amg-seeds "$AMG_SEEDS" --no-ceiling --no-progress --out "$OUTDIR/$arm" > "$OUTDIR/$arm/eval_sam.log" 2>&1
        [ -f "$OUTDIR/$arm/eval_probe.json" ] || $S eval probe --model sam_nano --checkpoint "$W" --train-seeds "$PROBE_TRAIN" --seeds "$PROBE_SEEDS" \
            --features token,pooled --points-per-side 16 --epochs 30 --no-progress --out "$OUTDIR/$arm" \
            > "$OUTDIR/$arm/eval_probe.log" 2>&1
    ) &
done
wait
date
python3 - "$OUTDIR" "$MINUTES" "$PRE" "$POINT_SEEDS" "$PROBE_SEEDS" <<'EOF'
import json, sys
from pathlib import Path

out, minutes, pre, points, probe_seeds = Path(sys.argv[1]), *sys.argv[2:6]
fmt = lambda v: "-" if v is None or v != v else f"{v:.3f}"  # noqa: E731  (no probe: no mask matched)
rows = []
chance = float("nan")
for arm in ("scratch", "pretrained"):
    d = out / arm
    sam = json.loads((d / "eval_sam.json").read_text())
    # a model too weak for any mask to match a ground-truth instance gets no probe (the log says so)
    probe = json.loads((d / "eval_probe.json").read_text()) if (d / "eval_probe.json").exists() else {"rows": []}
    chance = probe.get("chance", chance)
    log = [json.loads(l) for l in (d / "sam.safetensors.log.jsonl").read_text().splitlines()]
    acc = {r["features"]: r["class_accuracy"] for r in probe["rows"]}
    pre_txt = "-"
    enc = d / "encoder.safetensors.log.jsonl"
    if enc.exists():
        elog = [json.loads(l) for l in enc.read_text().splitlines()]
        ho = [r["held_out"] for r in elog if "held_out" in r]
        steps = max(r["step"] for r in elog)
        pre_txt = f"{steps} steps; held-out mAP {ho[-1]['mAP']:.3f}" if ho else f"{steps} steps"
    rows.append(f"| {arm} | {pre_txt} | {log[-1]['step']} | {sam['metrics']['miou_1pt_top']:.3f} | {sam['metrics']['miou_3pt']:.3f} "
                f"| {fmt(acc.get('token'))} | {fmt(acc.get('pooled'))} |")
md = [f"Encoder pretraining A/B: {minutes} minutes per arm ({pre} of them pretraining in the second), "
      f"same random init (--seed 0), recipe and scene stream; held-out scenes {points} (points), {probe_seeds} (probe; chance "
      f"{fmt(chance)}).", "",
      "| arm | pretraining | SAM steps | 1-point mIoU | 3-point mIoU | probe: token | probe: pooled |",
      "|---|---|---|---|---|---|---|", *rows, ""]
(out / "summary.md").write_text("\n".join(md))
print("\n".join(md))
EOF
