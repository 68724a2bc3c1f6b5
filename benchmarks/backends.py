"""Segmenter backends on the CPU, side by side: torch eager vs onnxruntime fp32 vs onnxruntime INT8.

For each model (random weights unless a checkpoint is given: timing does not
depend on them) the script exports one bundle, then runs every backend in a
fresh worker process (so each peak RSS is its own) on the same held-out shapes
scenes: warm-up images first, then per image the end-to-end latency and the
Segmenter's stages (preprocess, encoder, decoder + head, post-processing incl.
NMS and records). Reported: p50/p90/p99 per stage and end to end, images/s,
peak RSS, and accuracy on the scenes' ground truth (mIoU = mean best mask IoU
per object, recall at IoU 0.5) plus mask agreement with the torch path.

    python benchmarks/backends.py --out benchmarks/results
    python benchmarks/backends.py --models sam_nano --nano-checkpoint runs/nano/last.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import _status_kb, machine, write_report  # noqa: E402

BACKENDS = (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
STAGES = ("preprocess", "encoder", "decoder", "postprocess")
HELD_OUT_SEED = 900_000  # below the trainers' seeds (>= 1,000,000)


def scenes(n: int, size=(360, 480)):
    from samantic.train.data.shapes import render_scene

    return [render_scene(HELD_OUT_SEED + i, size=size) for i in range(n)]


def _worker(args: argparse.Namespace) -> None:
    """One backend in this (fresh) process: load, warm up, measure, write JSON."""
    if args.worker == "torch":  # the onnxruntime workers never load torch (their RSS stays their own)
        import torch

        torch.set_num_threads(args.threads)
    from samantic.ops import rle_decode
    from samantic.runtime import Segmenter
    from samantic.train.metrics import mask_iou

    kw = dict(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
              pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh)
    t = time.perf_counter()
    seg = Segmenter.from_bundle(args.bundle, backend=args.worker, device="cpu", precision=args.precision,
                                threads=args.threads, **kw)
    load_s = time.perf_counter() - t
    data = scenes(args.warmup + args.images)
    for s in data[: args.warmup]:
        seg(s.image)
    rows, rles, acc = [], [], []
    for s in data[args.warmup :]:
        t = time.perf_counter()
        res = seg(s.image)
        total = time.perf_counter() - t
        tm = seg.timings
        rows.append({"total": total, "preprocess": tm["preprocess"], "encoder": tm["encoder"], "decoder": tm["decoder"],
                     "postprocess": tm["postprocess"] + tm["nms"] + tm["output"], "masks": len(res)})
        rles.append(res.masks.rles.to_dicts(compressed=True))
        pred = rle_decode(res.masks.rles).astype(bool) if len(res) else np.zeros((0, *s.image.shape[:2]), bool)
        best = [max((mask_iou(g, p) for p in pred), default=0.0) for g in s.masks]
        acc.append(best)
    best = np.concatenate([np.asarray(b, float) for b in acc]) if acc else np.zeros(0)
    out = {"rows": rows, "load_s": load_s, "peak_rss_mib": _status_kb("VmHWM") / 1024.0,
           "miou": float(best.mean()) if len(best) else 0.0, "recall50": float((best >= 0.5).mean()) if len(best) else 0.0,
           "rles": [[{**r, "counts": r["counts"].decode() if isinstance(r["counts"], bytes) else r["counts"]} for r in per]
                    for per in rles]}
    Path(args.worker_out).write_text(json.dumps(out))


def _spawn(bundle: Path, backend: str, precision: str, args: argparse.Namespace, tmp: Path) -> Dict[str, Any]:
    import subprocess

    out = tmp / f"{backend}-{precision}.json"
    cmd = [sys.executable, __file__, "--worker", backend, "--precision", precision, "--bundle", str(bundle),
           "--images", str(args.images), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--points-per-side", str(args.points_per_side), "--points-per-batch", str(args.points_per_batch),
           "--pred-iou-thresh", str(args.pred_iou_thresh), "--stability-score-thresh", str(args.stability_score_thresh),
           "--worker-out", str(out)]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    return json.loads(out.read_text())


def _agreement(ref: List[List[dict]], ours: List[List[dict]]) -> float:
    """Fraction of reference masks with a partner at mask IoU >= 0.99 (per image, pooled)."""
    from pycocotools import mask as mask_utils

    hit = n = 0
    for r, o in zip(ref, ours):
        n += len(r)
        if not r or not o:
            continue
        enc = lambda d: {"size": d["size"], "counts": d["counts"].encode()}  # noqa: E731
        iou = np.atleast_2d(mask_utils.iou([enc(d) for d in o], [enc(d) for d in r], [0] * len(r)))
        hit += int((iou.max(0) >= 0.99).sum())
    return hit / n if n else 1.0


def _pct(values: List[float]) -> Dict[str, float]:
    v = np.asarray(values, float) * 1000.0
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99))}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from samantic.export.bundle import export_bundle
    from samantic.models import create_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            images = args.images_vit_b if name != "sam_nano" else args.images
            ckpt = args.nano_checkpoint if name == "sam_nano" else None
            torch.manual_seed(0)
            sam = create_model(name, checkpoint=ckpt) if ckpt else create_model(name, pretrained=False)
            t = time.perf_counter()
            bundle = export_bundle(sam, tmp / name, torch_weights=True)
            export_s = time.perf_counter() - t
            del sam
            per: Dict[str, Any] = {}
            worker_args = argparse.Namespace(**{**vars(args), "images": images})
            for backend, precision in BACKENDS:
                label = f"{backend}-{precision}" if backend != "torch" else "torch"
                print(f"[{name}] {label} ...", flush=True)
                per[label] = _spawn(bundle, backend, precision, worker_args, tmp)
            ref = per["torch"]["rles"]
            for label, r in per.items():
                rows = r["rows"]
                entry = {
                    "model": name, "backend": label, "weights": ckpt or "random", "images": len(rows),
                    "total_ms": _pct([x["total"] for x in rows]),
                    "stages_ms": {s: _pct([x[s] for x in rows]) for s in STAGES},
                    "images_per_s": len(rows) / sum(x["total"] for x in rows),
                    "peak_rss_mib": r["peak_rss_mib"], "load_s": r["load_s"], "masks_per_image": float(np.mean([x["masks"] for x in rows])),
                    "miou": r["miou"], "recall50": r["recall50"], "agreement_with_torch": _agreement(ref, r["rles"]),
                    "export_s": export_s,
                }
                results.append(entry)
    hidden = ("worker", "worker_out", "bundle", "precision", "out", "name")
    return {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k not in hidden},
            "results": results}


def table(payload: Dict[str, Any]):
    header = ["model", "backend", "end-to-end p50/p90/p99 ms", "preprocess p50", "encoder p50", "decoder+head p50",
              "postprocess p50", "images/s", "peak RSS MiB", "mIoU", "recall@0.5", "masks = torch"]
    rows = []
    for r in payload["results"]:
        t, s = r["total_ms"], r["stages_ms"]
        rows.append([r["model"], r["backend"], f"{t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f}",
                     f"{s['preprocess']['p50']:.1f}", f"{s['encoder']['p50']:.0f}", f"{s['decoder']['p50']:.0f}",
                     f"{s['postprocess']['p50']:.1f}", f"{r['images_per_s']:.2f}", f"{r['peak_rss_mib']:.0f}",
                     f"{r['miou']:.3f}", f"{r['recall50']:.3f}", f"{100 * r['agreement_with_torch']:.1f}%"])
    return header, rows


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sam_nano", "sam_vit_b"])
    p.add_argument("--images", type=int, default=8, help="measured images per backend (sam_nano)")
    p.add_argument("--images-vit-b", type=int, default=2, help="measured images per backend (larger models)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--points-per-side", type=int, default=16)
    p.add_argument("--points-per-batch", type=int, default=64)
    p.add_argument("--pred-iou-thresh", type=float, default=0.88)
    p.add_argument("--stability-score-thresh", type=float, default=0.95)
    p.add_argument("--nano-checkpoint", default=None, help="trained sam_nano weights (accuracy numbers need them)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default="backends", help="report file name (<name>.json, <name>.md)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--bundle", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    payload = run(args)
    header, rows = table(payload)
    s = payload["settings"]
    pre = (f"# Segmenter backends on the CPU\n\n{payload['machine']['processor']}, {s['threads']} threads, "
           f"{s['points_per_side']}x{s['points_per_side']} points, batch {s['points_per_batch']}, held-out shapes "
           f"scenes 360x480; warm-up {s['warmup']} image(s). Stages are p50 ms; 'masks = torch' is the share of the "
           "torch path's masks matched at mask IoU >= 0.99.\n\n`python benchmarks/backends.py "
           + " ".join(a for a in (argv if argv is not None else sys.argv[1:])) + "`")
    jp, mp = write_report(args.out, args.name, payload, rows, header, preamble=pre)
    print(mp.read_text())
    print(f"saved {jp} and {mp}")


if __name__ == "__main__":
    main()
