#!/usr/bin/env bash
# Everything a lent GPU machine should do in one call (device time is scarce: one start, one run):
# `make gpu-check` and the sam_nano training (scripts/gpu_train_nano.py) side by side, then the
# results packed into at most 8 files under $OUT (the device tool's limit):
#   $OUT/*.safetensors      the A/B candidates' weights and final.safetensors (the winner trained on)
#   $OUT/results.tar.gz     gpu-check/ (logs, JSON, markdown) and nano/ (training logs, eval.json, summary.md)
#
#   scripts/gpu_session.sh [AB_MINUTES] [FINAL_MINUTES]     (defaults 3.0 and 3.0; about 9 min in all)
set -uo pipefail
cd "$(dirname "$0")/.."
AB=${1:-3.0}
FINAL=${2:-3.0}
DEST=${OUT:-runs/gpu-session}
mkdir -p "$DEST"
WORK=/tmp/gpu-session
rm -rf "$WORK" && mkdir -p "$WORK/nano" "$WORK/gpu-check"
export PYTHONUNBUFFERED=1
nvidia-smi -L || true

python3 scripts/gpu_train_nano.py --out "$WORK/nano" --ab-minutes "$AB" --final-minutes "$FINAL" \
    --models sam_nano,sam_nano_conv,sam_nano_conv512,sam_nano_conv_s8 -- \
    --data shapes:1000000 --steps 1000000 --images-per-step 32 --masks-per-image 6 --iterations 2 \
    --lr 1e-3 --warmup-steps 150 --focal-weight 2 --focal-alpha 0.5 --focal-gamma 0 --flat-steps 200 \
    --checkpoint-every 100 --log-every 20 > "$WORK/nano/train.log" 2>&1 &
TRAIN=$!

# if the call is cut short, $OUT still holds the last weights and logs written (packed every 30 s)
pack() {
    for f in "$WORK"/nano/*.safetensors; do
        case "$f" in *.ab.safetensors) ;; *) [ -f "$f" ] && cp "$f" "$DEST"/ ;; esac
    done
    tar czf "$DEST/results.tar.gz.tmp" -C "$WORK" --exclude='*.safetensors' --exclude='*.ckpt' --exclude='*.tmp' \
        nano gpu-check 2>/dev/null && mv "$DEST/results.tar.gz.tmp" "$DEST/results.tar.gz"
}
( while sleep 30; do pack; done ) &
PACKER=$!

# what `make gpu-check` runs (called directly: the machine may lack make)
PYTHON=python3 bash scripts/gpu_check.sh "$WORK/gpu-check" > "$WORK/gpu-check/make.log" 2>&1
CHECK=$?
wait $TRAIN
TRAINED=$?

kill $PACKER 2>/dev/null; wait $PACKER 2>/dev/null
pack
echo "== gpu-check (exit $CHECK)"; tail -n 30 "$WORK/gpu-check/make.log"
echo "== training (exit $TRAINED)"; tail -n 25 "$WORK/nano/train.log"
ls -la "$DEST"
[ "$CHECK" = 0 ] && [ "$TRAINED" = 0 ]
