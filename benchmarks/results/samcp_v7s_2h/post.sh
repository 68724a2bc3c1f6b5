#!/bin/bash
# After the v7s training (started by scratch.sh, whose shell was stopped): tune on 100-199, export fp16 as it would
# ship, evaluate that file once on the held-out scenes.
cd /work/main && source .venv/bin/activate
O=runs/samcp/v7s
while pgrep -f "samantic train samcp" > /dev/null; do sleep 20; done
[ -f $O/samcp.safetensors ] || { echo "training left no $O/samcp.safetensors"; exit 1; }
samantic samcp tune $O/samcp.safetensors --seeds 100:200 --model sam_nano_panoptic --cache runs/cache/samcp --metric mean \
    --try-flip --score-thresh 0.25,0.35,0.45,0.55 --affinity-thresh 0.3,0.5,0.6,0.7 --overlap-thresh 0.5 \
    --out $O/tuned.safetensors --report $O/tune --no-progress || exit 1
python -c "from pathlib import Path; from samantic.train.sam import export_weights; export_weights(Path('$O/tuned.safetensors'), \
    Path('$O/samcp_nano_panoptic.fp16.safetensors'), extra={'version': 'v7'})" || exit 1
samantic eval samcp --samcp $O/samcp_nano_panoptic.fp16.safetensors --model sam_nano_panoptic --cache runs/cache/samcp \
    --seeds 0:40 --v1-seeds 0:30 --out $O/eval_fp16 --no-progress || exit 1
echo done
