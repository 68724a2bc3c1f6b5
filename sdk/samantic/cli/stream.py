"""The video path of ``samantic segment``: video files, cameras and stream URLs through ``Segmenter.stream``.

``segment`` parses the options and builds the Segmenter as for images, then hands
over here when its input is a stream (:func:`stream_source`). Outputs in ``--out``:

- ``NAME.jsonl``: one line per segmented frame, written and flushed as it comes, so an
  interrupted run keeps every frame done so far;
- ``NAME.overlay.mp4`` (``--overlay-video``): the masks drawn on each segmented frame;
- ``NAME.summary.json``: frames read / segmented / dropped, latency p50 / p99, fps, the
  source and the settings, written at the end, on Ctrl-C too.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union
from urllib.parse import urlsplit

import typer

from samantic.io.signals import HeldSignals

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp",
                    ".ogv", ".mjpeg", ".mjpg", ".h264", ".h265", ".hevc")
# network sources OpenCV's FFmpeg backend reads (HLS and DASH come over http(s))
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "rtp", "srt", "udp", "tcp", "http", "https")
OPENCV_MISSING = ("video files, cameras and stream URLs are read with OpenCV, which is not installed: "
                  "pip install 'samantic[video]' (or opencv-python-headless)")


@dataclass
class StreamSource:
    """What to open and how to name it.

    Attributes:
        kind: ``"file"``, ``"camera"`` or ``"url"``.
        target: what ``cv2.VideoCapture`` opens (a path, a camera index or a URL).
        label: for messages (a URL's password left out).
        name: output files are ``NAME.jsonl``, ``NAME.summary.json``, ``NAME.overlay.mp4``.
        live: frames come at the source's pace (a camera, a network stream), so they are dropped
            rather than waited for.
    """

    kind: str
    target: Union[str, int]
    label: str
    name: str
    live: bool


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def _url_name(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "stream"  # never the user name or password
    if parts.port is not None:
        host = f"{host}_{parts.port}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{host}{parts.path}").strip("._-")
    return name[:120] or "stream"


def is_stream_input(raw: str) -> bool:
    """A video file (by extension), a stream URL (by scheme) or a V4L2 camera device (``/dev/videoN``)."""
    from samantic.io.images import IMAGE_EXTENSIONS

    scheme = urlsplit(raw).scheme.lower()
    if "://" in raw and scheme in STREAM_SCHEMES:
        # an image URL is not a stream (the image path reports that it cannot read URLs, as before)
        return not urlsplit(raw).path.lower().endswith(IMAGE_EXTENSIONS)
    if raw.startswith("/dev/video"):
        return True
    p = Path(raw)
    if p.is_dir() or (any(ch in raw for ch in "*?[") and not p.exists()):
        return False  # folders and globs are searched for images
    return p.suffix.lower() in VIDEO_EXTENSIONS


def stream_source(paths: List[str], camera: Optional[int], live: Optional[bool] = None) -> Optional[StreamSource]:
    """The stream among ``segment``'s inputs, or None when they are images.

    Raises:
        typer.BadParameter: a stream mixed with other inputs, or a bad camera index.
    """
    if camera is not None:
        if paths:
            raise typer.BadParameter(f"--camera runs alone; leave out the other inputs ({', '.join(paths)})",
                                     param_hint="--camera")
        if camera < 0:
            raise typer.BadParameter(f"a camera index is >= 0, got {camera}", param_hint="--camera")
        return StreamSource("camera", camera, f"camera {camera}", f"camera{camera}", True if live is None else live)
    streams = [p for p in paths if is_stream_input(p)]
    if not streams:
        return None
    if len(paths) > 1:
        raise typer.BadParameter(f"a video file or stream runs alone, one per run; got {len(paths)} inputs "
                                 f"({', '.join(_redact(p) for p in paths)})", param_hint="PATHS")
    raw = streams[0]
    if "://" in raw:
        return StreamSource("url", raw, _redact(raw), _url_name(raw), True if live is None else live)
    if raw.startswith("/dev/video"):
        return StreamSource("camera", raw, raw, Path(raw).name, True if live is None else live)
    return StreamSource("file", raw, raw, Path(raw).name, False if live is None else live)


def open_stream(source: StreamSource, out: Path, overwrite: bool = False) -> Any:
    """Opens the source (``cv2.VideoCapture``), before any model is loaded, so that a wrong input fails at once.

    Raises:
        ImportError: OpenCV is not installed (the message says what to install).
        ValueError: outputs of an earlier run exist (without ``overwrite``), or the source cannot be opened.
    """
    try:
        import cv2
    except ImportError:
        raise ImportError(OPENCV_MISSING) from None
    jsonl = out / f"{source.name}.jsonl"
    if jsonl.exists() and not overwrite:
        raise ValueError(f"{jsonl} exists (an earlier run); pass --overwrite to replace it")
    if source.kind == "file" and not Path(source.target).is_file():
        raise ValueError(f"{source.label}: no such video file")
    cap = cv2.VideoCapture(source.target)
    if not cap.isOpened():
        cap.release()
        why = {"file": "not a video OpenCV can decode",
               "camera": "no such camera, or another program is using it",
               "url": "unreachable, or not a stream OpenCV's FFmpeg backend can read"}[source.kind]
        # the label of a camera index already says "camera N"; a device path does not
        what = {"file": "video file ", "url": "stream ",
                "camera": "" if isinstance(source.target, int) else "camera "}[source.kind]
        raise ValueError(f"cannot open {what}{source.label}: {why}")
    return cap


def prepare_stream(paths: Optional[List[str]], camera: Optional[int], out: Path, *, live: Optional[bool],
                   overwrite: bool, mask_pngs: bool, overlay_video: bool, max_frames: Optional[int],
                   queue_size: int) -> Tuple[Optional[StreamSource], Any]:
    """``segment``'s inputs -> (the stream and its opened capture), or (None, None) for images.

    Raises:
        typer.BadParameter: no input, a stream mixed with other inputs, or options of the other path.
        typer.Exit: the source cannot be opened (one line on stderr, exit code 1).
    """
    if not paths and camera is None:
        raise typer.BadParameter("give image files, folders or globs, a video file or stream URL, or --camera INDEX",
                                 param_hint="PATHS")
    source = stream_source(paths or [], camera, live)
    stream_only = {"--overlay-video": overlay_video, "--max-frames": max_frames is not None,
                   "--queue-size": queue_size != 2, "--live/--no-live": live is not None}
    if source is None:
        if any(stream_only.values()):
            raise typer.BadParameter("only for a video file, camera or stream URL",
                                     param_hint=next(k for k, v in stream_only.items() if v))
        return None, None
    if mask_pngs:
        raise typer.BadParameter("only for images", param_hint="--mask-pngs")
    try:
        return source, open_stream(source, out, overwrite)
    except (ValueError, ImportError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


class SourceLost(RuntimeError):
    """A camera or stream URL stopped delivering frames."""


class _Frames:
    """(timestamp, RGB frame) pairs from a capture; iterated by the stream's reader thread, which closes it
    (releasing the capture) at the end. ``close()`` also releases a capture that was never read."""

    RETRIES = 10  # failed reads of a live source retried before it counts as lost
    RETRY_WAIT = 0.2  # seconds between them

    def __init__(self, cv2: Any, cap: Any, source: StreamSource, fps: Optional[float], max_frames: Optional[int],
                 t0: float, total: int = 0) -> None:
        self.cv2, self.cap, self.source, self.fps, self.max_frames, self.t0 = cv2, cap, source, fps, max_frames, t0
        self.total = total  # frames a video file declares (0: unknown)
        self.i = 0
        self.short: Optional[Tuple[int, int]] = None  # (read, declared) when a file ended early

    def __iter__(self) -> "_Frames":
        return self

    def __next__(self) -> Tuple[float, Any]:
        cv2 = self.cv2
        if self.max_frames is not None and self.i >= self.max_frames:
            raise StopIteration
        ok, bgr = self.cap.read()
        if not ok and self.source.kind != "file":
            # a camera or stream that stops delivering: a glitch, or unplugged / dropped; not an end
            for _ in range(self.RETRIES):
                time.sleep(self.RETRY_WAIT)
                ok, bgr = self.cap.read()
                if ok:
                    break
            else:
                raise SourceLost(f"the source stopped delivering frames after {self.i} frame(s) ({self.RETRIES} "
                                 f"more reads over {self.RETRIES * self.RETRY_WAIT:.0f} s failed): unplugged, or the "
                                 "stream dropped?")
        if not ok:
            if self.total and self.i < self.total and self.max_frames is None:
                self.short = (self.i, self.total)
            raise StopIteration
        if self.source.kind == "file":
            # media time: where the frame is in the video (OpenCV's position, else index / fps)
            ms = self.cap.get(cv2.CAP_PROP_POS_MSEC)
            ts = ms / 1000.0 if ms and ms > 0 else (self.i / self.fps if self.fps else float(self.i))
        else:
            ts = time.perf_counter() - self.t0  # live: seconds since the stream started
        self.i += 1
        return ts, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self.cap.release()


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def frame_record(frame: Any) -> Dict[str, Any]:
    """One JSON line: frame index, timestamp, latency and the instances (compressed RLE, class names)."""
    result = frame.result
    names = result.names
    instances = []
    for r in result.to_coco(image_id=frame.index):
        r.pop("image_id", None)
        r.pop("iscrowd", None)
        name = r.pop("category_name", None)
        if name is None and names:
            name = names[int(r["category_id"]) - 1]
        if name is not None:
            r["category"] = name
        instances.append(r)
    h, w = frame.frame.shape[:2]
    return {"frame": frame.index, "timestamp": round(float(frame.timestamp), 6),
            "latency_ms": round(frame.latency * 1000.0, 3), "height": h, "width": w, "instances": instances}


def run_stream(source: StreamSource, cap: Any, segmenter: Any, out: Path, *, overlay_video: bool = False,
               queue_size: int = 2, max_frames: Optional[int] = None, progress: bool = True,
               info: Optional[Dict[str, Any]] = None) -> int:
    """Segments an opened source (:func:`open_stream`) frame by frame into ``out``; returns the exit code.

    0 when the stream ended, 130 after Ctrl-C (everything written so far kept, the summary
    written), 1 when no frame could be read, segmenting failed, or a camera / stream stopped
    delivering frames (``ended: "source_lost"``: retried for 2 s first). A live stream's overlay
    video repeats the last segmented frame over the frames it dropped, so it plays at the
    source's pace.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    import cv2

    from samantic.io import atomic_write_json

    err = Console(stderr=True)
    console = Console()
    jsonl = out / f"{source.name}.jsonl"
    summary_path = out / f"{source.name}.summary.json"
    video_path = out / f"{source.name}.overlay.mp4"

    # step: what the source says about itself (cameras and streams often say nothing useful)
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = float(fps) if fps and math.isfinite(fps) and 0 < fps < 1000 else None
    declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if source.kind == "file" else 0
    declared = declared if declared > 0 else 0
    total = min(declared, max_frames) if declared and max_frames else (declared or max_frames)
    out.mkdir(parents=True, exist_ok=True)
    started_at = time.time()
    t0 = time.perf_counter()
    frames = _Frames(cv2, cap, source, fps, max_frames, t0, total=declared)
    stream = segmenter.stream(frames, live=source.live, queue_size=queue_size)

    # step: segment, one flushed JSON line per frame (+ an overlay frame)
    writer = None
    width = height = None
    saved = 0  # frames whose line (and overlay frame) were written
    last_index: Optional[int] = None  # source index of the last frame written
    ending: Optional[str] = None
    error: Optional[BaseException] = None
    columns = [TextColumn("segment"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn()]
    try:
        with open(jsonl, "w", encoding="utf-8") as f, \
                Progress(*columns, console=err, disable=not progress) as bar:
            task = bar.add_task("segment", total=total, info=source.label)
            for fr in stream:
                # step: the frame's outputs, made first (Ctrl-C here loses only this frame) ...
                line = json.dumps(frame_record(fr), separators=(",", ":"), default=_json_default) + "\n"
                height, width = fr.frame.shape[:2]
                image = None
                if overlay_video:
                    if writer is None:
                        writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"mp4v"), fps or 30.0,
                                                 (width, height))
                        if not writer.isOpened():
                            raise ValueError(f"{video_path}: OpenCV cannot write an mp4v video here")
                    image = cv2.cvtColor(fr.result.overlay(fr.frame), cv2.COLOR_RGB2BGR)
                # a live stream drops frames: the overlay covers them (the last segmented frame shown until the
                # next), so the video plays at the source's pace; a file or list drops none (one write per frame)
                repeat = 1 if last_index is None else max(1, fr.index - last_index)
                last_index = fr.index
                # ... then written together, Ctrl-C held, so the lines and the video stay frame for frame
                with HeldSignals("SIGINT"):
                    if image is not None:
                        for _ in range(repeat):
                            writer.write(image)
                    f.write(line)
                    f.flush()
                    saved += 1
                bar.update(task, advance=1, info=f"{source.label}, {fr.dropped} dropped")
    except KeyboardInterrupt:
        ending = "interrupted"
    except Exception as e:  # the source or the Segmenter failed: keep what was written, say why
        error = e
    finally:
        stream.close()
        if writer is not None:
            writer.release()  # finishes the mp4 (its index), on Ctrl-C too

    # step: the summary, printed and written, whatever ended the stream
    s = stream.summary.to_dict()
    if ending == "interrupted":  # Ctrl-C while this loop wrote a frame's outputs: the stream only saw its consumer stop
        s["ended"] = "interrupted"
    if s["segmented"] > saved:  # segmented, then interrupted before its outputs were written: not kept
        s["discarded"] = s.get("discarded", 0) + s["segmented"] - saved
        s["segmented"] = saved
        s["fps"] = round(saved / s["seconds"], 4) if s.get("seconds") else 0.0
    meta = {"source": source.label, "kind": source.kind, "name": source.name, "source_fps": fps,
            "width": width, "height": height, "started_at": started_at,
            "timestamps": ("media time, seconds" if source.kind == "file"
                           else "seconds since the stream started (started_at + timestamp: Unix time of the read)"),
            "max_frames": max_frames, "outputs": {"jsonl": jsonl.name, "overlay_video": video_path.name
                                                  if writer is not None else None}}
    if error is not None:
        meta["error"] = f"{type(error).__name__}: {error}"
        if isinstance(error, SourceLost):
            s["ended"] = "source_lost"
    if frames.short is not None:
        meta["frames_declared"] = frames.short[1]
    atomic_write_json(summary_path, {**s, **meta, **(info or {})}, indent=2)
    table = Table(title="samantic segment (stream)")
    for col in ("frames read", "segmented", "dropped", "latency p50 ms", "latency p99 ms", "fps"):
        table.add_column(col)

    def ms(v: Optional[float]) -> str:
        return f"{v:.1f}" if v is not None else "-"

    table.add_row(str(s["frames_read"]), str(s["segmented"]), str(s["dropped"]), ms(s["latency_p50_ms"]),
                  ms(s["latency_p99_ms"]), f"{s['fps']:.2f}")
    console.print(table)
    console.print(f"results in {escape(str(out))}/ ({jsonl.name}: one JSON line per frame, COCO RLE masks; "
                  f"{summary_path.name}" + (f"; {video_path.name}" if writer is not None else "") + ")")
    if ending == "interrupted":
        err.print(f"interrupted: {s['segmented']} frame(s) segmented and saved in {escape(str(jsonl))}")
        return 130
    if frames.short is not None:
        typer.echo(f"note: {source.label}: read {frames.short[0]} of the {frames.short[1]} frames the file declares "
                   "(a damaged frame ends the read; some containers only estimate their count)", err=True)
    if error is not None:
        typer.echo(f"error: {source.label}: {error}", err=True)
        return 1
    if s["frames_read"] == 0:
        typer.echo(f"error: {source.label}: no frames could be read", err=True)
        return 1
    return 0
