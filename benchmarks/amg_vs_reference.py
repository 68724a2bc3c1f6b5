"""segment-anything's SamAutomaticMaskGenerator vs samantic's AutomaticMaskGenerator, side by side.

Same model object, same images, same settings. Each (model, setting, image, path)
runs in its own fresh process so peak RSS is comparable; per-stage times of the
reference come from timing wrappers around the functions it calls (its behaviour
is unchanged). Reported: per-stage seconds, end-to-end seconds per image, masks,
agreement (reference masks matched one-to-one at mask IoU >= 0.99), peak RSS,
and for samantic's adaptive prompting its recall against samantic's exact mode.

    python benchmarks/amg_vs_reference.py --out benchmarks/results

``--device cuda`` (or ``--in-process``) runs both generators in this one process
instead, model and prompts on that device (samantic's kernels too), with
``--warmup`` untimed calls per path, then ``--repeats`` timed calls alternating
between the paths, each ended by ``torch.cuda.synchronize()``; reported: median
and best seconds, speed ratio of the medians, masks, agreement at mask IoU 0.99,
0.9 and 0.5, and the peak torch GPU memory of each path. ``--cases`` picks
model:setting:image triples instead of the cross product:

    python benchmarks/amg_vs_reference.py --device cuda \
        --cases sam_nano:nano:demo-900001,sam_vit_b:thresholds-0:scene-11 --out runs/gpu-check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, measure, write_report  # noqa: E402

SETTINGS = {
    "default": {},
    "thresholds-0": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
    # where the under-confident sam_nano keeps its object masks (held-out recall@0.5 0.72 with v3; 0.01 at default)
    "nano": {"pred_iou_thresh": 0.5, "stability_score_thresh": 0.8},
}


def load_image(name: str) -> np.ndarray:
    import cv2
    from skimage import data

    from samantic.train.data.shapes import render_scene

    if name == "scene":
        name = "scene-11"
    if name.startswith("demo-"):  # a bundled demo scene, e.g. demo-900001 (800x600 PNG)
        from samantic.demo import DEMO_DIR

        bgr = cv2.imread(str(DEMO_DIR / f"scene_{name[len('demo-'):]}.png"), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"no demo scene {name!r} in {DEMO_DIR}")
        return np.ascontiguousarray(bgr[:, :, ::-1])
    if name.startswith("scene-"):  # a held-out shapes-world scene by seed, e.g. scene-900001
        return render_scene(int(name[len("scene-"):]), size=(600, 800)).image
    if name == "astronaut":
        return data.astronaut()
    if name == "coffee":
        return data.coffee()
    if name == "big":  # 4000 x 3000 photo (upscaled chelsea)
        return cv2.resize(data.chelsea(), (4000, 3000), interpolation=cv2.INTER_CUBIC)
    raise ValueError(f"unknown image {name!r}")


def build_model(name: str):
    import torch

    from samantic.models import create_model

    torch.manual_seed(0)
    return create_model(name)  # sam_nano: shipped weights; sam_vit_b: random init (same compute as the real one)


def _reference_stages():
    """Wraps the functions segment-anything's generator calls with timers; returns the stage dict."""
    import segment_anything.automatic_mask_generator as amg_mod
    from segment_anything.modeling import Sam

    stages = {"encoder": 0.0, "decoder": 0.0, "postprocess": 0.0, "nms": 0.0, "encoding": 0.0}

    def timed(fn, stage):
        return _timed_method(fn, stages, stage)

    for name, stage in [("calculate_stability_score", "postprocess"), ("batched_mask_to_box", "postprocess"),
                        ("is_box_near_crop_edge", "postprocess"), ("uncrop_masks", "postprocess"),
                        ("mask_to_rle_pytorch", "encoding"), ("batched_nms", "nms"), ("coco_encode_rle", "encoding"),
                        ("rle_to_mask", "encoding")]:
        setattr(amg_mod, name, timed(getattr(amg_mod, name), stage))
    amg_mod.SamPredictor.set_image = timed(amg_mod.SamPredictor.set_image, "encoder")
    orig_post = Sam.postprocess_masks
    Sam.postprocess_masks = timed(orig_post, "postprocess")
    return stages


def worker(args) -> None:
    import torch

    torch.set_grad_enabled(False)
    image = load_image(args.image)
    model = build_model(args.model)
    settings = dict(SETTINGS[args.setting], output_mode="coco_rle")
    if args.path == "reference":
        from segment_anything import SamAutomaticMaskGenerator

        stages = _reference_stages()
        dec = model.mask_decoder
        dec.forward = _timed_method(dec.forward, stages, "decoder")
        gen = SamAutomaticMaskGenerator(model, **settings)
        records, seconds, peak = measure(lambda: gen.generate(image), 1)
        stages = dict(stages)
        extra = {}
    else:
        from samantic.pipeline import AutomaticMaskGenerator

        gen = AutomaticMaskGenerator(model, adaptive=(args.path == "adaptive"), **settings,
                                     adaptive_margin=args.adaptive_margin, adaptive_iou_thresh=args.adaptive_iou_thresh,
                                     adaptive_stability_thresh=args.adaptive_stability_thresh)
        records, seconds, peak = measure(lambda: gen.generate(image), 1)
        stages = dict(gen.timings)
        extra = dict(gen.stats)
    out = {"seconds": seconds, "peak_mib": peak, "stages": stages, "stats": extra, "masks": len(records),
           "rles": [r["segmentation"] for r in records], "iou": [r["predicted_iou"] for r in records]}
    Path(args.worker_out).write_text(json.dumps(out))


def _timed_method(fn, stages, stage):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            stages[stage] += time.perf_counter() - t
    return wrapper


def spawn(path: str, model: str, setting: str, image: str, tmp: Path, extra: List[str] = ()) -> Dict[str, Any]:
    out = tmp / f"{path}-{model}-{setting}-{image}.json"
    cmd = [sys.executable, __file__, "--worker", path, "--models", model, "--settings", setting, "--images", image,
           "--worker-out", str(out), *extra]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def matched(ref_rles: List[dict], our_rles: List[dict], thr: float) -> int:
    """Reference masks matched one-to-one by a samantic mask at IoU >= thr."""
    from pycocotools import mask as mask_utils

    if not ref_rles or not our_rles:
        return 0
    iou = np.atleast_2d(mask_utils.iou(our_rles, ref_rles, [0] * len(ref_rles)))
    # pycocotools gives 0 for two empty masks; with thresholds at 0 both generators keep many empty masks
    # (stability 0 passes a threshold of 0), and an empty mask equals an empty mask
    def empty(rles):  # (pycocotools' area() of a long list overflows a uint8 under numpy 2)
        return np.array([mask_utils.area(r) == 0 for r in rles], bool)

    iou[np.ix_(empty(our_rles), empty(ref_rles))] = 1.0
    used, n = set(), 0
    for j in np.argsort(-iou.max(0)):
        i = int(np.argmax(np.where([k in used for k in range(len(our_rles))], -1, iou[:, j])))
        if iou[i, j] >= thr and i not in used:
            used.add(i)
            n += 1
    return n


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def in_process(cases, device: str, warmup: int, repeats: int, on_row=None) -> List[Dict[str, Any]]:
    """Both generators side by side in this process on ``device``; one row per case."""
    import statistics

    import torch
    from segment_anything import SamAutomaticMaskGenerator

    from samantic.pipeline import AutomaticMaskGenerator

    torch.set_grad_enabled(False)
    cuda = device.startswith("cuda")
    rows = []
    models: Dict[str, Any] = {}
    for model_name, setting, image_name in cases:
        row: Dict[str, Any] = {"model": model_name, "setting": setting, "image": image_name, "device": device}
        t_case = time.perf_counter()
        try:
            if model_name not in models:
                models.clear()  # one model on the device at a time
                if cuda:
                    torch.cuda.empty_cache()
                models[model_name] = build_model(model_name).to(device).eval()
            model = models[model_name]
            image = load_image(image_name)
            settings = dict(SETTINGS[setting], output_mode="coco_rle")
            gens = {"reference": SamAutomaticMaskGenerator(model, **settings),
                    "samantic": AutomaticMaskGenerator(model, **settings, device=device)}
            times: Dict[str, List[float]] = {k: [] for k in gens}
            records: Dict[str, Any] = {}
            peak: Dict[str, float] = {}
            for path, gen in gens.items():  # warm-up (CUDA context, kernels, allocator) and GPU peak memory
                if not warmup and repeats:
                    break
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                for _ in range(max(warmup, 1)):
                    records[path] = gen.generate(image)
                _sync(device)
                if cuda:
                    peak[path] = (torch.cuda.max_memory_allocated() - base) / 2**20
            for _ in range(repeats):
                for path, gen in gens.items():  # alternating, so load from elsewhere hits both alike
                    _sync(device)
                    t = time.perf_counter()
                    records[path] = gen.generate(image)
                    _sync(device)
                    times[path].append(time.perf_counter() - t)
            ref = [r["segmentation"] for r in records["reference"]]
            ours = [r["segmentation"] for r in records["samantic"]]
            n_ref = len(ref)
            med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
            row.update({
                "image_hw": list(image.shape[:2]), "warmup": warmup, "repeats": repeats,
                "reference_s": med["reference"], "samantic_s": med["samantic"],
                "reference_best_s": min(times["reference"], default=float("nan")),
                "samantic_best_s": min(times["samantic"], default=float("nan")),
                "speedup": med["reference"] / med["samantic"] if repeats else float("nan"),
                "reference_times_s": times["reference"], "samantic_times_s": times["samantic"],
                "reference_masks": n_ref, "samantic_masks": len(ours),
                "matched_099": matched(ref, ours, 0.99), "matched_090": matched(ref, ours, 0.9),
                "matched_050": matched(ref, ours, 0.5),
                "samantic_stages_s": dict(gens["samantic"].timings), "samantic_stats": dict(gens["samantic"].stats),
            })
            for t in ("099", "090", "050"):
                row[f"agreement_{t}"] = row[f"matched_{t}"] / n_ref if n_ref else (1.0 if not ours else 0.0)
            if peak:
                row.update({"reference_gpu_peak_mib": peak["reference"], "samantic_gpu_peak_mib": peak["samantic"]})
        except Exception as e:  # record and go on with the next case
            import traceback

            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()
        row["case_s"] = time.perf_counter() - t_case  # all of it: model, warm-up, timed calls, matching
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (dict, list)) and k != "traceback"}),
              flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def _in_process_report(args, argv, rows) -> Path:
    import torch

    from samantic import __version__

    gpu = None
    if args.device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(args.device))
    result = {"benchmark": "amg_vs_reference", "mode": "in-process", "device": args.device, "gpu": gpu,
              "torch": torch.__version__, "rows": rows, "samantic": __version__, "machine": machine(),
              "command": "python benchmarks/amg_vs_reference.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    header = ["model", "setting", "image", "reference s (median)", "samantic s (median)", "speed-up", "masks ref/ours",
              "agreement@0.99 / 0.9 / 0.5", "ref GPU MiB", "samantic GPU MiB"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["model"], r["setting"], r["image"], "error: " + r["error"].replace("|", "/")[:200]]
                         + ["-"] * (len(header) - 4))
            continue
        table.append([r["model"], r["setting"], r["image"], f"{r['reference_s']:.3f}", f"{r['samantic_s']:.3f}",
                      f"**{r['speedup']:.2f}x**", f"{r['reference_masks']}/{r['samantic_masks']}",
                      f"{r['agreement_099']:.3f} / {r['agreement_090']:.3f} / {r['agreement_050']:.3f}",
                      f"{r['reference_gpu_peak_mib']:.0f}" if "reference_gpu_peak_mib" in r else "-",
                      f"{r['samantic_gpu_peak_mib']:.0f}" if "samantic_gpu_peak_mib" in r else "-"])
    pre = (f"Segment everything, segment-anything vs samantic, both in one process on {args.device}"
           f"{f' ({gpu})' if gpu else ''}, torch {torch.__version__}: {args.warmup} warm-up call(s) per path, then "
           f"{args.repeats} timed calls alternating between the paths (median"
           f"{'; torch.cuda.synchronize() before every clock read' if args.device.startswith('cuda') else ''}); agreement = reference masks matched one-to-one by a samantic mask at that mask IoU; GPU MiB "
           "= peak torch-allocated memory during the warm-up minus before it (samantic's own kernels allocate "
           "outside torch's allocator). sam_vit_b is random-initialised (seeded), sam_nano has its shipped "
           f"weights.\n\nCommand: `{result['command']}`")
    name = "amg_vs_reference" if args.device == "cpu" else "amg_vs_reference_cuda"
    jp, mp = write_report(args.out, name, result, table, header, pre)
    return mp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--models", default="sam_nano,sam_vit_b")
    ap.add_argument("--settings", default="default,thresholds-0")
    ap.add_argument("--images", default="scene,astronaut,coffee",
                    help="scene, astronaut, coffee, or scene-SEED (a shapes-world scene, 800x600)")
    ap.add_argument("--vit-b-images", default="astronaut", help="images for sam_vit_b (slow on a CPU)")
    ap.add_argument("--big", action="store_true", help="also the 4000x3000 memory case (sam_nano, default settings)")
    ap.add_argument("--adaptive-margin", type=float, default=None,
                    help="how far below pred_iou_thresh a coarse point's best predicted IoU may lie and still get "
                         "its neighbours prompted in adaptive mode (default 0.15)")
    ap.add_argument("--adaptive-iou-thresh", type=float, default=None,
                    help="predicted IoU a kept mask needs to cover later points in adaptive mode (default 0.9)")
    ap.add_argument("--adaptive-stability-thresh", type=float, default=None,
                    help="stability a kept mask needs to cover later points in adaptive mode (default 0.95)")
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda[:N]: where the model, the prompts and samantic's kernels run; "
                         "anything but cpu implies --in-process")
    ap.add_argument("--in-process", action="store_true",
                    help="both generators in this one process (no adaptive path, no RSS), warm-up then timed calls")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per path before timing (--in-process)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per path (--in-process)")
    ap.add_argument("--cases", default=None,
                    help="comma-separated model:setting:image triples instead of the models x settings x images product")
    ap.add_argument("--worker", choices=["reference", "exact", "adaptive"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.path, args.model, args.setting, args.image = args.worker, args.models, args.settings, args.images
        worker(args)
        return 0

    from samantic import __version__

    cases = []
    if args.cases:
        for spec in args.cases.split(","):
            parts = spec.split(":")
            if len(parts) != 3 or parts[1] not in SETTINGS:
                ap.error(f"--cases wants model:setting:image with a setting in {sorted(SETTINGS)}, got {spec!r}")
            cases.append(tuple(parts))
    else:
        for model in args.models.split(","):
            images = args.vit_b_images.split(",") if model == "sam_vit_b" else args.images.split(",")
            for setting in args.settings.split(","):
                for image in images:
                    cases.append((model, setting, image))
    if args.big:
        cases.append(("sam_nano", "default", "big"))
    if args.in_process or args.device != "cpu":
        rows = in_process(cases, args.device, args.warmup, args.repeats,
                          on_row=lambda rows: _in_process_report(args, argv, rows))  # partial results survive a kill
        mp = _in_process_report(args, argv, rows)
        print(mp.read_text())
        return 1 if any("error" in r for r in rows) else 0
    knobs = [f"--adaptive-{k}={v}" for k, v in (("margin", args.adaptive_margin), ("iou-thresh", args.adaptive_iou_thresh),
                                                 ("stability-thresh", args.adaptive_stability_thresh)) if v is not None]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, setting, image in cases:
            ref = spawn("reference", model, setting, image, Path(tmp))
            exact = spawn("exact", model, setting, image, Path(tmp))
            adaptive = spawn("adaptive", model, setting, image, Path(tmp), knobs) if image != "big" else None
            n_ref = len(ref["rles"])
            row = {
                "model": model, "setting": setting, "image": image,
                "reference_s": ref["seconds"], "samantic_s": exact["seconds"],
                "speedup": ref["seconds"] / exact["seconds"],
                "reference_stages_s": ref["stages"], "samantic_stages_s": exact["stages"],
                "reference_masks": n_ref, "samantic_masks": len(exact["rles"]),
                "agreement_099": (matched(ref["rles"], exact["rles"], 0.99) / n_ref) if n_ref else 1.0,
                "reference_peak_mib": ref["peak_mib"], "samantic_peak_mib": exact["peak_mib"],
                "samantic_stats": exact["stats"],
            }
            if adaptive is not None:
                n_exact = len(exact["rles"])
                row.update({
                    "adaptive_s": adaptive["seconds"], "adaptive_speedup": ref["seconds"] / adaptive["seconds"],
                    "adaptive_masks": len(adaptive["rles"]),
                    "adaptive_recall_090": (matched(exact["rles"], adaptive["rles"], 0.9) / n_exact) if n_exact else 1.0,
                    "adaptive_recall_050": (matched(exact["rles"], adaptive["rles"], 0.5) / n_exact) if n_exact else 1.0,
                    "adaptive_stats": adaptive["stats"],
                })
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
    result = {"benchmark": "amg_vs_reference", "rows": rows, "samantic": __version__, "machine": machine(),
              "command": "python benchmarks/amg_vs_reference.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    header = ["model", "setting", "image", "reference s", "samantic s", "speed-up", "masks ref/ours", "agreement@0.99",
              "adaptive s", "adaptive speed-up", "points skipped", "adaptive recall@0.9 / @0.5", "ref peak MiB", "samantic peak MiB"]
    table = []
    for r in rows:
        table.append([r["model"], r["setting"], r["image"], f"{r['reference_s']:.2f}", f"{r['samantic_s']:.2f}",
                      f"**{r['speedup']:.2f}x**", f"{r['reference_masks']}/{r['samantic_masks']}",
                      f"{r['agreement_099']:.3f}",
                      f"{r['adaptive_s']:.2f}" if "adaptive_s" in r else "-",
                      f"{r['adaptive_speedup']:.2f}x" if "adaptive_s" in r else "-",
                      (f"{r['adaptive_stats']['points_skipped'] / max(1, r['adaptive_stats']['points']):.0%}"
                       if "adaptive_s" in r else "-"),
                      (f"{r['adaptive_recall_090']:.3f} / {r['adaptive_recall_050']:.3f}" if "adaptive_s" in r
                       else "-"),
                      f"{r['reference_peak_mib']:.0f}", f"{r['samantic_peak_mib']:.0f}"])
    pre = (f"Segment everything, segment-anything vs samantic (CPU, {result['machine']['cpus']} cores; one fresh "
           "process per run; peak MiB = RSS high-water mark during generate() minus RSS before it; sam_vit_b is "
           "random-initialised, which costs the same compute as the official weights).\n\n"
           f"Command: `{result['command']}`")
    jp, mp = write_report(args.out, "amg_vs_reference", result, table, header, pre)
    print(mp.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
