"""Diagnostic (stop 71, not a tool): refit a SUM fine-tune's IoU head on task-prompted centre clicks of its 120 labelled scenes; does the pick improve on held-out v2 scenes 0-29?

    python benchmarks/results/sum_v9/iou_refit/pick.py sum=runs/sum_v9/ft/sum.safetensors runs/pick/feats_sum.npz
"""
import sys, copy, time
import numpy as np, torch
from samantic.cli.eval import load_column
from samantic.train.iou_head import collect_task_examples
torch.set_num_threads(1)
spec = sys.argv[1]
_, _, sam = load_column(spec)
def collect(seeds):
    # each task mask clicked at its centre, asked with its task; the three multimask outputs' true IoUs (the tool's
    # collector; stop 71's own copy of it gave the same features and IoUs to 3e-5)
    ex = collect_task_examples(sam.eval(), seeds, clicks=0, progress=False)
    return ex.feats, ex.trues[:, 1:], ex.tasks
t0 = time.time()
tr = collect(range(3_000_000, 3_000_120)); te = collect(range(0, 30))
print('collected', len(tr[0]), len(te[0]), f'{time.time()-t0:.0f}s', flush=True)
np.savez(sys.argv[2], trf=tr[0], trt=tr[1], trk=tr[2], tef=te[0], tet=te[1], tek=te[2])
head0 = sam.mask_decoder.iou_prediction_head
def score(head, F, T, K):
    with torch.no_grad(): p = head(torch.as_tensor(F))[:, 1:4].numpy()
    picked = T[np.arange(len(T)), p.argmax(1)]
    per = [picked[K == t].mean() for t in range(4)]
    return np.mean(per), per, np.corrcoef(p.ravel(), T.ravel())[0, 1]
print('before: train', score(head0, *tr)[0], 'held-out', score(head0, *te))
for loss in ('mse', 'rank'):
    for lr, ep in ((1e-4, 200), (3e-4, 300), (1e-3, 300)):
        head = copy.deepcopy(head0); opt = torch.optim.Adam(head.parameters(), lr=lr)
        F = torch.as_tensor(tr[0]); T = torch.as_tensor(tr[1]).float()
        for e in range(ep):
            p = head(F)[:, 1:4]
            l = torch.nn.functional.mse_loss(p, T) if loss == 'mse' else \
                torch.nn.functional.cross_entropy(p * 20, T.argmax(1)) + torch.nn.functional.mse_loss(p, T)
            opt.zero_grad(); l.backward(); opt.step()
        print(loss, lr, ep, 'train', round(score(head, *tr)[0], 4), 'held-out', score(head, *te), flush=True)
