"""Frame streams (cameras, video files, any iterable of images) through a :class:`~samantic.runtime.Segmenter`.

Example:
    >>> with seg.stream(frames, live=True) as stream:                 # doctest: +SKIP
    ...     for f in stream:
    ...         print(f.index, f.timestamp, len(f.result), f.latency)
    >>> stream.summary.to_dict()                                       # doctest: +SKIP

A reader thread takes frames from the source into a bounded queue; the calling
thread segments them, so the model keeps the thread torch or onnxruntime was
set up on and reading (decoding, network) overlaps with segmenting.

Dropping. A *live* source (a camera, a network stream) runs at its own pace:
blocking it makes the driver's or the network's own buffers fill up and the
frames that do come through get older and older. So for ``live=True`` the reader
never waits: when the queue is full it drops the oldest queued frame
(``drop="oldest"``: the results stay as fresh as the model allows) or the
incoming one (``drop="newest"``). Anything else (a list, a video file) is not
live by default and is never dropped: the reader waits for room, so every frame
is segmented and the results do not depend on the machine's speed.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

import numpy as np

from samantic.pipeline.generator import check_image

DROP_POLICIES = ("oldest", "newest")
# latency percentiles over the most recent frames only, so an endless camera stream does not grow memory
LATENCY_WINDOW = 100_000
# how long closing a stream waits for a reader stuck inside the source (a network read) before leaving it behind
JOIN_TIMEOUT_S = 2.0
_POLL_S = 0.05


@dataclass
class StreamFrame:
    """One segmented frame.

    Attributes:
        index: the frame's 0-based position in the source, dropped frames included
            (a gap in the indices is where frames were dropped).
        timestamp: seconds; the source's own when it yields ``(timestamp, frame)`` pairs,
            else the time the reader took the frame, counted from the start of the stream.
        result: the Segmenter's :class:`~samantic.runtime.Result` (or ``PanopticResult``).
        latency: seconds the Segmenter took on this frame.
        delay: seconds from reading the frame to its result (time queued + ``latency``).
        frame: the frame, uint8 RGB ``[H, W, 3]``.
        dropped: frames dropped so far in this stream.
    """

    index: int
    timestamp: float
    result: Any
    latency: float
    delay: float
    frame: np.ndarray
    dropped: int


@dataclass
class StreamSummary:
    """Counts and speed of a stream so far (final once the stream has ended).

    Attributes:
        frames_read: frames taken from the source.
        segmented: frames segmented.
        dropped: frames dropped by a live stream (``frames_read - segmented`` once it ended normally).
        discarded: frames read but neither segmented nor dropped: queued or in progress when the
            stream was stopped early (closed, interrupted, an error).
        seconds: wall time from the start of the stream to its end (or now).
        fps: ``segmented / seconds``.
        latency_p50_ms, latency_p99_ms: Segmenter time per frame (None before the first result).
        delay_p50_ms, delay_p99_ms: read-to-result time per frame, queueing included.
        ended: ``"running"``, ``"end"`` (the source was exhausted), ``"closed"`` (the consumer
            stopped early), ``"interrupted"`` (KeyboardInterrupt) or ``"error"``.
        live, queue_size, drop: the stream's settings (``drop`` is None for a source that is not live).
    """

    frames_read: int
    segmented: int
    dropped: int
    discarded: int
    seconds: float
    fps: float
    latency_p50_ms: Optional[float]
    latency_p99_ms: Optional[float]
    delay_p50_ms: Optional[float]
    delay_p99_ms: Optional[float]
    ended: str
    live: bool
    queue_size: int
    drop: Optional[str]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class _Item:
    index: int
    timestamp: float
    frame: Any
    t_read: float


@dataclass
class _End:
    error: Optional[BaseException]


class _Reader(threading.Thread):
    """Takes frames from the source into the queue. Holds no reference to the FrameStream, so an
    abandoned stream is garbage-collected (and its generator closed, which stops this thread)."""

    def __init__(self, iterator: Iterator[Any], q: "queue.Queue", live: bool, drop: str, t0: float) -> None:
        super().__init__(name="samantic-stream-reader", daemon=True)
        self.iterator = iterator
        self.queue = q
        self.live = live
        self.drop = drop
        self.t0 = t0
        self.stop = threading.Event()
        self.read = 0
        self.dropped = 0

    def run(self) -> None:
        end = _End(None)
        try:
            while not self.stop.is_set():
                try:
                    item = next(self.iterator)
                except StopIteration:
                    break
                t_read = time.perf_counter()
                if isinstance(item, tuple):
                    if len(item) != 2:
                        raise ValueError(f"frame {self.read}: a tuple must be (timestamp, frame), got {len(item)} items")
                    if isinstance(item[0], (bool, np.bool_)):
                        raise ValueError(f"frame {self.read}: a (timestamp, frame) pair whose first item is a bool "
                                         "looks like OpenCV's cap.read() (ok, frame): yield the frame alone (and stop "
                                         "when ok is False), or (timestamp, frame)")
                    try:
                        timestamp = float(item[0])
                    except (TypeError, ValueError):
                        raise ValueError(f"frame {self.read}: a (timestamp, frame) pair needs a number first, got "
                                         f"{type(item[0]).__name__}") from None
                    frame = item[1]
                else:
                    timestamp, frame = t_read - self.t0, item
                self.read += 1
                self._put(_Item(self.read - 1, timestamp, frame, t_read))
        except BaseException as e:  # the source failed (or raised KeyboardInterrupt): the consumer re-raises it
            end = _End(e)
        finally:
            # the source is closed by the thread that iterates it (a generator cannot be closed from another)
            close = getattr(self.iterator, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass
        self._wait_put(end)

    def _put(self, item: _Item) -> None:
        if not self.live:
            self._wait_put(item)
            return
        while True:
            try:
                self.queue.put_nowait(item)
                return
            except queue.Full:
                if self.drop == "newest":
                    self.dropped += 1
                    return
                try:
                    self.queue.get_nowait()  # the reader is the only producer: this makes room for one
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _wait_put(self, item: Any) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue


class FrameStream:
    """Iterates the segmented frames of a source; see :meth:`Segmenter.stream <samantic.runtime.Segmenter.stream>`.

    Iterating starts the reader thread; the end of the source, an exception (the source's
    or the Segmenter's, re-raised here), ``close()``, leaving a ``with`` block or a
    KeyboardInterrupt stop it again. :attr:`summary` is available at any time.
    """

    def __init__(self, segmenter: Callable[[np.ndarray], Any], frames: Iterable[Any], *, live: bool = False,
                 queue_size: int = 2, drop: str = "oldest") -> None:
        if drop not in DROP_POLICIES:
            raise ValueError(f"drop must be one of {DROP_POLICIES}, got {drop!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {queue_size!r}")
        self._segment = segmenter
        self._iterator = iter(frames)  # here, so that a source that is not iterable fails at once
        self.live = bool(live)
        self.queue_size = queue_size
        self.drop = drop
        self._reader: Optional[_Reader] = None
        self._latencies: "collections.deque[float]" = collections.deque(maxlen=LATENCY_WINDOW)
        self._delays: "collections.deque[float]" = collections.deque(maxlen=LATENCY_WINDOW)
        self._segmented = 0
        self._t0: Optional[float] = None
        self._t_end: Optional[float] = None
        self._ended = "running"
        self._gen = self._run()

    def __iter__(self) -> "FrameStream":
        return self

    def __next__(self) -> StreamFrame:
        return next(self._gen)

    def __enter__(self) -> "FrameStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stops the reader thread and closes the source; the summary keeps what was done."""
        self._gen.close()
        if self._reader is None and self._ended == "running":  # never started: the source is still ours
            self._ended = "closed"
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()

    @property
    def summary(self) -> StreamSummary:
        reader = self._reader
        read = reader.read if reader is not None else 0
        dropped = reader.dropped if reader is not None else 0
        seconds = 0.0
        if self._t0 is not None:
            seconds = (self._t_end if self._t_end is not None else time.perf_counter()) - self._t0
        lat = np.asarray(self._latencies, np.float64) * 1000.0
        dl = np.asarray(self._delays, np.float64) * 1000.0

        def pct(a: np.ndarray, q: float) -> Optional[float]:
            return round(float(np.percentile(a, q)), 3) if len(a) else None

        discarded = read - self._segmented - dropped if self._ended not in ("running", "end") else 0
        return StreamSummary(frames_read=read, segmented=self._segmented, dropped=dropped, discarded=discarded,
                             seconds=round(seconds, 6),
                             fps=round(self._segmented / seconds, 4) if seconds > 0 else 0.0,
                             latency_p50_ms=pct(lat, 50), latency_p99_ms=pct(lat, 99),
                             delay_p50_ms=pct(dl, 50), delay_p99_ms=pct(dl, 99), ended=self._ended,
                             live=self.live, queue_size=self.queue_size, drop=self.drop if self.live else None)

    def _run(self) -> Iterator[StreamFrame]:
        q: "queue.Queue" = queue.Queue(maxsize=self.queue_size)
        self._t0 = time.perf_counter()
        reader = _Reader(self._iterator, q, self.live, self.drop, self._t0)
        self._iterator = None  # the reader owns it now
        self._reader = reader
        reader.start()
        ended = "error"
        try:
            while True:
                # step: the next queued frame (a timeout, so that Ctrl-C is seen while waiting)
                try:
                    item = q.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if isinstance(item, _End):
                    if item.error is not None:
                        ended = "interrupted" if isinstance(item.error, KeyboardInterrupt) else "error"
                        raise item.error
                    ended = "end"
                    return
                # step: segment it in this thread
                try:
                    frame = check_image(item.frame)
                except ValueError as e:
                    raise ValueError(f"frame {item.index}: {e}") from None
                t = time.perf_counter()
                result = self._segment(frame)
                now = time.perf_counter()
                self._latencies.append(now - t)
                self._delays.append(now - item.t_read)
                self._segmented += 1
                yield StreamFrame(item.index, item.timestamp, result, now - t, now - item.t_read, frame, reader.dropped)
        except GeneratorExit:
            ended = "closed"
            raise
        except KeyboardInterrupt:
            ended = "interrupted"
            raise
        finally:
            # step: stop the reader: it notices within _POLL_S unless it is blocked inside the source
            self._ended = ended
            self._t_end = time.perf_counter()
            reader.stop.set()
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
            reader.join(JOIN_TIMEOUT_S)
