#!/bin/bash
# stop 62: finish the vanilla fine-tune at 576 (resumes from its checkpoint), then its 1-click task column on test 0-29 and val 200-229
set -x
cd /work/main; source .venv/bin/activate
RECIPE="--trainable image_encoder,prompt_encoder,mask_decoder --encoder-lr-scale 0.3 --freeze-batchnorm --anchor-weight 1 --stability-weight 0.3"
samantic train sum --model sam_nano --input-size 576 --variant vanilla --out runs/sum_v7/ft/vanilla576.safetensors \
  --pseudo-cache runs/cache/sum --steps 1000 --threads 2 --no-progress --replay 120 --resume $RECIPE >> runs/sum_v7/vanilla576.log 2>&1
python benchmarks/sum_task_ceiling.py --column vanilla576=runs/sum_v7/ft/vanilla576.safetensors --seeds 0:30 --threads 2 --out benchmarks/results/sum_v7/vanilla576_test > runs/sum_v7/vanilla576_test.txt 2>&1
python benchmarks/sum_task_ceiling.py --column vanilla576=runs/sum_v7/ft/vanilla576.safetensors --seeds 200:230 --threads 2 --out benchmarks/results/sum_v7/vanilla576_val > runs/sum_v7/vanilla576_val.txt 2>&1
echo done
