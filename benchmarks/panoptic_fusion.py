"""Panoptic fusion: the numpy reference (dense masks) vs samantic.ops.panoptic_fusion (RLEs).

For each image size and candidate count, random union-of-blobs candidates (1-4 discs,
ellipses or rectangles each, object-sized to stuff-sized, overlapping a lot, as SAM-CP's
merged candidates do) with uniform random scores go through
  reference:          samantic.pipeline.panoptic.panoptic_fusion on bool [N, H, W] masks
                      (restarts after each dropped candidate)
  reference + decode: rle_decode of the RLEs to those masks first, as SamcpPredictor does
  kernel:             samantic.ops.panoptic_fusion on the RLEs (one pass, no [N, H, W])
timing each (best of --repeats) and checking that map and kept flags are identical.

    python benchmarks/panoptic_fusion.py
    python benchmarks/panoptic_fusion.py --device cuda --out runs/gpu-check

With ``--device cuda`` the kernel runs on CUDA (one untimed warm-up call first: context and
module loading); its time includes the upload of the runs and the download of the map.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, measure, write_report  # noqa: E402


def make_candidates(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """bool ``[n, h, w]``: each candidate a union of 1-4 blobs; about one in six stuff-sized."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        big = rng.random() < 1 / 6
        scale = min(h, w) * (rng.uniform(0.25, 0.6) if big else rng.uniform(0.03, 0.15))
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        for _ in range(rng.integers(1, 5)):
            y, x = cy + rng.normal(0, scale), cx + rng.normal(0, scale)
            ry, rx = scale * rng.uniform(0.4, 1.2), scale * rng.uniform(0.4, 1.2)
            if rng.random() < 0.7:
                out[i] |= ((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 < 1
            else:
                y0, x0 = int(max(0, y - ry)), int(max(0, x - rx))
                out[i, y0 : int(y + ry) + 1, x0 : int(x + rx) + 1] = True
    return out


def run(sizes: List[tuple], counts: List[int], repeats: int, device: str, overlap_thresh: float, min_area: int,
        seed: int) -> Dict[str, Any]:
    from samantic import ops
    from samantic.pipeline.panoptic import panoptic_fusion as reference

    rows = []
    for h, w in sizes:
        for n in counts:
            masks = make_candidates(n, h, w, seed + n)
            scores = np.random.default_rng(seed + n + 1).random(n)
            rles = ops.rle_encode(masks)
            if device.startswith("cuda"):
                ops.panoptic_fusion(rles, scores, overlap_thresh, min_area, device=device)  # warm-up
            (ref_map, ref_kept), t_ref, _ = measure(lambda: reference(masks, scores, overlap_thresh, min_area), repeats)
            _, t_dec, _ = measure(lambda: reference(ops.rle_decode(rles).astype(bool), scores, overlap_thresh,
                                                    min_area), repeats)
            out, t_ker, _ = measure(lambda: ops.panoptic_fusion(rles, scores, overlap_thresh, min_area, device=device),
                                    max(repeats, 5))
            identical = bool(np.array_equal(out.map, ref_map) and np.array_equal(out.kept, ref_kept))
            area = masks.reshape(n, -1).sum(1)
            rows.append({"h": h, "w": w, "n": n, "kept": int(out.kept.sum()), "mean_area": float(area.mean()),
                         "covered": float((out.map > 0).mean()), "reference_s": t_ref, "reference_decode_s": t_dec,
                         "kernel_s": t_ker, "speedup": t_ref / t_ker, "identical": identical})
            print(f"{w}x{h} N={n}: kept {rows[-1]['kept']}, reference {t_ref * 1e3:.1f} ms "
                  f"(+decode {t_dec * 1e3:.1f} ms), kernel ({device}) {t_ker * 1e3:.2f} ms, "
                  f"x{t_ref / t_ker:.0f}, identical {identical}", flush=True)
    return {"device": device, "overlap_thresh": overlap_thresh, "min_area": min_area, "repeats": repeats,
            "machine": machine(), "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="640x480", help="WxH,... (default 640x480)")
    ap.add_argument("--candidates", default="60,200", help="candidate counts (default 60,200)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the kernel runs: cpu, cuda, cuda:N")
    ap.add_argument("--overlap-thresh", type=float, default=0.5)
    ap.add_argument("--min-area", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write panoptic_fusion[_cuda].{json,md} here")
    args = ap.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split("x"))[::-1] for s in args.sizes.split(",")]
    counts = [int(c) for c in args.candidates.split(",")]
    result = run(sizes, counts, args.repeats, args.device, args.overlap_thresh, args.min_area, args.seed)
    if args.out is not None:
        header = ["size", "N", "kept", "reference ms", "reference + decode ms", f"kernel ({args.device}) ms",
                  "speed-up", "identical"]
        table = [[f"{r['w']}x{r['h']}", str(r["n"]), str(r["kept"]), f"{r['reference_s'] * 1e3:.1f}",
                  f"{r['reference_decode_s'] * 1e3:.1f}", f"{r['kernel_s'] * 1e3:.2f}", f"{r['speedup']:.0f}x",
                  str(r["identical"])] for r in result["rows"]]
        name = "panoptic_fusion" + ("_cuda" if args.device.startswith("cuda") else "")
        write_report(args.out, name, result, table, header,
                     preamble=f"overlap_thresh {args.overlap_thresh}, min_area {args.min_area}; best of "
                              f"{args.repeats} (kernel: of {max(args.repeats, 5)}); {result['machine']['processor']}")
    return 0 if all(r["identical"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
