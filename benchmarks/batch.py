"""The same folder of images through ``samantic segment`` locally and on Ray Data with 1 and 2 actors.

64 held-out shapes-world scenes (rendered once, written as PNG) are segmented by
the installed CLI, each configuration in a fresh process writing to a fresh
folder, one after the other (nothing else heavy should run meanwhile):

  local      ``samantic segment IMAGES --out DIR`` (torch's default threads: all cores)
  ray x1     ``--engine ray --workers 1`` (a local Ray started by the run; the actor gets all cores)
  ray x2     ``--engine ray --workers 2`` (cores shared: each actor gets cores / 2 threads)

Per configuration: the wall-clock of the whole command (start-up, model loading
and Ray's start included), images/s over that wall-clock, the steady rate (the
results JSONs' modification times: (N - 1) / (last - first)), and the start-up
overhead (wall-clock minus N / steady rate). Issue 20's targets on this 2-core
machine: Ray with 1 actor within 15% of the local CLI's images/s, 2 actors
faster than 1.

    python benchmarks/batch.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402

HELD_OUT_SEED = 910_000  # scene seeds no trainer draws


def make_images(folder: Path, n: int) -> List[Path]:
    import cv2

    from samantic.train.data.shapes import render_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"scene{i:03d}.png"
        cv2.imwrite(str(p), cv2.cvtColor(render_scene(HELD_OUT_SEED + i).image, cv2.COLOR_RGB2BGR))
        paths.append(p)
    return paths


def run(cli: str, images: Path, out: Path, extra: List[str], points: int) -> Dict[str, Any]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    cmd = [cli, "segment", str(images), "--out", str(out), "--points-per-side", str(points), "--no-progress", *extra]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    stamps = sorted(p.stat().st_mtime for p in out.glob("*.json"))
    n = len(stamps)
    steady = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else float("nan")
    return {"command": " ".join(cmd[1:]), "images": n, "wall_s": wall, "images_per_s": n / wall,
            "steady_images_per_s": steady, "first_result_s": stamps[0] - t0 if stamps else float("nan"),
            "overhead_s": wall - n / steady if steady == steady else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--points-per-side", type=int, default=8,
                    help="8: about 0.4 s per scene here; 32 (the CLI default): about 5 s")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the three configurations (best round kept)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="batch", help="report file name (NAME.json, NAME.md)")
    args = ap.parse_args()
    command = "python benchmarks/batch.py " + " ".join(sys.argv[1:])
    cli = str(Path(sys.executable).parent / "samantic")
    configs = {"local": [], "ray x1": ["--engine", "ray", "--workers", "1"], "ray x2": ["--engine", "ray", "--workers", "2"]}
    results: Dict[str, List[Dict[str, Any]]] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        make_images(images, args.images)
        for rnd in range(args.rounds):
            for name, extra in configs.items():
                r = run(cli, images, Path(tmp) / f"out-{rnd}-{name.replace(' ', '')}", extra, args.points_per_side)
                results[name].append(r)
                print(f"round {rnd}  {name:7s} wall {r['wall_s']:6.1f} s  {r['images_per_s']:.3f} img/s  "
                      f"steady {r['steady_images_per_s']:.3f} img/s  overhead {r['overhead_s']:.1f} s", flush=True)
    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in results.items()}
    base, base_steady = best["local"]["images_per_s"], best["local"]["steady_images_per_s"]
    rows = []
    for name, r in best.items():
        rows.append([name, f"{r['wall_s']:.1f}", f"{r['images_per_s']:.3f}", f"{r['images_per_s'] / base:.2f}",
                     f"{r['steady_images_per_s']:.3f}", f"{r['steady_images_per_s'] / base_steady:.2f}",
                     f"{r['overhead_s']:.1f}"])
    ray1, ray2 = best["ray x1"], best["ray x2"]
    verdict = {
        "ray_x1_within_15pct_end_to_end": ray1["images_per_s"] >= 0.85 * base,
        "ray_x1_within_15pct_steady": ray1["steady_images_per_s"] >= 0.85 * base_steady,
        "ray_x2_faster_than_x1_end_to_end": ray2["images_per_s"] > ray1["images_per_s"],
        "ray_x2_faster_than_x1_steady": ray2["steady_images_per_s"] > ray1["steady_images_per_s"],
    }
    pre = (f"# Batch segmentation: local CLI vs Ray Data\n\n{args.images} held-out shapes-world scenes "
           f"(seeds {HELD_OUT_SEED}+), sam_nano at its defaults, {args.points_per_side}x{args.points_per_side} points; "
           f"each configuration a fresh `samantic segment` process; best of {args.rounds} round(s).\n\n"
           f"`{command}`\n\n"
           "Targets: " + ", ".join(f"{k}: {'met' if v else 'missed'}" for k, v in verdict.items()) + "\n")
    write_report(args.out, args.name, {"command": command, "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                     "runs": results, "best": best, "targets": verdict},
                 rows, ["configuration", "wall s", "images/s", "vs local", "steady images/s", "steady vs local",
                        "start-up overhead s"], preamble=pre)
    print(pre)


if __name__ == "__main__":
    main()
