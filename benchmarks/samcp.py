"""SAM-CP per stage on torch and on onnxruntime (fp32), on this CPU, from one bundle, in one run.

The bundle (exported here from ``--samcp``, or given with ``--bundle``) is run twice, each
backend in its own process (so each one's peak RSS is its own), on the same held-out v2
scenes. Stages per image:

  patches        segment-everything (grid and thresholds the head was trained on)
  backbone       resize + CNN/FPN
  patch_encoder  mask-RoI of the patches + patch encoder
  decoder        affinity decoder
  merge          samantic._C.merge_patches (+ same-class NMS)
  fusion         samantic._C.panoptic_fusion + panoptic/semantic maps and segments_info
  writing        NAME.json, NAME.semantic.png, NAME.panoptic.png/.json, NAME.overlay.png (as `samantic segment`)

Reported: p50/p90 seconds per stage, images/s end to end (median), peak RSS. A second measurement
times merge + fusion on one 640x480 scene with 200 patches (a 32x32 grid, loose thresholds).

    python benchmarks/samcp.py --samcp runs/samcp/main/samcp.safetensors --seeds 0:12 --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402

STAGES = ("patches", "backbone", "patch_encoder", "decoder", "merge", "fusion", "writing")


def child(args: argparse.Namespace) -> None:
    import resource

    from samantic.cli.segment import Job, write_samcp_outputs
    from samantic.runtime import Segmenter
    from samantic.runtime.segmenter import PanopticResult
    from samantic.train.data.panoptic import render_panoptic

    if args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    seg = Segmenter.from_bundle(args.bundle, backend=args.backend, threads=args.threads)
    a, b = (int(v) for v in args.seeds.split(":"))
    rows = {k: [] for k in STAGES + ("total",)}
    segments = []
    out = Path(tempfile.mkdtemp(prefix="samcp-bench-"))
    scenes = [render_panoptic(s).image for s in range(a, b)]
    for i, image in enumerate([scenes[0]] + scenes):  # the first is a warm-up
        t0 = time.perf_counter()
        masks = seg.generator.generate_masks(image)
        t1 = time.perf_counter()
        output = seg.samcp(image, masks.rles, masks.boxes)
        t2 = time.perf_counter()
        result = PanopticResult(masks, output, image)
        write_samcp_outputs(out, Job(Path(f"scene{i}.png"), f"scene{i}.png"), image, result, seg.engine.name, None,
                            args.bundle, seg.config)
        t3 = time.perf_counter()
        if i == 0:
            continue
        tm = output.timings
        for k in ("backbone", "patch_encoder", "decoder", "merge", "fusion"):
            rows[k].append(tm[k])
        rows["patches"].append(t1 - t0)
        rows["writing"].append(t3 - t2)
        rows["total"].append(t3 - t0)
        segments.append(len(result))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # over the scenes (before the dense run)
    # merge + fusion with ~200 patches on one 640x480 scene
    from samantic.pipeline.config import AmgConfig

    image = render_panoptic(b + 1000, size=(480, 640)).image
    dense = Segmenter.from_bundle(args.bundle, backend=args.backend, threads=args.threads,
                                  config=AmgConfig(output_mode="coco_rle", points_per_side=32, pred_iou_thresh=0.0,
                                                   stability_score_thresh=0.0, box_nms_thresh=0.95))
    masks = dense.generator.generate_masks(image)
    keep = np.arange(min(200, len(masks)))
    rles, boxes = masks.rles.select(keep), masks.boxes[keep]
    mf = []
    for _ in range(6):
        o = dense.samcp(image, rles, boxes)
        mf.append((o.timings["merge"], o.timings["fusion"], len(o.segments_info)))
    mf = mf[1:]
    json.dump({"backend": args.backend, "engine": seg.engine.name, "per_image": rows, "segments": segments,
               "peak_rss_mib": peak, "dense": {"patches": int(len(keep)), "merge": [m[0] for m in mf],
                                               "fusion": [m[1] for m in mf], "segments": mf[0][2]},
               "providers": getattr(seg.samcp.scorer, "providers", None)}, open(args.result, "w"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samcp", type=Path, help="SAM-CP head file (a bundle is exported from it)")
    ap.add_argument("--bundle", type=Path, help="a bundle with a SAM-CP head (instead of --samcp)")
    ap.add_argument("--model", default="sam_nano")
    ap.add_argument("--seeds", default="0:12", help="held-out v2 scene seeds START:STOP")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend:
        return child(args)
    if (args.samcp is None) == (args.bundle is None):
        ap.error("give --samcp HEAD or --bundle DIR")
    tmp = Path(tempfile.mkdtemp(prefix="samcp-bench-"))
    bundle = args.bundle
    if bundle is None:
        from samantic.export.bundle import export_bundle

        bundle = export_bundle(args.model, tmp / "bundle", samcp=args.samcp, int8=False, torch_weights=True)
    results = {}
    for backend in ("torch", "onnxruntime"):
        path = tmp / f"{backend}.json"
        cmd = [sys.executable, __file__, "--backend", backend, "--bundle", str(bundle), "--seeds", args.seeds,
               "--threads", str(args.threads), "--result", str(path)]
        subprocess.run(cmd, check=True)
        results[backend] = json.loads(path.read_text())

    def q(v, p):
        return float(np.percentile(v, p)) if len(v) else float("nan")

    header = ["stage", "torch p50 ms", "torch p90 ms", "onnxruntime p50 ms", "onnxruntime p90 ms", "ort / torch (p50)"]
    table = []
    for k in STAGES + ("total",):
        t, o = results["torch"]["per_image"][k], results["onnxruntime"]["per_image"][k]
        table.append([k if k != "total" else "**end to end**", f"{1e3 * q(t, 50):.1f}", f"{1e3 * q(t, 90):.1f}",
                      f"{1e3 * q(o, 50):.1f}", f"{1e3 * q(o, 90):.1f}", f"{q(o, 50) / q(t, 50):.2f}"])
    head = {b: sum(q(results[b]["per_image"][k], 50) for k in ("backbone", "patch_encoder", "decoder", "merge", "fusion"))
            for b in results}
    table.append(["SAM-CP stages (backbone .. fusion)", f"{1e3 * head['torch']:.1f}", "", f"{1e3 * head['onnxruntime']:.1f}",
                  "", f"{head['onnxruntime'] / head['torch']:.2f}"])
    ips = {b: 1.0 / q(results[b]["per_image"]["total"], 50) for b in results}
    rss = {b: results[b]["peak_rss_mib"] for b in results}
    dense = {b: results[b]["dense"] for b in results}
    mf = {b: 1e3 * (np.median(dense[b]["merge"]) + np.median(dense[b]["fusion"])) for b in results}
    command = (f"python benchmarks/samcp.py {'--samcp ' + str(args.samcp) if args.samcp else '--bundle ' + str(args.bundle)}"
               f" --seeds {args.seeds} --threads {args.threads}")
    a, b = (int(v) for v in args.seeds.split(":"))
    bm = json.loads((Path(bundle) / "manifest.json").read_text())
    pre = (f"`{command}`\n\n{b - a} held-out v2 scenes (after one warm-up), {bm['thresholds']['points_per_side']}x"
           f"{bm['thresholds']['points_per_side']} grid at {bm['thresholds']['pred_iou_thresh']}/"
           f"{bm['thresholds']['stability_score_thresh']} (the head's), {args.threads} thread(s) per backend, fp32, "
           f"this CPU; each backend in its own process.\n\n"
           f"Images/s end to end (median): torch {ips['torch']:.3f}, onnxruntime {ips['onnxruntime']:.3f}. "
           f"Peak RSS: torch {rss['torch']:.0f} MiB, onnxruntime {rss['onnxruntime']:.0f} MiB. "
           f"Merge + fusion on a 640x480 scene with {dense['onnxruntime']['patches']} patches "
           f"({dense['onnxruntime']['segments']} segments): {mf['onnxruntime']:.1f} ms (onnxruntime run), "
           f"{mf['torch']:.1f} ms (torch run); target <= 10 ms.\n")
    payload = {"machine": machine(), "command": command, "bundle": str(bundle), "threads": args.threads,
               "images_per_s": ips, "peak_rss_mib": rss, "merge_fusion_ms_200": mf, "results": results}
    _, md = write_report(args.out, "samcp", payload, table, header, pre)
    print(md.read_text())


if __name__ == "__main__":
    main()
