"""A video through ``Segmenter.stream`` vs calling the Segmenter frame by frame.

A synthetic 640x480 video (held-out shapes-world scenes, rendered, resized and
written as mp4v) is decoded with OpenCV and segmented twice, in one process,
with the same Segmenter:

  frame-by-frame  read a frame, segment it, read the next one (one thread)
  stream          ``Segmenter.stream``: a reader thread decodes into a queue of
                  ``--queue-size`` while this thread segments (a file is not
                  live: no frame is dropped)

Reported per path: frames/s, Segmenter latency p50 / p99 (and p99 / p50), resident
memory at frame 100 and at the last frame (growth), and the stream's share of the
frame-by-frame throughput. Issue 19's targets on this CPU: stream throughput
>= 95% of frame-by-frame, RSS growth <= 5% between frame 100 and frame 500,
p99 <= 1.5x p50 while nothing is dropped.

    python benchmarks/stream.py --frames 500 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, rss_mib, write_report  # noqa: E402

HELD_OUT_SEED = 900_000  # scene seeds no trainer draws


def make_video(path: Path, frames: int, scenes: int, size: tuple, fps: float) -> Path:
    """``frames`` frames cycling through ``scenes`` rendered scenes, resized to ``size`` (W, H)."""
    import cv2

    from samantic.train.data.shapes import render_scene

    pool = [cv2.resize(render_scene(HELD_OUT_SEED + i).image, size, interpolation=cv2.INTER_LINEAR)
            for i in range(scenes)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write mp4v here")
    for i in range(frames):
        writer.write(cv2.cvtColor(pool[i % scenes], cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def decode(path: Path) -> Iterator[np.ndarray]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def stats(latencies: List[float], seconds: float, rss: Dict[int, float]) -> Dict[str, Any]:
    lat = np.asarray(latencies) * 1000.0
    first, last = min(rss), max(rss)
    return {"frames": len(latencies), "seconds": seconds, "fps": len(latencies) / seconds,
            "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99)),
            "p99_over_p50": float(np.percentile(lat, 99) / np.percentile(lat, 50)),
            "rss_mib": {str(k): v for k, v in sorted(rss.items())},
            "rss_growth_pct": (rss[last] - rss[first]) / rss[first] * 100.0, "rss_from_frame": first,
            "rss_to_frame": last}


def frame_by_frame(seg: Any, video: Path, marks: set) -> Dict[str, Any]:
    latencies: List[float] = []
    rss: Dict[int, float] = {}
    t0 = time.perf_counter()
    for i, frame in enumerate(decode(video)):
        t = time.perf_counter()
        seg(frame)
        latencies.append(time.perf_counter() - t)
        if i + 1 in marks:
            rss[i + 1] = rss_mib()
    return stats(latencies, time.perf_counter() - t0, rss)


def streamed(seg: Any, video: Path, marks: set, queue_size: int) -> Dict[str, Any]:
    latencies: List[float] = []
    rss: Dict[int, float] = {}
    t0 = time.perf_counter()
    with seg.stream(decode(video), queue_size=queue_size) as stream:
        for f in stream:
            latencies.append(f.latency)
            if f.index + 1 in marks:
                rss[f.index + 1] = rss_mib()
    out = stats(latencies, time.perf_counter() - t0, rss)
    out["summary"] = stream.summary.to_dict()
    return out


def main() -> None:
    import torch

    from samantic.models import create_model
    from samantic.runtime import Segmenter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sam_nano")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--frames", type=int, default=500, help="video length (issue 19 asks for >= 500)")
    ap.add_argument("--scenes", type=int, default=16, help="distinct scenes the video cycles through")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--queue-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--warmup", type=int, default=2, help="frames segmented before timing")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="stream", help="report file name (NAME.json, NAME.md)")
    args = ap.parse_args()
    if args.frames < 1:
        ap.error(f"--frames must be >= 1, got {args.frames}")
    torch.set_num_threads(args.threads)

    # step: the video and the Segmenter
    tmp = tempfile.TemporaryDirectory()
    video = make_video(Path(tmp.name) / "synthetic.mp4", args.frames, args.scenes, (args.width, args.height), 30.0)
    seg = Segmenter(create_model(args.model, checkpoint=args.checkpoint), points_per_side=args.points_per_side)
    for frame, _ in zip(decode(video), range(args.warmup)):
        seg(frame)

    # step: both paths over the same decoded frames
    marks = {min(100, args.frames), args.frames}
    results = {"frame-by-frame": frame_by_frame(seg, video, marks),
               "stream": streamed(seg, video, marks, args.queue_size)}
    tmp.cleanup()
    ratio = results["stream"]["fps"] / results["frame-by-frame"]["fps"]

    # step: report
    command = "python benchmarks/stream.py " + " ".join(sys.argv[1:])
    payload = {"command": command, "machine": machine(), "model": args.model, "checkpoint": args.checkpoint,
               "video": {"frames": args.frames, "width": args.width, "height": args.height, "scenes": args.scenes,
                         "codec": "mp4v"},
               "points_per_side": args.points_per_side, "queue_size": args.queue_size, "threads": args.threads,
               "stream_over_frame_by_frame": ratio, "results": results}
    table = []
    for name, r in results.items():
        table.append([name, f"{r['fps']:.3f}", f"{r['latency_p50_ms']:.0f}", f"{r['latency_p99_ms']:.0f}",
                      f"{r['p99_over_p50']:.2f}", f"{r['rss_mib'][str(r['rss_from_frame'])]:.0f}",
                      f"{r['rss_mib'][str(r['rss_to_frame'])]:.0f}", f"{r['rss_growth_pct']:+.2f}%",
                      "" if name != "stream" else f"{ratio:.1%}"])
    dropped = results["stream"]["summary"]["dropped"]
    first, last = results["stream"]["rss_from_frame"], results["stream"]["rss_to_frame"]
    write_report(args.out, args.name, payload, table,
                 ["path", "frames/s", "latency p50 ms", "latency p99 ms", "p99 / p50", f"RSS MiB @ {first}",
                  f"RSS MiB @ {last}", "RSS growth", "throughput vs frame-by-frame"],
                 preamble=f"# Video stream vs frame by frame\n\n`{command}`\n\n{machine()['processor']}, "
                          f"{args.threads} torch threads, {args.model}, {args.points_per_side}x{args.points_per_side} "
                          f"points; a {args.width}x{args.height} mp4v video of {args.frames} frames ({args.scenes} "
                          f"held-out shapes-world scenes, resized), decoded by OpenCV in both paths; stream queue "
                          f"{args.queue_size}, frames dropped: {dropped}. Targets (issue 19): throughput >= 95%, "
                          "RSS growth <= 5% from frame 100 to 500, p99 <= 1.5x p50.")
    for name, r in results.items():
        print(f"{name}: {r['fps']:.3f} frames/s, latency p50 {r['latency_p50_ms']:.0f} ms p99 "
              f"{r['latency_p99_ms']:.0f} ms, RSS growth {r['rss_growth_pct']:+.2f}%")
    print(f"stream / frame-by-frame throughput: {ratio:.1%}; report in {args.out}/{args.name}.md")


if __name__ == "__main__":
    main()
