"""Image reading errors and atomic writes."""

import json
import os

import cv2
import numpy as np
import pytest

from samantic.io import ImageReadError, atomic_write_bytes, atomic_write_image, atomic_write_json, read_image
from samantic.io.signals import HeldSignals


def test_read_image_formats(tmp_path):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0] = 200  # red
    cv2.imwrite(str(tmp_path / "rgb.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    got = read_image(tmp_path / "rgb.png")
    assert got.shape == (5, 7, 3) and got.dtype == np.uint8
    assert (got[..., 0] == 200).all() and (got[..., 2] == 0).all()  # channels come back as RGB

    cv2.imwrite(str(tmp_path / "gray.png"), np.full((4, 6), 77, np.uint8))
    assert read_image(tmp_path / "gray.png").shape == (4, 6, 3)

    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., 2] = 255
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    got = read_image(tmp_path / "rgba.png")
    assert got.shape == (3, 3, 3) and (got[..., 0] == 255).all()


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("empty.png", b"", "0 bytes"),
        ("text.jpg", b"hello", "not a readable image"),
    ],
)
def test_read_image_bad_files(tmp_path, name, content, reason):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as e:
        read_image(p)
    assert name in str(e.value)


def test_read_image_missing_truncated_and_16bit(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "trunc.jpg").write_bytes(buf.tobytes()[:40])
    with pytest.raises(ImageReadError, match="trunc.jpg"):
        read_image(tmp_path / "trunc.jpg")
    # 16-bit is read, scaled to 8 bits as OpenCV's colour read does (more in test_images_formats.py)
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((4, 4), 40000, np.uint16))
    assert (read_image(tmp_path / "deep.png") == 40000 >> 8).all()


def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"xyz")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"xyz"
    atomic_write_json(tmp_path / "r.json", {"v": np.float32(0.5), "a": np.arange(3)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"v": 0.5, "a": [0, 1, 2]}
    atomic_write_image(tmp_path / "i.png", np.zeros((2, 3, 3), np.uint8))
    assert cv2.imread(str(tmp_path / "i.png")).shape == (2, 3, 3)
    assert sorted(os.listdir(tmp_path)) == ["a", "i.png", "r.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no pixel data (what a decompression bomb looks like)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(12000, 9000), (40000, 40000)])  # over our limit; over Pillow's own bomb limit too
def test_read_image_refuses_huge_headers_before_decoding(tmp_path, size):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(*size))
    with pytest.raises(ImageReadError, match=r"bomb\.png: .*(limit|too large)"):
        read_image(p)
    # the same header under a raised limit is decoded, and then found to have no pixel data
    if size[0] * size[1] < 200_000_000:
        with pytest.raises(ImageReadError, match="bomb.png: not a readable image"):
            read_image(p, max_pixels=size[0] * size[1])


def test_overlay_of_no_masks_is_the_image():
    """An image where nothing was kept still gets its overlay file (the image itself), not a crash."""
    from samantic.io import overlay_masks

    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = overlay_masks(image, np.zeros((0, 20, 30), bool))
    assert np.array_equal(out, image) and out is not image


def test_read_image_refuses_pipes_and_sockets_without_blocking(tmp_path):
    import os
    import socket

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    with pytest.raises(ImageReadError, match="pipe.png: not a regular file"):
        read_image(fifo)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s.png"))
        with pytest.raises(ImageReadError, match="s.png: not a regular file"):
            read_image(tmp_path / "s.png")
    finally:
        sock.close()


def test_read_image_turns_os_errors_into_image_read_errors(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(b"x")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_bytes", denied)
    with pytest.raises(ImageReadError, match="a.png: cannot be read \\(Permission denied\\)"):
        read_image(path)


def test_overlay_of_a_segment_map_is_the_overlay_of_its_masks():
    from samantic.io.visualize import overlay_masks, overlay_segments

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    seg = np.zeros((40, 50), np.int32)
    seg[5:20, 5:30] = 7
    seg[10:15, 10:15] = 3  # inside 7: drawn after the larger segment
    seg[25:38, 20:48] = 12
    ids, labels = [12, 3, 7], ["floor", "cup", "table"]
    stacked = np.stack([seg == i for i in ids])
    assert np.array_equal(overlay_segments(image, seg, ids, labels), overlay_masks(image, stacked, labels))
    assert np.array_equal(overlay_segments(image, seg, ids), overlay_masks(image, stacked))
    assert np.array_equal(overlay_segments(image, seg, []), image)
    with pytest.raises(ValueError, match="segment_map"):
        overlay_segments(image, seg[:10], ids)


def test_labels_sit_inside_their_own_segment_away_from_edges():
    """Two stuff-like regions that both touch the image's top-left corner: each label is anchored deep inside its
    own segment (a box corner would put both names at (0, 0), one over the other)."""
    from samantic.io.visualize import label_anchor

    top = np.zeros((60, 80), bool)
    top[:30, :] = True                 # a band along the top edge
    left = np.zeros((60, 80), bool)
    left[30:, :40] = True              # a block along the left edge, below it
    ring = np.zeros((60, 80), bool)
    ring[35:58, 45:78] = True
    ring[40:53, 50:73] = False         # a frame: its anchor lies on the frame, not in the hole
    anchors = [label_anchor(m) for m in (top, left, ring)]
    for m, (x, y) in zip((top, left, ring), anchors):
        assert m[y, x]
    assert len(set(anchors)) == 3
    assert anchors[0][1] in (14, 15)  # the band's middle row
    assert 10 <= anchors[1][0] <= 30 and 40 <= anchors[1][1] <= 50  # away from both image edges
    assert label_anchor(np.zeros((5, 5), bool)) is None
    # a large image (reduced to blocks): random blobs and a one-pixel line still get a point of their own
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:700, :1000]
    for _ in range(20):
        cy, cx, r = rng.integers(0, 700), rng.integers(0, 1000), rng.integers(3, 300)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        x, y = label_anchor(blob)
        assert blob[y, x]
        if r > 60 and 100 < cx < 900 and 100 < cy < 600:  # a disc well inside the image: near its centre
            assert abs(x - cx) + abs(y - cy) <= 0.3 * r
    line = np.zeros((700, 1000), bool)
    line[350, 100:900] = True
    x, y = label_anchor(line)
    assert line[y, x] and 400 <= x <= 600


def test_overlay_labels_of_regions_sharing_a_corner_do_not_overlap():
    """The drawn overlay: labels of two regions touching the same image corner land apart, each in its region."""
    from samantic.io.visualize import overlay_masks

    image = np.full((120, 160, 3), 128, np.uint8)
    masks = np.zeros((2, 120, 160), bool)
    masks[0, :60] = True
    masks[1, 60:, :80] = True
    plain = overlay_masks(image, masks)
    labelled = overlay_masks(image, masks, labels=["wall", "floor"])
    ys, xs = np.nonzero(np.any(plain != labelled, axis=2))  # where text was drawn
    assert len(ys)
    assert (ys < 60).any() and (ys >= 60).any()  # one label in each region
    assert xs[ys >= 60].max() < 80  # the lower label inside its block (x < 80), not across into the grey
    assert ys.min() > 0 and xs.min() > 0  # neither at the image's corner


def test_held_signals_delivers_ctrl_c_after_the_writes_to_the_handler_before():
    """Ctrl-C inside the held block waits for its end; then it is what it was before (KeyboardInterrupt, or ignored)."""
    import signal

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job (CI)
    done = []
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's Ctrl-C handler
        with pytest.raises(KeyboardInterrupt):
            with HeldSignals():
                signal.raise_signal(signal.SIGINT)
                done.append("written")  # not interrupted here
        assert done == ["written"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with HeldSignals():  # nothing held: nothing delivered, the handler put back
            done.append("quiet")
        assert done == ["written", "quiet"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with HeldSignals():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # ignored before: ignored after
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


def test_held_signals_lets_an_error_of_the_block_through():
    """A write that fails while a Ctrl-C is held: the caller sees the write's error, not a KeyboardInterrupt."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(OSError, match="disk full"):
            with HeldSignals():
                signal.raise_signal(signal.SIGINT)
                raise OSError("disk full")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


def test_held_signals_leaves_a_handler_from_outside_python_alone(monkeypatch):
    """getsignal() None: the handler was installed outside Python and could not be put back, so nothing is held."""
    import signal

    calls = []
    monkeypatch.setattr(signal, "getsignal", lambda sig: None)
    monkeypatch.setattr(signal, "signal", lambda *a: calls.append(a))
    with HeldSignals():
        pass
    assert calls == []


def test_held_signals_holds_each_signal_named_and_delivers_each_once():
    """SIGINT and SIGTERM held over a step; two SIGTERMs delivered as one, each to the handler it had before."""
    import signal

    got = []
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, lambda n, f: got.append("int"))
        signal.signal(signal.SIGTERM, lambda n, f: got.append("term"))
        with HeldSignals("SIGINT", "SIGTERM"):
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
            assert got == []  # nothing delivered inside
        assert got == ["term", "int"]
    finally:
        for s, h in before.items():
            if h is not None:
                signal.signal(s, h)
    with pytest.raises(ValueError, match="SIGNOPE"):
        HeldSignals("SIGNOPE")
