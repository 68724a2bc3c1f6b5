"""segment-anything's mask post-processing vs samantic.ops.postprocess_masks, side by side.

For each image size, the same low-res logits (192 masks = one batch of
segment-anything's automatic mask generator: 64 points x 3 outputs) go through
  reference: Sam.postprocess_masks (two bilinear resizes) -> calculate_stability_score
             -> threshold -> batched_mask_to_box -> mask_to_rle_pytorch
  samantic:  samantic.ops.postprocess_masks (one fused pass)
timing each (best of --repeats) and its peak resident-memory increase, and
checking that both give the same RLEs. Two kinds of logits: "blobs" (signed
distance to random ellipses, sharp like SAM's decoder outputs) and "noise"
(a smooth random field with many regions: the kernel's worst case).

    python benchmarks/postprocess.py --out benchmarks/results
    python benchmarks/postprocess.py --device cuda --sizes 1024x768,1920x1080 --out runs/gpu-check

With ``--device cuda`` the reference runs on CUDA tensors (the logits start on
the GPU, as the decoder leaves them) and samantic runs its CUDA kernels (the
logits start on the host, as the op takes them: the upload is timed); every
timed call ends with ``torch.cuda.synchronize()``, and one untimed warm-up call
per path comes first (CUDA context, kernel loading).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, measure, write_report  # noqa: E402

IMG_SIZE = 1024
LOW_RES = 256


def preprocess_shape(h: int, w: int) -> tuple:
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide.get_preprocess_shape(h, w, IMG_SIZE)


def make_logits(kind: str, n: int, input_size: tuple, seed: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    lh = int(np.ceil(input_size[0] * LOW_RES / IMG_SIZE))
    lw = int(np.ceil(input_size[1] * LOW_RES / IMG_SIZE))
    out = np.full((n, LOW_RES, LOW_RES), -20.0, np.float32)
    for i in range(n):
        if kind == "blobs":
            m = np.zeros((LOW_RES, LOW_RES), np.uint8)
            for _ in range(rng.integers(1, 3)):
                c = (int(rng.integers(0, lw)), int(rng.integers(0, lh)))
                axes = (int(rng.integers(3, max(4, lw // 3))), int(rng.integers(3, max(4, lh // 3))))
                cv2.ellipse(m, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            inside = cv2.distanceTransform(m, cv2.DIST_L2, 3)
            outside = cv2.distanceTransform(1 - m, cv2.DIST_L2, 3)
            sdf = (inside - outside) * 4.0 + rng.normal(0.0, 0.05, inside.shape)
            out[i] = np.clip(sdf, -20, 20)
        elif kind == "noise":
            field = cv2.resize((rng.standard_normal((16, 16)) * 8).astype(np.float32), (LOW_RES, LOW_RES),
                               interpolation=cv2.INTER_CUBIC)
            out[i] = field
        else:
            raise ValueError(f"kind must be blobs or noise, got {kind!r}")
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def reference(logits_t, input_size, original_size, mask_threshold=0.0, offset=1.0, device="cpu") -> Dict[str, Any]:
    import time

    import torch
    from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score, mask_to_rle_pytorch

    times = {}
    sam = _reference_model()  # built before timing starts (see run())
    with torch.inference_mode():
        t = time.perf_counter()
        masks = sam.postprocess_masks(logits_t[:, None], input_size, original_size)[:, 0]
        _sync(device)
        times["upsample"] = time.perf_counter() - t
        t = time.perf_counter()
        stability = calculate_stability_score(masks, mask_threshold, offset)
        _sync(device)
        times["stability"] = time.perf_counter() - t
        t = time.perf_counter()
        binary = masks > mask_threshold
        del masks
        _sync(device)
        times["threshold"] = time.perf_counter() - t
        t = time.perf_counter()
        boxes = batched_mask_to_box(binary)
        _sync(device)
        times["box"] = time.perf_counter() - t
        t = time.perf_counter()
        rles = mask_to_rle_pytorch(binary)  # ends on the host (it copies the change indices to the CPU)
        _sync(device)
        times["rle"] = time.perf_counter() - t
    return {"stability": stability.cpu().numpy(), "boxes": boxes.cpu().numpy(), "rles": rles, "times": times}


_MODEL = None


def _reference_model():
    """A Sam whose postprocess_masks uses img_size 1024 (weights are irrelevant here)."""
    global _MODEL
    if _MODEL is None:
        import torch

        from samantic.models import create_model

        with torch.device("meta"):
            _MODEL = create_model("sam_vit_b", pretrained=False)
    return _MODEL


def ours(logits, input_size, original_size, device="cpu"):
    from samantic.ops import postprocess_masks

    return postprocess_masks(logits, input_size=input_size, original_size=original_size, img_size=IMG_SIZE,
                             device=device)


def _worker(path: str, h: int, w: int, kind: str, n_masks: int, repeats: int, seed: int, out: str,
            device: str = "cpu") -> None:
    """Runs one path in this (fresh) process and saves its timing, memory and results."""
    import torch

    input_size = preprocess_shape(h, w)
    logits = make_logits(kind, n_masks, input_size, seed)
    cuda = device.startswith("cuda")
    gpu_peak = None
    if path == "reference":
        logits_t = torch.from_numpy(logits).to(device)
        _reference_model()
        if cuda:  # warm-up: CUDA context and kernels
            reference(logits_t, input_size, (h, w), device=device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        res, seconds, peak = measure(lambda: reference(logits_t, input_size, (h, w), device=device), repeats)
        if cuda:
            gpu_peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        rles = [np.asarray(r["counts"], np.uint32) for r in res["rles"]]
        stages = res["times"]
        stability, boxes = res["stability"], res["boxes"]
    else:
        # on the CPU no warm-up: the first (cold) call's fresh allocations are what the peak should see;
        # the time is the best of at least 3 calls. On CUDA one warm-up call (context, module loading).
        if cuda:
            ours(logits, input_size, (h, w), device=device)
        res, seconds, peak = measure(lambda: ours(logits, input_size, (h, w), device=device), max(repeats, 3))
        rles = [res.rles.counts_of(i) for i in range(len(res))]
        stages = {}
        stability, boxes = res.stability_score, res.boxes
    np.savez(out, seconds=seconds, peak=peak, stability=stability, boxes=boxes,
             counts=np.concatenate(rles) if rles else np.zeros(0, np.uint32),
             lengths=np.array([len(r) for r in rles]), stages=json.dumps(stages),
             gpu_peak=np.nan if gpu_peak is None else gpu_peak)


def _spawn(path: str, h: int, w: int, kind: str, n_masks: int, repeats: int, seed: int, tmp: Path,
           device: str = "cpu") -> Dict[str, Any]:
    import subprocess

    out = tmp / f"{path}.npz"
    cmd = [sys.executable, __file__, "--worker", path, "--sizes", f"{w}x{h}", "--kinds", kind, "--masks", str(n_masks),
           "--repeats", str(repeats), "--seed", str(seed), "--worker-out", str(out), "--device", device]
    subprocess.run(cmd, check=True)
    z = np.load(out)
    counts = z["counts"]
    bounds = np.concatenate([[0], np.cumsum(z["lengths"])])
    return {
        "seconds": float(z["seconds"]), "peak": float(z["peak"]), "stability": z["stability"], "boxes": z["boxes"],
        "rles": [counts[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)], "stages": json.loads(str(z["stages"])),
        "size": (h, w), "gpu_peak": float(z["gpu_peak"]) if "gpu_peak" in z.files else float("nan"),
    }


def _mask_ious(a: Dict[str, Any], b: Dict[str, Any]) -> np.ndarray:
    from samantic.ops import RleBatch, rle_iou

    def batch(r):
        lengths = np.array([len(c) for c in r["rles"]], np.int64)
        counts = np.concatenate(r["rles"]).astype(np.uint32) if r["rles"] else np.zeros(0, np.uint32)
        return RleBatch(counts, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), r["size"])

    ba, bb = batch(a), batch(b)
    return np.array([rle_iou(ba.select([i]), bb.select([i]))[0, 0] for i in range(len(ba))])


def run(sizes: List[tuple], kinds: List[str], n_masks: int, repeats: int, seed: int,
        device: str = "cpu") -> Dict[str, Any]:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for (h, w) in sizes:
            for kind in kinds:
                ref_repeats = repeats if h * w <= 2_000_000 else 1
                ref = _spawn("reference", h, w, kind, n_masks, ref_repeats, seed, Path(tmp), device)
                res = _spawn("samantic", h, w, kind, n_masks, repeats, seed, Path(tmp), device)
                same = sum(np.array_equal(a, b) for a, b in zip(res["rles"], ref["rles"]))
                ious = _mask_ious(res, ref)
                stab_diff = float(np.nanmax(np.abs(res["stability"] - ref["stability"]))) if n_masks else 0.0
                rows.append({
                    "size": f"{w}x{h}",
                    "logits": kind,
                    "masks": n_masks,
                    "reference_s": ref["seconds"],
                    "reference_stages_s": ref["stages"],
                    "samantic_s": res["seconds"],
                    "speedup": ref["seconds"] / res["seconds"],
                    "reference_peak_mib": ref["peak"],
                    "samantic_peak_mib": res["peak"],
                    "memory_ratio": ref["peak"] / max(res["peak"], 1e-3),
                    "identical_rles": f"{same}/{n_masks}",
                    "min_mask_iou": float(ious.min()) if len(ious) else 1.0,
                    "max_stability_diff": stab_diff,
                    "boxes_equal": bool((res["boxes"] == ref["boxes"]).all()),
                    "device": device,
                })
                if device != "cpu":
                    rows[-1]["reference_gpu_peak_mib"] = ref["gpu_peak"]
                r = rows[-1]
                print(f"{w}x{h} {kind}: reference {r['reference_s']:.3f}s / {r['reference_peak_mib']:.0f} MiB, "
                      f"samantic {r['samantic_s']:.4f}s / {r['samantic_peak_mib']:.1f} MiB -> {r['speedup']:.1f}x faster, "
                      f"{r['memory_ratio']:.0f}x less memory, identical RLEs {same}/{n_masks}, min IoU {r['min_mask_iou']:.5f}",
                      flush=True)
    return {"rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sizes", default="1024x768,4000x3000", help="comma-separated WxH")
    ap.add_argument("--kinds", default="blobs,noise")
    ap.add_argument("--masks", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where both paths run")
    ap.add_argument("--worker", choices=["reference", "samantic"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        w, h = (int(v) for v in args.sizes.lower().split("x"))
        _worker(args.worker, h, w, args.kinds, args.masks, args.repeats, args.seed, args.worker_out, args.device)
        return 0

    import torch

    from samantic import _C, __version__

    sizes = []
    for s in args.sizes.split(","):
        w, h = (int(v) for v in s.lower().split("x"))
        sizes.append((h, w))
    result = run(sizes, args.kinds.split(","), args.masks, args.repeats, args.seed, args.device)
    result.update({
        "benchmark": "postprocess",
        "command": "python benchmarks/postprocess.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "samantic": __version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "samantic_threads": _C.build_info()["cpu_threads"],
        "machine": machine(),
        "device": args.device,
    })
    if args.device != "cpu":
        result["gpu"] = torch.cuda.get_device_name(torch.device(args.device)) if torch.cuda.is_available() else None
    table = [[r["size"], r["logits"], str(r["masks"]), f"{r['reference_s']:.3f}", f"{r['samantic_s']:.4f}",
              f"**{r['speedup']:.1f}x**", f"{r['reference_peak_mib']:.0f}", f"{r['samantic_peak_mib']:.1f}",
              f"**{r['memory_ratio']:.0f}x**", r["identical_rles"], f"{r['min_mask_iou']:.5f}",
              f"{r['max_stability_diff']:.1e}"] for r in result["rows"]]
    header = ["image", "logits", "masks", "reference s", "samantic s", "speed-up", "reference peak MiB",
              "samantic peak MiB", "memory ratio", "identical RLEs", "min mask IoU", "max stability diff"]
    where = (f"CPU, {result['machine']['cpus']} cores" if args.device == "cpu" else
             f"{args.device} ({result.get('gpu')}), both paths on the GPU after one warm-up call, torch.cuda.synchronize() "
             "before every clock read; peak MiB is still host RSS (GPU memory of the reference: "
             "reference_gpu_peak_mib in the JSON)")
    pre = (f"Mask post-processing, segment-anything vs samantic.ops.postprocess_masks ({where}, "
           f"best of {args.repeats}; images over 2 Mpx: reference timed once). Each path runs in "
           "its own fresh process; peak MiB = resident-memory high-water mark during the call minus resident memory "
           "before it. Logits: `blobs` = signed distance to 1-2 random ellipses x 4 (+ N(0, 0.05)), sharp like SAM's "
           "decoder outputs; `noise` = a smooth random field with many regions (the kernel's worst case).\n\n"
           f"Command: `{result['command']}`")
    name = "postprocess" if args.device == "cpu" else "postprocess_cuda"
    jp, mp = write_report(args.out, name, result, table, header, pre)
    print(mp.read_text())
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
