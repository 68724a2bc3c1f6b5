"""Segment-everything per image on this CPU: sam_nano v4 (ViT, 24x24 embedding) vs the shipped sam_nano (conv, 48x48).

Both run through samantic's generator in one process, alternating, on the same images, at each
model's own thresholds (v4: the 0.25 / 0.8 its demo used; the shipped one: its recommended thresholds,
box NMS included) and at one common setting. v4's weights come from git history (the commit before v5
shipped); the shipped weights' version (their header's ``version``) names the second column.

    python benchmarks/nano_versions.py --out benchmarks/results [--v4-commit 36c2f97]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_report  # noqa: E402
from amg_vs_reference import load_image  # noqa: E402

V4_THRESHOLDS = {"pred_iou_thresh": 0.25, "stability_score_thresh": 0.8}
COMMON = {"pred_iou_thresh": 0.5, "stability_score_thresh": 0.9}


def v4_model(commit: str):
    """sam_nano v4: the ViT architecture (now ``sam_nano_vit``) with the weights shipped at ``commit``."""
    from samantic.models import create_model, load_checkpoint

    blob = subprocess.run(["git", "show", f"{commit}:sdk/samantic/assets/sam_nano.safetensors"], check=True,
                          capture_output=True, cwd=Path(__file__).resolve().parents[1]).stdout
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(blob)
        f.flush()
        model = create_model("sam_nano_vit")
        load_checkpoint(model, f.name, model_name="sam_nano")  # v4's file names its model sam_nano
    return model


def shipped_version() -> str:
    """The shipped sam_nano weights' version, from their safetensors header (``"shipped"`` if it names none)."""
    from samantic.models import get_model_entry, read_metadata, resolve_checkpoint

    return read_metadata(resolve_checkpoint(get_model_entry("sam_nano").default_weights)).get("version", "shipped")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--images", default="scene,astronaut,coffee")
    ap.add_argument("--v4-commit", default="36c2f97")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from samantic.models import create_model
    from samantic.pipeline import AutomaticMaskGenerator

    torch.set_grad_enabled(False)
    from samantic.models import recommended_thresholds

    new = shipped_version()
    models = {"v4": v4_model(args.v4_commit), new: create_model("sam_nano")}
    own = {"v4": V4_THRESHOLDS, new: dict(recommended_thresholds(models[new]))}
    rows = []
    for name in args.images.split(","):
        image = load_image(name)
        for setting in ("own", "common"):
            gens = {v: AutomaticMaskGenerator(m, **(own[v] if setting == "own" else COMMON))
                    for v, m in models.items()}
            times = {v: [] for v in gens}
            stages = {}
            for v, g in gens.items():
                g.generate_masks(image)  # warm-up
            for _ in range(args.repeats):
                for v, g in gens.items():
                    t = time.perf_counter()
                    found = g.generate_masks(image)
                    times[v].append(time.perf_counter() - t)
                    stages[v] = (dict(g.timings), len(found))
            row = {"image": name, "size": list(image.shape[:2]), "setting": setting}
            for v in gens:
                row[v] = {"seconds": statistics.median(times[v]), "masks": stages[v][1],
                          "thresholds": own[v] if setting == "own" else COMMON,
                          "stages": {k: round(s, 3) for k, s in stages[v][0].items()}}
            row["new"] = new
            row["new_over_v4"] = row[new]["seconds"] / row["v4"]["seconds"]
            rows.append(row)
            print(f"{name} {setting}: v4 {row['v4']['seconds']:.2f} s, {new} {row[new]['seconds']:.2f} s "
                  f"({row['new_over_v4']:.2f}x)", flush=True)
    mine = ", ".join(f"{k} {v}" for k, v in own[new].items())
    preamble = (f"# sam_nano v4 vs {new}: segment-everything per image on this CPU\n\n"
                f"`python benchmarks/nano_versions.py --out {args.out}`; median of {args.repeats} calls each, "
                "alternating, after a warm-up; 32 x 32 points; samantic's generator for both. Own thresholds: v4 "
                f"0.25 / 0.8 (its demo's), {new} {mine} (its recommended thresholds); common: 0.5 / 0.9.")
    header = ["image", "size", "thresholds", "v4 s", f"{new} s", f"{new} / v4", "v4 masks", f"{new} masks",
              "v4 decoder s", f"{new} decoder s"]
    table = [[r["image"], f"{r['size'][1]}x{r['size'][0]}", r["setting"], f"{r['v4']['seconds']:.2f}",
              f"{r[new]['seconds']:.2f}", f"**{r['new_over_v4']:.2f}x**", str(r["v4"]["masks"]), str(r[new]["masks"]),
              f"{r['v4']['stages'].get('decoder', 0):.2f}", f"{r[new]['stages'].get('decoder', 0):.2f}"] for r in rows]
    write_report(args.out, "nano_versions", {"machine": machine(), "rows": rows}, table, header, preamble)

if __name__ == "__main__":
    main()
