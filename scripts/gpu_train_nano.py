"""sam_nano training on a lent GPU machine: an equal-wall-clock encoder A/B, then the winner trained on.

    python3 scripts/gpu_train_nano.py --out DIR --ab-minutes 3.5 --final-minutes 3 \
        --models sam_nano_vit,sam_nano_conv,sam_nano_conv512,sam_nano -- [samantic train sam options]

Meant for the occasional GPU machine of ../shared/DESIGN.md ("GPUs"): its system
python3 has torch but not segment-anything, which comes as a wheel in the ignored
folder .whl/ (README, "GPU runs"). samantic is not installed there: training needs no
compiled kernels, so the source tree goes on the path through a folder of symbolic links.

1. A/B: every model trains in its own process (one 4M-parameter SAM leaves an H200
   nearly idle), with the same recipe, scenes and number of data workers, for the same
   minutes of training (``--time-budget``).
2. Each is evaluated on held-out scenes (``--eval-seeds``, default 0-99: the seeds of ``samantic eval sam``):
   single-point and 3-point mIoU.
3. The best by single-point mIoU resumes from its checkpoint (optimizer state kept; the
   cosine schedule restarts at the point that the longer budget puts it) with all the
   machine's cores for ``--final-minutes`` more, and is evaluated again.

Writes to DIR: MODEL.safetensors per candidate (fp32 weights), final.safetensors
(the winner after phase 3), logs (*.out, *.log.jsonl), eval.json and summary.md.
Optimizer checkpoints (.ckpt, 3x the weights) are deleted at the end: too large to bring back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def environment() -> dict:
    """PYTHONPATH with the carried wheels and, if samantic is not importable, a link farm of the source tree."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    py = sys.executable

    def importable(module: str) -> bool:
        return subprocess.run([py, "-c", f"import {module}"], env={**env, "PYTHONPATH": os.pathsep.join(paths)},
                              capture_output=True).returncode == 0

    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if wheels and not importable("segment_anything"):
        site = "/tmp/site"
        subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                        "--upgrade", "--target", site, *map(str, wheels)], check=True)
        paths.insert(0, site)
    if not importable("samantic.train.sam"):
        farm = Path("/tmp/samantic_src")
        shutil.rmtree(farm, ignore_errors=True)
        pkg = farm / "samantic"
        pkg.mkdir(parents=True)
        for f in (ROOT / "sdk" / "samantic").iterdir():
            (pkg / f.name).symlink_to(f)
        (pkg / "train").symlink_to(ROOT / "train")
        (pkg / "export").symlink_to(ROOT / "export")
        paths.insert(0, str(farm))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def base_model(name: str) -> str:
    """The registered model of a candidate: ``sam_nano-pretrain`` is sam_nano with its encoder pretrained first."""
    return name[: -len("-pretrain")] if name.endswith("-pretrain") else name


def train(models, out: Path, minutes: float, workers: int, device: str, options, env, resume=False,
          pretrain_minutes: float = 0.0):
    """Trains every candidate in its own process for ``minutes``; a ``-pretrain`` candidate spends the first
    ``pretrain_minutes`` of them in `samantic train encoder` (image-level class labels), then starts SAM's
    recipe from that encoder."""
    procs = {}
    for m in models:
        model, pre = base_model(m), (pretrain_minutes if m.endswith("-pretrain") else 0.0)
        cmd = [sys.executable, "-m", "samantic.cli.main", "train", "sam", "--model", model, "--device", device,
               "--workers", str(workers), "--time-budget", str(minutes - pre), "--no-progress",
               "--out", str(out / f"{m}.safetensors"), *options] + (["--resume"] if resume else [])
        steps = [cmd]
        if pre > 0:
            encoder = out / f"{m}.encoder.safetensors"
            cmd += ["--checkpoint", str(encoder)]  # the last --checkpoint wins over one in the options
            if not resume:
                steps.insert(0, [sys.executable, "-m", "samantic.cli.main", "train", "encoder", "--model", model,
                                 "--device", device, "--workers", str(workers), "--minutes", str(pre),
                                 "--steps", "1000000", "--images-per-step", "64", "--no-progress",
                                 "--out", str(encoder)])
        log = open(out / f"{m}.out", "a")
        script = " && ".join(shlex.join(c) for c in steps)
        log.write(script + "\n")
        log.flush()
        procs[m] = subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    failed = [m for m, p in procs.items() if p.wait() != 0]
    for m in failed:
        print(f"{m}: training failed, see {out / (m + '.out')}", flush=True)
    return [m for m in models if m not in failed]


EVAL_CODE = """
import json, sys, torch
from samantic.models import create_model
from samantic.train.metrics import evaluate_sam
model, weights, device = sys.argv[1:4]
sam = create_model(model, checkpoint=weights).to(device)
r = evaluate_sam(sam, range(int(sys.argv[4]), int(sys.argv[5])), [], progress=False)
print(json.dumps({"model": model, "weights": weights, **r.metrics, "instances": r.n_instances, "seconds": r.seconds}))
"""


def evaluate(items, device: str, env, seeds) -> dict:
    """{name: metrics} for [(name, model, weights)], evaluated in parallel processes."""
    procs = {name: subprocess.Popen([sys.executable, "-c", EVAL_CODE, model, str(weights), device, *map(str, seeds)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
             for name, model, weights in items}
    results = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            print(f"eval of {name} failed:\n{stderr[-2000:]}", flush=True)
            continue
        results[name] = json.loads(stdout.strip().splitlines()[-1])
    return results


def last_log(path: Path) -> dict:
    try:
        return json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="sam_nano_vit,sam_nano_conv,sam_nano_conv512,sam_nano")
    ap.add_argument("--ab-minutes", type=float, default=3.5)
    ap.add_argument("--final-minutes", type=float, default=3.0)
    ap.add_argument("--pretrain-minutes", type=float, default=0.0,
                    help="minutes of its A/B time a NAME-pretrain candidate spends pretraining the encoder first")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eval-seeds", default="0:100", help="held-out scene seeds START:STOP (samantic eval sam's)")
    ap.add_argument("options", nargs=argparse.REMAINDER, help="after --: options of `samantic train sam`")
    args = ap.parse_args()
    options = args.options[1:] if args.options[:1] == ["--"] else args.options
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    seeds = tuple(int(v) for v in args.eval_seeds.split(":"))
    models = [m for m in args.models.split(",") if m]
    cores = os.cpu_count() or 2
    t0 = time.time()
    summary = {"models": models, "options": options, "ab_minutes": args.ab_minutes,
               "pretrain_minutes": args.pretrain_minutes,
               "final_minutes": args.final_minutes, "cores": cores, "eval_seeds": args.eval_seeds}
    try:
        import torch

        summary["device"] = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
        summary["torch"] = torch.__version__
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        summary["device"] = f"unknown ({e})"

    workers = max(1, (cores - len(models)) // len(models))
    print(f"A/B: {models}, {args.ab_minutes} min each in parallel, {workers} data workers each", flush=True)
    ok = train(models, out, args.ab_minutes, workers, args.device, options, env, pretrain_minutes=args.pretrain_minutes)
    summary["ab_seconds"] = round(time.time() - t0, 1)
    ab = evaluate([(m, base_model(m), out / f"{m}.safetensors") for m in ok], args.device, env, seeds)
    for m in ok:
        ab.setdefault(m, {}).update(train_log=last_log(out / f"{m}.safetensors.log.jsonl"))
    summary["ab"] = ab
    ranked = sorted(ok, key=lambda m: ab[m].get("miou_1pt_top", ab[m]["train_log"].get("iou_0", 0)), reverse=True)
    status = 0 if len(ok) == len(models) else 1
    if ranked and args.final_minutes > 0:
        best = ranked[0]
        summary["winner"] = best
        print(f"winner of the A/B: {best}; training on for {args.final_minutes} min with {cores - 1} workers", flush=True)
        shutil.copy(out / f"{best}.safetensors", out / f"{best}.ab.safetensors")
        t1 = time.time()
        done = train([best], out, args.ab_minutes + args.final_minutes, max(1, cores - 1), args.device,
                     options, env, resume=True, pretrain_minutes=args.pretrain_minutes)
        summary["final_seconds"] = round(time.time() - t1, 1)
        if done:
            shutil.move(out / f"{best}.safetensors", out / "final.safetensors")
            shutil.move(out / f"{best}.ab.safetensors", out / f"{best}.safetensors")
            final = evaluate([("final", base_model(best), out / "final.safetensors")], args.device, env, seeds)
            summary["final"] = {**final.get("final", {}), "train_log": last_log(out / f"{best}.safetensors.log.jsonl")}
        else:
            status = 1
    for f in list(out.glob("*.ckpt")) + list(out.glob("*.tmp")):
        f.unlink()
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# sam_nano A/B on {summary.get('device')} ({cores} cores), {args.ab_minutes} min each",
             "", "| model | steps | train IoU (round 0) | held-out 1-pt mIoU | 3-pt mIoU |", "|---|---|---|---|---|"]
    for m in models:
        r = ab.get(m, {})
        lg = r.get("train_log", {})
        lines.append(f"| {m} | {lg.get('step', '-')} | {lg.get('iou_0', float('nan')):.3f} | "
                     f"{r.get('miou_1pt_top', float('nan')):.4f} | {r.get('miou_3pt', float('nan')):.4f} |")
    if "final" in summary:
        f = summary["final"]
        lines += ["", f"final ({summary['winner']}, +{args.final_minutes} min): steps {f['train_log'].get('step')}, "
                  f"1-pt mIoU {f.get('miou_1pt_top', float('nan')):.4f}, 3-pt {f.get('miou_3pt', float('nan')):.4f}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
