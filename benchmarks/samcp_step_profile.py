"""Where a SAM-CP training step's time goes (v6's head: --mask-size 14, --texture-channels 16; 4 images a step,
2 threads, colour permutations 0.2), on 60 training scenes of the patch cache (runs/cache/samcp, built as the model
card says; missing entries are computed): batch, collate, forward, losses (with the matching), backward and
optimizer, over 40 steps, then torch's profiler over 8 more, by operator.

    python benchmarks/samcp_step_profile.py [--fpn-smooth separable] [--input-size 320] [--steps 40] [--no-profile]
"""
import argparse, time, torch
from samantic.models import create_model
from samantic.heads.samcp import SamcpHead, SamcpInfo
from samantic.train.samcp import SamcpTrainConfig, SamcpTrainer, load_examples, collate_examples, samcp_losses
from samantic.train.samcp_cache import open_panoptic

ap = argparse.ArgumentParser()
ap.add_argument("--fpn-smooth", default="conv")
ap.add_argument("--input-size", type=int, default=384)
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--no-profile", action="store_true")
args = ap.parse_args()
torch.set_num_threads(2); torch.manual_seed(0)
sam = create_model("sam_nano_panoptic")
ds = open_panoptic("shapes-panoptic:1000000:60")
things = [c["name"] for c in ds.categories if c.get("isthing", 1)]; stuff = [c["name"] for c in ds.categories if not c.get("isthing", 1)]
info = SamcpInfo(classes=things, stuff=stuff, model="sam_nano_panoptic", mask_size=14, texture_channels=16,
                 fpn_smooth=args.fpn_smooth, input_size=args.input_size)
head = SamcpHead(info)
ex, _ = load_examples(sam, ds, "runs/cache/samcp", info.names, roi_size=info.mask_side, points_per_side=16,
                      pred_iou_thresh=0.3, stability_score_thresh=0.8, progress=False)
tr = SamcpTrainer(head, SamcpTrainConfig(steps=10**6, color_perm=0.2), ex)
print("fpn_smooth", info.fpn_smooth, "input_size", info.input_size, "images", ex[0].image.shape, "params", sum(p.numel() for p in head.parameters()))
T = {"batch": 0.0, "collate": 0.0, "forward": 0.0, "losses": 0.0, "backward": 0.0, "optim": 0.0}
N = args.steps
head.train()  # the phases of SamcpTrainer.train_step, timed one by one
for s in range(N + 5):
    t0 = time.perf_counter(); b = tr.batch_at(s)
    t1 = time.perf_counter(); im, bx, mk = collate_examples(b, tr.device)
    t2 = time.perf_counter(); out = head(im, bx, mk)
    t3 = time.perf_counter(); loss, _ = samcp_losses(out, b, tr.config)
    t4 = time.perf_counter(); tr.optimizer.zero_grad(set_to_none=True); loss.backward()
    t5 = time.perf_counter(); torch.nn.utils.clip_grad_norm_(head.parameters(), tr.config.grad_clip); tr.optimizer.step()
    t6 = time.perf_counter()
    if s >= 5:
        for k, a, z in (("batch", t0, t1), ("collate", t1, t2), ("forward", t2, t3), ("losses", t3, t4), ("backward", t4, t5), ("optim", t5, t6)):
            T[k] += z - a
tot = sum(T.values())
print(f"{tot / N:.3f} s / step over {N} steps")
for k, v in T.items():
    print(f"  {k:9s} {v / N:.3f} s  {100 * v / tot:.0f}%")
if args.no_profile:
    raise SystemExit(0)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
    for s in range(100, 108):
        b = tr.batch_at(s); loss, _ = tr.train_step(b)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
