#!/bin/bash
# issue 18: SUM and no-task on a 2000-step refiner (session 59)
set -x
cd /work/main; source .venv/bin/activate
RECIPE="--trainable image_encoder,prompt_encoder,mask_decoder --encoder-lr-scale 0.3 --freeze-batchnorm --anchor-weight 1 --stability-weight 0.3"
mkdir -p runs/sum_v7/ft runs/sum_v7/eval
while pgrep -f "sum_uncertainty.py" >/dev/null; do sleep 20; done
samantic train sum --model sam_nano --variant sum --out runs/sum_v7/ft/sum_r2k.safetensors --refiner runs/sum_v7/refiner.safetensors \
  --pseudo-cache runs/cache/sum --steps 1389 --threads 2 --no-progress --replay 120 $RECIPE > runs/sum_v7/sum_r2k.log 2>&1 &
SUMPID=$!
until grep -q "^.*pool:" runs/sum_v7/sum_r2k.log 2>/dev/null; do sleep 15; if ! kill -0 $SUMPID 2>/dev/null; then break; fi; done
samantic train sum --model sam_nano --variant no-task --out runs/sum_v7/ft/no-task_r2k.safetensors --refiner runs/sum_v7/refiner.safetensors \
  --pseudo-cache runs/cache/sum --steps 1389 --threads 1 --no-progress --replay 120 $RECIPE > runs/sum_v7/no-task_r2k.log 2>&1 &
NTPID=$!
wait $SUMPID
samantic eval sum --model sam_nano --column sum_r2k=runs/sum_v7/ft/sum_r2k.safetensors --seeds 0:30 --points 1,3 \
  --forgetting sum_r2k --forgetting-seeds 0:60 --amg-seeds 0:30 --threads 1 --no-progress --out runs/sum_v7/eval/sum_r2k > runs/sum_v7/eval_sum_r2k.log 2>&1
wait $NTPID
samantic eval sum --model sam_nano --column no-task_r2k=runs/sum_v7/ft/no-task_r2k.safetensors --seeds 0:30 --points 1,3 \
  --forgetting no-task_r2k --forgetting-seeds 0:60 --amg-seeds 0:30 --threads 2 --no-progress --out runs/sum_v7/eval/no-task_r2k > runs/sum_v7/eval_no-task_r2k.log 2>&1
echo done
