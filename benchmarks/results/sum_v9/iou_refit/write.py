"""Diagnostic (stop 71, not a tool): refit the IoU head from pick.py's saved features (full-batch Adam, MSE on the three multimask outputs' true IoUs; deterministic) and write a checkpoint.

    python benchmarks/results/sum_v9/iou_refit/write.py runs/sum_v9/ft/sum.safetensors runs/pick/feats_sum.npz runs/pick/sum_refit.safetensors 3e-4 300
"""
import sys, copy
import numpy as np, torch
from samantic.cli.eval import load_column
from samantic.train.iou_head import write_refitted
src, feats, out = sys.argv[1], sys.argv[2], sys.argv[3]
lr, ep = float(sys.argv[4]), int(sys.argv[5])
_, _, sam = load_column('x=' + src)
head = copy.deepcopy(sam.mask_decoder.iou_prediction_head).float()
d = np.load(feats); F = torch.as_tensor(d['trf']).float(); T = torch.as_tensor(d['trt']).float()
opt = torch.optim.Adam(head.parameters(), lr=lr)
for e in range(ep):
    l = torch.nn.functional.mse_loss(head(F)[:, 1:4], T); opt.zero_grad(); l.backward(); opt.step()
record = {'lr': lr, 'epochs': ep, 'examples': len(F), 'clicks': 'task mask centres, labelled v2 seeds 3000000:3000120'}
print('saved', write_refitted(src, head, out, record), float(l.detach()))
