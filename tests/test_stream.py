"""Streams: ``Segmenter.stream`` (reader thread, bounded queue, dropping) and ``samantic segment`` on videos and cameras."""

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from samantic.cli.main import app
from samantic.cli.stream import is_stream_input, stream_source
from samantic.runtime.stream import FrameStream

FAST = ["--points-per-side", "4", "--no-progress"]
SIZE = (96, 128)  # H, W


def _scene(i: int) -> np.ndarray:
    from samantic.train.data.shapes import render_scene

    return render_scene(i, size=SIZE).image


@pytest.fixture(scope="module")
def segmenter():
    from samantic.models import create_model
    from samantic.runtime import Segmenter

    return Segmenter(create_model("sam_nano"), points_per_side=4)


def _write_video(path: Path, n: int, fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (SIZE[1], SIZE[0]))
    assert writer.isOpened()
    for i in range(n):
        writer.write(cv2.cvtColor(_scene(i % 4), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _lines(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _said(output: str) -> str:
    """The words of a CLI's output, without rich's line wrapping and box drawing."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", output).split())


class FakeCapture:
    """Stands in for cv2.VideoCapture: ``n`` synthetic frames as fast as asked, then the end (or ``fail``)."""

    opened = []

    def __init__(self, target, n=40, fps=30.0, fail=None, ok=True, pause=0.0, declared=None):
        self.target, self.n, self.fps, self.fail, self.ok, self.pause = target, n, fps, fail, ok, pause
        self.declared = n if declared is None else declared
        self.i = 0
        self.released = False
        FakeCapture.opened.append(self)

    def isOpened(self):
        return self.ok

    def read(self):
        if self.fail is not None and self.i == self.fail[0]:
            raise self.fail[1]
        if self.i >= self.n:
            return False, None
        time.sleep(self.pause)
        frame = cv2.cvtColor(_scene(self.i % 4), cv2.COLOR_RGB2BGR)
        self.i += 1
        return True, frame

    def get(self, prop):
        return {cv2.CAP_PROP_FPS: self.fps, cv2.CAP_PROP_FRAME_COUNT: float(self.declared)}.get(prop, 0.0)

    def release(self):
        self.released = True


@pytest.fixture
def fake_cv2(monkeypatch):
    def install(**kw):
        FakeCapture.opened = []
        monkeypatch.setattr(cv2, "VideoCapture", lambda target: FakeCapture(target, **kw))
        return FakeCapture.opened

    return install


# --- Segmenter.stream ---------------------------------------------------------------------------------------


def test_stream_of_a_list_equals_frame_by_frame(segmenter):
    frames = [_scene(i) for i in range(3)]
    direct = [segmenter(f) for f in frames]
    with segmenter.stream([(0.5 * i, f) for i, f in enumerate(frames)]) as stream:
        got = list(stream)
    assert [g.index for g in got] == [0, 1, 2] and [g.timestamp for g in got] == [0.0, 0.5, 1.0]
    assert any(len(d) for d in direct), "the shipped nano keeps masks on these scenes"
    for g, d in zip(got, direct):
        assert [r["segmentation"]["counts"] for r in g.result.instances] == \
               [r["segmentation"]["counts"] for r in d.instances]
        np.testing.assert_array_equal(g.result.masks.iou_preds, d.masks.iou_preds)
        assert g.latency > 0 and g.delay >= g.latency
    s = stream.summary
    assert (s.frames_read, s.segmented, s.dropped, s.ended, s.live) == (3, 3, 0, "end", False)
    assert s.latency_p50_ms > 0 and s.latency_p99_ms >= s.latency_p50_ms and s.fps > 0


def test_plain_frames_get_read_times_and_a_non_live_source_is_never_dropped():
    def model(frame):
        time.sleep(0.005)
        return int(frame[0, 0, 0])

    frames = [np.full((4, 4, 3), i, np.uint8) for i in range(12)]
    stream = FrameStream(model, iter(frames), queue_size=1)
    got = list(stream)
    assert [g.result for g in got] == list(range(12)) and [g.index for g in got] == list(range(12))
    ts = [g.timestamp for g in got]
    assert ts[0] >= 0 and ts == sorted(ts)
    assert (stream.summary.dropped, stream.summary.segmented) == (0, 12)


@pytest.mark.parametrize("drop, kept", [("oldest", [0, 18, 19]), ("newest", [0, 1, 2])])
def test_live_source_faster_than_the_model_drops_frames(drop, kept):
    """The model is busy on frame 0 while the source delivers frames 1..19 into a queue of 2."""
    busy, delivered = threading.Event(), threading.Event()
    frames = [np.full((4, 4, 3), i, np.uint8) for i in range(20)]

    def camera():
        yield frames[0]
        assert busy.wait(10)
        yield from frames[1:]
        delivered.set()

    def slow_model(frame):
        busy.set()
        delivered.wait(10)
        return int(frame[0, 0, 0])

    stream = FrameStream(slow_model, camera(), live=True, queue_size=2, drop=drop)
    got = list(stream)
    assert [g.index for g in got] == kept and [g.result for g in got] == kept
    s = stream.summary
    assert (s.frames_read, s.segmented, s.dropped, s.ended) == (20, 3, 17, "end")


def test_source_errors_are_raised_after_the_frames_before_them():
    frame = np.zeros((4, 4, 3), np.uint8)

    def source(exc):
        yield frame
        yield frame
        raise exc

    stream = FrameStream(lambda f: 1, source(KeyboardInterrupt()))
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for g in stream:
            seen.append(g.index)
    assert seen == [0, 1] and stream.summary.ended == "interrupted" and stream.summary.segmented == 2
    stream = FrameStream(lambda f: 1, source(OSError("camera unplugged")))
    with pytest.raises(OSError, match="unplugged"):
        list(stream)
    assert stream.summary.ended == "error" and stream.summary.segmented == 2


def test_leaving_early_stops_the_reader_and_closes_the_source():
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield np.zeros((4, 4, 3), np.uint8)
        finally:
            closed.set()

    with FrameStream(lambda f: 0, endless()) as stream:
        for g in stream:
            if g.index == 3:
                break
    assert closed.wait(5) and not stream._reader.is_alive()
    assert stream.summary.ended == "closed" and stream.summary.segmented == 4


def test_bad_arguments_and_frames():
    with pytest.raises(ValueError, match="drop must be one of"):
        FrameStream(lambda f: 0, [], drop="middle")
    with pytest.raises(ValueError, match="queue_size"):
        FrameStream(lambda f: 0, [], queue_size=0)
    with pytest.raises(TypeError):
        FrameStream(lambda f: 0, 42)
    good = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="frame 1: image must be uint8"):
        list(FrameStream(lambda f: 0, [good, good.astype(np.float32)]))
    with pytest.raises(ValueError, match=r"frame 0: a tuple must be \(timestamp, frame\)"):
        list(FrameStream(lambda f: 0, [(0.0, good, "extra")]))
    with pytest.raises(ValueError, match=r"frame 0: .*looks like OpenCV's cap.read\(\)"):
        list(FrameStream(lambda f: 0, [(True, good)]))  # `yield cap.read()`
    with pytest.raises(ValueError, match="frame 0: a \\(timestamp, frame\\) pair needs a number first, got str"):
        list(FrameStream(lambda f: 0, [("noon", good)]))


# --- samantic segment VIDEO | --camera | URL ----------------------------------------------------------------------


def test_stream_inputs_are_told_apart_from_images(tmp_path):
    assert is_stream_input("clip.MP4") and is_stream_input("a/b.mkv") and is_stream_input("/dev/video0")
    assert is_stream_input("rtsp://user:secret@cam.local:554/live") and is_stream_input("https://x.org/a/index.m3u8")
    assert not is_stream_input("photo.jpg") and not is_stream_input("https://x.org/photo.png")
    assert not is_stream_input(str(tmp_path)) and not is_stream_input(str(tmp_path / "*.mp4"))
    src = stream_source(["rtsp://user:secret@cam.local:554/live"], None)
    assert src.live and "secret" not in src.label and "secret" not in src.name and src.name == "cam.local_554_live"
    assert stream_source([str(tmp_path / "a.png")], None) is None
    assert stream_source(["clip.mp4"], None).live is False and stream_source([], 0).name == "camera0"


def test_video_file_through_the_installed_command(tmp_path):
    """A generated video: one JSON line per frame with RLEs pycocotools decodes, an overlay video, a summary."""
    from pycocotools import mask as mask_utils

    n = 12
    video = _write_video(tmp_path / "clip.mp4", n)
    exe = Path(sys.executable).parent / "samantic"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "samantic.cli.main"]
    out = tmp_path / "out"
    r = subprocess.run([*cmd, "segment", str(video), "--out", str(out), "--overlay-video", *FAST],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _lines(out / "clip.mp4.jsonl")
    assert [l["frame"] for l in lines] == list(range(n))
    np.testing.assert_allclose([l["timestamp"] for l in lines], np.arange(n) / 10.0, atol=1e-3)  # media time
    assert sum(len(l["instances"]) for l in lines) > 0
    for l in lines:
        assert (l["height"], l["width"]) == SIZE and l["latency_ms"] > 0
        for inst in l["instances"]:
            m = mask_utils.decode(inst["segmentation"])
            assert m.shape == SIZE and int(m.sum()) == inst["area"]
    summary = json.loads((out / "clip.mp4.summary.json").read_text())
    assert (summary["frames_read"], summary["segmented"], summary["dropped"], summary["ended"]) == (n, n, 0, "end")
    assert summary["latency_p99_ms"] >= summary["latency_p50_ms"] > 0 and summary["fps"] > 0
    assert summary["model"] == "sam_nano" and summary["settings"]["points_per_side"] == 4
    cap = cv2.VideoCapture(str(out / "clip.mp4.overlay.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == n and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == SIZE[1]
    cap.release()
    said = _said(r.stdout)
    assert "frames read" in said and "clip.mp4.jsonl" in said


def test_ctrl_c_on_the_command_keeps_what_was_written(tmp_path):
    """A real SIGINT while the command segments: exit code 130, complete lines, the summary, a playable overlay."""
    import signal

    video = _write_video(tmp_path / "long.mp4", 40)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "samantic.cli.main", "segment", str(video), "--out", str(out),
                          "--overlay-video", *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # a shell's background job starts with SIGINT ignored; Python then has no Ctrl-C handler
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    jsonl = out / "long.mp4.jsonl"
    deadline = time.monotonic() + 300
    while not (jsonl.exists() and jsonl.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        assert p.poll() is None, p.communicate()
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stdout + stderr
    lines = _lines(jsonl)  # every line complete
    s = json.loads((out / "long.mp4.summary.json").read_text())
    assert s["ended"] == "interrupted" and 1 <= s["segmented"] == len(lines) < 40
    assert [l["frame"] for l in lines] == list(range(len(lines)))
    cap = cv2.VideoCapture(str(out / "long.mp4.overlay.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == len(lines)
    cap.release()
    assert "interrupted" in stderr and "Traceback" not in stderr


def test_fake_camera_faster_than_the_model_drops_and_counts(fake_cv2, tmp_path):
    opened = fake_cv2(n=10_000, pause=0.002)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["segment", "--camera", "0", "--out", str(out), "--max-frames", "30", *FAST])
    assert res.exit_code == 0, res.output
    assert opened[0].target == 0 and opened[0].released
    s = json.loads((out / "camera0.summary.json").read_text())
    assert s["live"] and s["frames_read"] == 30 and s["dropped"] > 0
    assert s["segmented"] + s["dropped"] == 30
    frames = [l["frame"] for l in _lines(out / "camera0.jsonl")]
    assert len(frames) == s["segmented"] and frames == sorted(set(frames))
    assert frames[-1] == 29  # dropping the oldest keeps the newest frame
    assert "timestamps" in s and s["kind"] == "camera"


def test_a_camera_that_stops_delivering_is_lost_not_ended(fake_cv2, tmp_path, monkeypatch):
    from samantic.cli import stream as cli_stream

    monkeypatch.setattr(cli_stream._Frames, "RETRY_WAIT", 0.0)
    opened = fake_cv2(n=5)  # five frames, then every read fails (unplugged)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["segment", "--camera", "0", "--out", str(out), *FAST])
    assert res.exit_code == 1, res.output
    assert "stopped delivering frames after 5 frame(s)" in _said(res.output) and opened[0].released
    assert opened[0].i == 5  # and it was asked again before giving up (the fake counts only good reads)
    s = json.loads((out / "camera0.summary.json").read_text())
    assert s["ended"] == "source_lost" and s["frames_read"] == 5 and "SourceLost" in s["error"]
    assert len(_lines(out / "camera0.jsonl")) == s["segmented"]


def test_live_overlay_video_covers_the_dropped_frames(fake_cv2, tmp_path):
    """A live camera drops frames; its overlay video still spans every frame read (the last overlay repeated),
    so it plays at the camera's pace."""
    real_capture = cv2.VideoCapture  # to read the video back
    fake_cv2(n=10_000, pause=0.002)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["segment", "--camera", "0", "--out", str(out), "--max-frames", "30",
                                   "--overlay-video", *FAST])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "camera0.summary.json").read_text())
    frames = [l["frame"] for l in _lines(out / "camera0.jsonl")]
    assert s["dropped"] > 0 and len(frames) < 30
    cap = real_capture(str(out / "camera0.overlay.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == frames[-1] - frames[0] + 1


def test_a_video_file_shorter_than_it_declares_is_noted(fake_cv2, tmp_path):
    fake_cv2(n=4, declared=9)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    res = CliRunner().invoke(app, ["segment", str(video), "--out", str(tmp_path / "out"), *FAST])
    assert res.exit_code == 0, res.output
    assert "read 4 of the 9 frames the file declares" in _said(res.output)
    s = json.loads((tmp_path / "out" / "clip.mp4.summary.json").read_text())
    assert s["ended"] == "end" and s["frames_declared"] == 9 and s["segmented"] == 4


def test_ctrl_c_keeps_the_frames_written_and_the_summary(fake_cv2, tmp_path):
    """KeyboardInterrupt from the source after 3 frames: 3 lines, a summary, exit code 130; a head names the masks."""
    import torch

    from samantic.heads.usam import HeadInfo, UsamHead

    torch.manual_seed(0)
    head = UsamHead(HeadInfo(classes=("circle", "star"), token_dim=128, model="sam_nano"))
    with torch.no_grad():  # an untrained head that calls everything a circle
        head.mlp[-1].bias.copy_(torch.tensor([8.0, 0.0, -8.0]))
    head_path = head.save(tmp_path / "head.safetensors")
    opened = fake_cv2(n=100, fail=(3, KeyboardInterrupt()))
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")  # the fake capture reads it
    out = tmp_path / "out"
    args = ["segment", str(video), "--out", str(out), "--head", str(head_path), "--classes", "circle",
            "--score-thresh", "0", *FAST]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 130, res.output
    assert "interrupted: 3 frame(s)" in _said(res.output) and opened[0].released
    lines = _lines(out / "clip.mp4.jsonl")
    assert [l["frame"] for l in lines] == [0, 1, 2]
    instances = [i for l in lines for i in l["instances"]]
    assert instances and all(i["category"] == "circle" and i["category_id"] == 1 for i in instances)
    s = json.loads((out / "clip.mp4.summary.json").read_text())
    assert (s["ended"], s["frames_read"], s["segmented"], s["discarded"]) == ("interrupted", 3, 3, 0)
    assert s["categories"] == [{"id": 1, "name": "circle"}] and s["head"] == str(head_path)
    again = CliRunner().invoke(app, args)  # an earlier run's results are not overwritten silently
    assert again.exit_code == 1 and "--overwrite" in _said(again.output)


def test_sources_that_cannot_be_opened(fake_cv2, tmp_path, monkeypatch):
    (tmp_path / "notes.mp4").write_text("not a video")
    r = subprocess.run([sys.executable, "-m", "samantic.cli.main", "segment", str(tmp_path / "notes.mp4"),
                        "--out", str(tmp_path / "o"), *FAST], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "cannot open video file" in _said(r.stderr) and "notes.mp4" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    runner = CliRunner()
    res = runner.invoke(app, ["segment", str(tmp_path / "nope.mkv"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "nope.mkv: no such video file" in _said(res.output)
    fake_cv2(ok=False)
    res = runner.invoke(app, ["segment", "--camera", "7", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "cannot open camera 7" in _said(res.output)
    res = runner.invoke(app, ["segment", "rtsp://user:secret@10.0.0.9/live", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "cannot open stream rtsp://user:***@10.0.0.9/live" in _said(res.output)
    assert "secret" not in _said(res.output)
    monkeypatch.setitem(sys.modules, "cv2", None)  # OpenCV not installed
    res = runner.invoke(app, ["segment", "--camera", "0", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "pip install 'samantic[video]'" in _said(res.output)


def test_options_of_the_other_path_and_mixed_inputs_are_refused(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["segment", "a.png", "--out", str(tmp_path), "--overlay-video"])
    assert res.exit_code == 2 and "only for a video file" in _said(res.output)
    res = runner.invoke(app, ["segment", "a.mp4", "b.mp4", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "one per run" in _said(res.output)
    res = runner.invoke(app, ["segment", "a.png", "--camera", "0", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--camera runs alone" in _said(res.output)
    res = runner.invoke(app, ["segment", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--camera INDEX" in _said(res.output)


@pytest.mark.slow
def test_soak_rss_stays_flat(segmenter):
    """500 frames through the stream: resident memory grows <= 5% between frame 100 and frame 500."""
    def rss_kb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

    frames = [_scene(i) for i in range(8)]
    marks = {}
    for g in segmenter.stream(frames[i % 8] for i in range(500)):
        if g.index in (99, 499):
            marks[g.index] = rss_kb()
    assert marks[499] <= 1.05 * marks[99], marks
