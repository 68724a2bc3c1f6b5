"""Size of the torch-free runtime install, measured in a fresh virtual environment.

Builds samantic's wheel (CPU kernels only, so the measure does not depend on
nvcc being present), installs ``samantic[runtime]`` into a new venv with the
development pins (``-c requirements/constraints.txt``), and reports the bytes
each installed distribution adds to site-packages (pip and setuptools of the
empty venv excluded). Then, inside that venv, it checks that torch and OpenCV
are absent and runs ``samantic segment --bundle`` on the bundled demo scenes
with a sam_nano bundle exported from the development environment; with ``--samcp HEAD``
also a bundle carrying that SAM-CP head on two v2 scenes (panoptic outputs, no torch).

    python benchmarks/runtime_install.py --out benchmarks/results [--samcp runs/samcp/main/samcp.safetensors]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB = 300.0

SIZES = r'''
import json, os, sys
from importlib import metadata
out = {}
for dist in metadata.distributions():
    total = 0
    for f in dist.files or []:
        p = f.locate()
        if os.path.isfile(p):
            total += os.path.getsize(p)
    out[dist.metadata["Name"]] = total
json.dump(out, sys.stdout)
'''

CHECK = r'''
import importlib.util, json, sys
print(json.dumps({m: importlib.util.find_spec(m) is not None for m in ("torch", "cv2", "onnxruntime", "samantic")}))
'''


def run(cmd: List[str], **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="runtime_install")
    ap.add_argument("--samcp", type=Path, help="also run a bundle with this SAM-CP head in the runtime venv")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="samantic-runtime-") as tmp:
        tmp = Path(tmp)
        print("building the wheel (CPU kernels only) ...", flush=True)
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp / "wheels"),
             "--config-settings=cmake.define.SAMANTIC_CUDA=OFF", "--config-settings=build-dir=" + str(tmp / "build"),
             str(ROOT)])
        wheel = next((tmp / "wheels").glob("samantic-*.whl"))
        venv = tmp / "venv"
        run([sys.executable, "-m", "venv", str(venv)])
        py = str(venv / "bin" / "python")
        empty: Dict[str, int] = json.loads(run([py, "-c", SIZES]))
        print(f"installing {wheel.name}[runtime] into a fresh venv ...", flush=True)
        run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c",
             str(ROOT / "requirements" / "constraints.txt"), f"{wheel}[runtime]"])
        sizes: Dict[str, int] = json.loads(run([py, "-c", SIZES]))
        added = {k: v for k, v in sizes.items() if k not in empty}
        present = json.loads(run([py, "-c", CHECK]))

        print("exporting a sam_nano bundle and segmenting the demo scenes in the runtime venv ...", flush=True)
        from samantic.demo import DEMO_THRESHOLDS, demo_images
        from samantic.export.bundle import export_bundle

        bundle = export_bundle("sam_nano", tmp / "bundle")
        scenes = demo_images()
        seg = subprocess.run([str(venv / "bin" / "samantic"), "segment", *map(str, scenes), "--bundle", str(bundle),
                              "--out", str(tmp / "out"), "--no-progress", *DEMO_THRESHOLDS],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        masks = sum(len(json.loads(p.read_text())["annotations"]) for p in (tmp / "out").glob("*.json"))
        samcp_run = None
        if args.samcp is not None:
            from PIL import Image

            from samantic.train.data.panoptic import render_panoptic

            print("exporting a sam_nano bundle with the SAM-CP head and segmenting two v2 scenes ...", flush=True)
            sb = export_bundle("sam_nano", tmp / "bundle-samcp", samcp=args.samcp, int8=False)
            (tmp / "v2").mkdir()
            for s in (0, 1):
                Image.fromarray(render_panoptic(s).image).save(tmp / "v2" / f"scene{s}.png")
            proc = subprocess.run([str(venv / "bin" / "samantic"), "segment", str(tmp / "v2"), "--bundle", str(sb),
                                   "--out", str(tmp / "out-samcp"), "--no-progress"],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
            files = sorted(p.name for p in (tmp / "out-samcp").glob("*")) if (tmp / "out-samcp").is_dir() else []
            segs = sum(len(json.loads(p.read_text())["annotations"])
                       for p in (tmp / "out-samcp").glob("*.png.json")) if files else 0
            samcp_run = {"returncode": proc.returncode, "segments": segs, "files": files,
                         "stderr": proc.stderr[-2000:]}

    total = sum(added.values()) / 2**20
    rows = [[name, f"{size / 2**20:.1f}"] for name, size in sorted(added.items(), key=lambda kv: -kv[1])]
    rows.append(["**total**", f"**{total:.1f}**"])
    payload = {"machine": machine(), "wheel": wheel.name, "added_mib": {k: v / 2**20 for k, v in added.items()},
               "total_mib": total, "target_mib": TARGET_MB, "importable": present,
               "segment_returncode": seg.returncode, "segment_masks": masks, "segment_stderr": seg.stderr[-2000:],
               "samcp": samcp_run}
    preamble = (
        "# The torch-free runtime install\n\n"
        f"`pip install '{wheel.name}[runtime]'` into a fresh venv (development pins), site-packages bytes per "
        f"distribution, pip/setuptools of the empty venv excluded. Target: under {TARGET_MB:.0f} MiB.\n\n"
        f"`python benchmarks/runtime_install.py {' '.join(sys.argv[1:])}`\n\n"
        f"Importable in that venv: {', '.join(f'{k} {v}' for k, v in present.items())}. "
        f"`samantic segment --bundle` on the {len(scenes)} demo scenes there: exit code {seg.returncode}, "
        f"{masks} masks.\n"
        + (f"\nSAM-CP bundle ({args.samcp}) in the same venv, `samantic segment --bundle` on two v2 scenes: exit code "
           f"{samcp_run['returncode']}, {samcp_run['segments']} panoptic segments, files "
           f"{', '.join(samcp_run['files'])}.\n" if samcp_run else "")
    )
    jp, mp = write_report(args.out, args.name, payload, rows, ["distribution", "MiB"], preamble)
    print(mp.read_text())
    if seg.returncode != 0:
        print(seg.stderr[-2000:], file=sys.stderr)


if __name__ == "__main__":
    main()
