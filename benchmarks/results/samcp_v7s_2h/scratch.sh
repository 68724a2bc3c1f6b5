#!/bin/bash
# Issue 16's "training <= 2 h": one training from scratch with everything v6 learnt in four stages
# (texture statistics, 2,800 scenes, colour permutations 0.2), resumable; then tuning on scenes 100-199.
cd /work/main && source .venv/bin/activate
P="--model sam_nano_panoptic --points-per-side 16 --pred-iou-thresh 0.3 --stability-score-thresh 0.8"
C=runs/cache/samcp/sam_nano_panoptic-5459a026affd   # the patch cache first: 2,800 entries + meta.json
while [ "$(ls $C | wc -l)" -lt 2971 ] || pgrep -f "samantic data patches" > /dev/null; do sleep 30; done   # + 170 evaluation scenes
O=runs/samcp/v7s
mkdir -p $O
samantic train samcp --data shapes-panoptic:1000000:2600,shapes:1000000:200 $P --cache runs/cache/samcp \
    --mask-size 14 --texture-channels 16 --color-perm 0.2 --steps 14000 --time-budget 115 --lr 6e-4 --threads 2 \
    --checkpoint-every 250 --no-progress --resume --out $O/samcp.safetensors || exit 1
samantic samcp tune $O/samcp.safetensors --seeds 100:200 --model sam_nano_panoptic --cache runs/cache/samcp --metric mean \
    --try-flip --score-thresh 0.25,0.35,0.45,0.55 --affinity-thresh 0.3,0.5,0.6,0.7 --overlap-thresh 0.5 \
    --out $O/tuned.safetensors --report $O/tune --no-progress || exit 1
# held out, once, after tuning chose the thresholds
samantic eval samcp --samcp $O/tuned.safetensors --model sam_nano_panoptic --cache runs/cache/samcp --seeds 0:40 --v1-seeds 0:30 \
    --out $O/eval --no-progress || exit 1
