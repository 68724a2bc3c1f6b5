"""Diagnostic (stop 71, not a tool): refit the IoU head from pick.py's saved features (full-batch Adam, MSE on the three multimask outputs' true IoUs; deterministic) and write a checkpoint.

    python benchmarks/results/sum_v9/iou_refit/write.py runs/sum_v9/ft/sum.safetensors runs/pick/feats_sum.npz runs/pick/sum_refit.safetensors 3e-4 300
"""
import sys, json, copy
import numpy as np, torch
from samantic.models.loading import read_metadata, read_state_dict, save_checkpoint
from samantic.cli.eval import load_column
src, feats, out = sys.argv[1], sys.argv[2], sys.argv[3]
lr, ep = float(sys.argv[4]), int(sys.argv[5])
_, _, sam = load_column('x=' + src)
head = copy.deepcopy(sam.mask_decoder.iou_prediction_head).float()
d = np.load(feats); F = torch.as_tensor(d['trf']).float(); T = torch.as_tensor(d['trt']).float()
opt = torch.optim.Adam(head.parameters(), lr=lr)
for e in range(ep):
    l = torch.nn.functional.mse_loss(head(F)[:, 1:4], T); opt.zero_grad(); l.backward(); opt.step()
st = read_state_dict(src)
for k, v in head.state_dict().items():
    key = 'mask_decoder.iou_prediction_head.' + k
    st[key] = v.detach().to(st[key].dtype)
meta = dict(read_metadata(src)); meta['iou_head_refit'] = json.dumps({'lr': lr, 'epochs': ep, 'examples': len(F), 'clicks': 'task mask centres, labelled v2 seeds 3000000:3000120'})
meta.pop('thresholds', None)
save_checkpoint(st, out, meta); print('saved', out, float(l))
