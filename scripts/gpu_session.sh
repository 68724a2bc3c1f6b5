#!/usr/bin/env bash
# Everything a lent GPU machine should do in one call (device time is scarce: one start, one run):
# `make gpu-check` and sam_nano training (scripts/gpu_train_nano.py) side by side, then the results
# packed into at most 8 files under $OUT (the device tool's limit):
#   $OUT/*.safetensors      trained weights (fp32)
#   $OUT/results.tar.gz     gpu-check/ (logs, JSON, markdown) and nano/ (training logs, eval.json, summary.md)
#
#   scripts/gpu_session.sh continue [MINUTES]          (default) sam_nano trained on from its shipped weights
#                                                      (6 min; warm restart at lr 5e-4; with v8's token-class
#                                                      term, --class-weight 0.05), then evaluated;
#                                                      NANO_FROM=FILE starts from other weights (a file carried
#                                                      in the tree, e.g. an earlier call's output copied to .whl/);
#                                                      NANO_OPTS="--zoom-prob 0.1 ..." appends options of
#                                                      `samantic train sam` (the last value of an option wins)
#   scripts/gpu_session.sh panoptic [MINUTES]          sam_nano_panoptic fine-tuned from sam_nano's shipped weights
#                                                      (or NANO_FROM=FILE) on v1 + v2 scenes alternating
#                                                      (shapes-mix, batch norm frozen, as assets/sam_nano_panoptic.md;
#                                                      the batch of `continue`: 32 images x 6 masks x 2 rounds,
#                                                      lr 3e-4 after 50 warm-up steps), 6 min by default; written as
#                                                      $OUT/sam_nano_panoptic.safetensors, evaluated on v1 scenes
#                                                      (v2 and SAM-CP's ceiling: on the CPU afterwards, see the card)
#   scripts/gpu_session.sh ab [AB_MINUTES] [FINAL]     the v5 encoder A/B (sam_nano_vit, sam_nano_conv,
#                                                      sam_nano_conv512, sam_nano from scratch, 3 min each in
#                                                      parallel), then the winner trained on (3 min)
#   scripts/gpu_session.sh pretrain [AB_MINUTES] [PRE]  the encoder-pretraining A/B (issue 15, item 2): sam_nano from
#                                                      scratch against sam_nano-pretrain (its first PRE minutes in
#                                                      `samantic train encoder`, image-level class labels, then SAM's
#                                                      recipe from that encoder), 6 and 2 min by default, same init;
#                                                      probe them on the CPU afterwards (`samantic eval probe`)
# About 9 minutes in all; run with timeout_s 590 and `carry: [".whl"]` (scripts/gpu_check_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-continue}
case "$MODE" in
    continue|panoptic) MINUTES=${2:-6.0} ;;
    ab) AB=${2:-3.0}; FINAL=${3:-3.0} ;;
    pretrain) AB=${2:-6.0}; PRE=${3:-2.0} ;;
    *) echo "usage: gpu_session.sh continue [MINUTES] | panoptic [MINUTES] | ab [AB_MINUTES] [FINAL_MINUTES] | pretrain [AB_MINUTES] [PRE_MINUTES]" >&2; exit 2 ;;
esac
DEST=${OUT:-runs/gpu-session}
mkdir -p "$DEST"
WORK=/tmp/gpu-session
rm -rf "$WORK" && mkdir -p "$WORK/nano" "$WORK/gpu-check"
export PYTHONUNBUFFERED=1
nvidia-smi -L || true

RECIPE=(--data shapes:1000000 --steps 1000000 --images-per-step 32 --masks-per-image 6 --iterations 2
        --focal-weight 2 --focal-alpha 0.5 --focal-gamma 0 --checkpoint-every 100 --log-every 20)
if [ "$MODE" = ab ]; then
    python3 scripts/gpu_train_nano.py --out "$WORK/nano" --ab-minutes "$AB" --final-minutes "$FINAL" \
        --models sam_nano_vit,sam_nano_conv,sam_nano_conv512,sam_nano -- \
        "${RECIPE[@]}" --lr 1e-3 --warmup-steps 150 --flat-steps 200 > "$WORK/nano/train.log" 2>&1 &
elif [ "$MODE" = pretrain ]; then
    python3 scripts/gpu_train_nano.py --out "$WORK/nano" --ab-minutes "$AB" --final-minutes 0 --pretrain-minutes "$PRE" \
        --models sam_nano,sam_nano-pretrain -- \
        "${RECIPE[@]}" --lr 1e-3 --warmup-steps 150 --flat-steps 200 > "$WORK/nano/train.log" 2>&1 &
elif [ "$MODE" = panoptic ]; then
    SEED=$(( 7000000 + $(date +%s) % 1000000 * 100 ))
    python3 scripts/gpu_train_nano.py --out "$WORK/nano" --ab-minutes "$MINUTES" --final-minutes 0 \
        --models sam_nano_panoptic -- "${RECIPE[@]/shapes:1000000/shapes-mix:$SEED}" --freeze-batchnorm --flat-steps 0 \
        --checkpoint "${NANO_FROM:-pkg:assets/sam_nano.safetensors}" --lr 3e-4 --warmup-steps 50 ${NANO_OPTS:-} > "$WORK/nano/train.log" 2>&1 &
else
    # a fresh data seed each session (scenes never repeat across sessions); eval seeds stay below 1,000,000
    SEED=$(( 3000000 + $(date +%s) % 1000000 * 100 ))
    python3 scripts/gpu_train_nano.py --out "$WORK/nano" --ab-minutes "$MINUTES" --final-minutes 0 \
        --models sam_nano -- "${RECIPE[@]/shapes:1000000/shapes:$SEED}" --checkpoint "${NANO_FROM:-pkg:assets/sam_nano.safetensors}" \
        --lr 5e-4 --warmup-steps 50 --class-weight 0.05 ${NANO_OPTS:-} > "$WORK/nano/train.log" 2>&1 &
fi
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
