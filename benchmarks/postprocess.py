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
"""

from __future__ import annotations

import argparse
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
            out[i] = np.clip((inside - outside) * 4.0, -20, 20)
        elif kind == "noise":
            field = cv2.resize((rng.standard_normal((16, 16)) * 8).astype(np.float32), (LOW_RES, LOW_RES),
                               interpolation=cv2.INTER_CUBIC)
            out[i] = field
        else:
            raise ValueError(f"kind must be blobs or noise, got {kind!r}")
    return out


def reference(logits_t, input_size, original_size, mask_threshold=0.0, offset=1.0) -> Dict[str, Any]:
    import time

    import torch
    from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score, mask_to_rle_pytorch

    times = {}
    sam = _reference_model()  # built before timing starts (see run())
    with torch.inference_mode():
        t = time.perf_counter()
        masks = sam.postprocess_masks(logits_t[:, None], input_size, original_size)[:, 0]
        times["upsample"] = time.perf_counter() - t
        t = time.perf_counter()
        stability = calculate_stability_score(masks, mask_threshold, offset)
        times["stability"] = time.perf_counter() - t
        t = time.perf_counter()
        binary = masks > mask_threshold
        del masks
        times["threshold"] = time.perf_counter() - t
        t = time.perf_counter()
        boxes = batched_mask_to_box(binary)
        times["box"] = time.perf_counter() - t
        t = time.perf_counter()
        rles = mask_to_rle_pytorch(binary)
        times["rle"] = time.perf_counter() - t
    return {"stability": stability.numpy(), "boxes": boxes.numpy(), "rles": rles, "times": times}


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


def run(sizes: List[tuple], kinds: List[str], n_masks: int, repeats: int, seed: int) -> Dict[str, Any]:
    import torch

    rows = []
    _reference_model()
    for (h, w) in sizes:
        input_size = preprocess_shape(h, w)
        for kind in kinds:
            logits = make_logits(kind, n_masks, input_size, seed)
            logits_t = torch.from_numpy(logits)
            ref_repeats = repeats if h * w <= 2_000_000 else 1
            ref, t_ref, mem_ref = measure(lambda: reference(logits_t, input_size, (h, w)), ref_repeats)
            res, t_ours, mem_ours = measure(lambda: ours(logits, input_size, (h, w)), repeats)
            same_rle = sum(a["counts"] == b["counts"] for a, b in zip(res.to_dicts(), ref["rles"]))
            stab_diff = float(np.nanmax(np.abs(res.stability_score - ref["stability"]))) if n_masks else 0.0
            rows.append({
                "size": f"{w}x{h}",
                "logits": kind,
                "masks": n_masks,
                "reference_s": t_ref,
                "reference_stages_s": ref["times"],
                "samantic_s": t_ours,
                "speedup": t_ref / t_ours,
                "reference_peak_mib": mem_ref,
                "samantic_peak_mib": mem_ours,
                "memory_ratio": mem_ref / max(mem_ours, 1e-3),
                "identical_rles": f"{same_rle}/{n_masks}",
                "max_stability_diff": stab_diff,
                "boxes_equal": bool((res.boxes == ref["boxes"]).all()),
            })
            del ref, res
            print(f"{w}x{h} {kind}: reference {t_ref:.3f}s / {mem_ref:.0f} MiB, samantic {t_ours:.4f}s / "
                  f"{mem_ours:.1f} MiB -> {rows[-1]['speedup']:.1f}x faster, {rows[-1]['memory_ratio']:.0f}x less memory, "
                  f"identical RLEs {same_rle}/{n_masks}", flush=True)
    return {"rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sizes", default="1024x768,4000x3000", help="comma-separated WxH")
    ap.add_argument("--kinds", default="blobs,noise")
    ap.add_argument("--masks", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from samantic import _C, __version__

    sizes = []
    for s in args.sizes.split(","):
        w, h = (int(v) for v in s.lower().split("x"))
        sizes.append((h, w))
    result = run(sizes, args.kinds.split(","), args.masks, args.repeats, args.seed)
    result.update({
        "benchmark": "postprocess",
        "command": "python benchmarks/postprocess.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "samantic": __version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "samantic_threads": _C.build_info()["cpu_threads"],
        "machine": machine(),
    })
    table = [[r["size"], r["logits"], str(r["masks"]), f"{r['reference_s']:.3f}", f"{r['samantic_s']:.4f}",
              f"**{r['speedup']:.1f}x**", f"{r['reference_peak_mib']:.0f}", f"{r['samantic_peak_mib']:.1f}",
              f"**{r['memory_ratio']:.0f}x**", r["identical_rles"]] for r in result["rows"]]
    header = ["image", "logits", "masks", "reference s", "samantic s", "speed-up", "reference peak MiB",
              "samantic peak MiB", "memory ratio", "identical RLEs"]
    pre = (f"Mask post-processing, segment-anything vs samantic.ops.postprocess_masks (CPU, "
           f"{result['machine']['cpus']} cores, best of {args.repeats}; 4000x3000 reference timed once).\n\n"
           f"Command: `{result['command']}`")
    jp, mp = write_report(args.out, "postprocess", result, table, header, pre)
    print(mp.read_text())
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
