"""Images as people have them: 16-bit PNG/TIFF, EXIF orientation, the other pixel modes, and the
permissions of written files.

References are independent of ``read_image``: OpenCV's colour read (the way segment-anything's
scripts load images), ``PIL.ImageOps.exif_transpose`` and numpy transforms of the pixels.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from samantic.io import ImageReadError, atomic_write_bytes, atomic_write_image, atomic_write_json, read_image


def _cv2_rgb(path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _deep(channels: int, seed: int = 0) -> np.ndarray:
    """uint16 pixels over the whole range, low bytes included (a wrong rounding shows up), BGR(A) order."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 65536, (37, 53, channels), dtype=np.uint16)
    a[0, :4, 0] = (0, 255, 256, 65535)  # the edges of the high byte
    return a[..., 0] if channels == 1 else a


# --- 16-bit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 3, 4], ids=["gray", "rgb", "rgba"])
def test_16bit_is_scaled_like_opencv(tmp_path, ext, channels):
    a = _deep(channels)
    path = tmp_path / f"deep{channels}{ext}"
    assert cv2.imwrite(str(path), a)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # really a 16-bit file
    notes = []
    got = read_image(path, notes=notes)
    assert got.dtype == np.uint8 and got.shape == (37, 53, 3)
    high = (a >> 8).astype(np.uint8)  # the high byte of every sample
    expected = np.repeat(high[..., None], 3, axis=2) if channels == 1 else high[..., 2::-1]  # BGR(A) -> RGB
    assert np.array_equal(got, expected)
    reference = _cv2_rgb(path)
    if ext == ".tif" and channels > 1:
        # OpenCV reads 16-bit colour TIFF through libtiff's RGBA reader, which rounds value / 257
        # instead of keeping the high byte: one level apart at most
        assert np.abs(got.astype(int) - reference).max() <= 1
        assert np.array_equal(reference, np.round(a[..., 2::-1] / 257).astype(np.uint8))
    else:
        assert np.array_equal(got, reference)
    assert "16-bit samples scaled to 8 bits" in notes
    assert ("grayscale expanded to RGB" in notes) == (channels == 1)
    assert ("alpha channel dropped" in notes) == (channels == 4)


def test_16bit_big_endian_tiff_and_exif_orientation(tmp_path):
    """Pillow's I;16B (big-endian samples) and a rotated 16-bit PNG come out like the little-endian, upright ones."""
    a = _deep(1, seed=3)
    Image.fromarray(a.astype(">u2")).save(tmp_path / "be.tif")
    assert Image.open(tmp_path / "be.tif").mode == "I;16B"
    assert np.array_equal(read_image(tmp_path / "be.tif")[..., 0], (a >> 8).astype(np.uint8))

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(a).save(tmp_path / "rot.png", exif=exif)
    got = read_image(tmp_path / "rot.png")
    assert got.shape == (53, 37, 3)
    assert np.array_equal(got[..., 0], np.rot90((a >> 8).astype(np.uint8), -1))


def test_deeper_pixels_are_refused_by_name(tmp_path):
    Image.fromarray(np.full((4, 5), 0.5, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ImageReadError, match=r"float\.tif: float32 pixels are not supported"):
        read_image(tmp_path / "float.tif")
    Image.fromarray(np.full((4, 5), 1 << 20, np.int32)).save(tmp_path / "int.tif")
    with pytest.raises(ImageReadError, match=r"int\.tif: int32 pixels are not supported"):
        read_image(tmp_path / "int.tif")


# --- EXIF orientation -----------------------------------------------------------------------------

# what each EXIF orientation asks a viewer to do to the stored pixels, in numpy
ORIENTATIONS = {
    1: lambda x: x,
    2: lambda x: x[:, ::-1],
    3: lambda x: x[::-1, ::-1],
    4: lambda x: x[::-1],
    5: lambda x: x.transpose(1, 0, 2),
    6: lambda x: np.rot90(x, -1),
    7: lambda x: np.rot90(x, 2).transpose(1, 0, 2),
    8: lambda x: np.rot90(x, 1),
}


def _asymmetric() -> np.ndarray:
    """Four coloured quadrants and a white bar in one corner: every flip and rotation looks different."""
    a = np.zeros((48, 64, 3), np.uint8)
    a[:24, :32] = (255, 0, 0)
    a[:24, 32:] = (0, 255, 0)
    a[24:, :32] = (0, 0, 255)
    a[24:, 32:] = (255, 255, 0)
    a[4:10, 4:20] = 255
    return a


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(tmp_path, orientation):
    pixels = _asymmetric()
    paths = {}
    for k in (1, orientation):  # the same JPEG data, only the EXIF tag differs
        exif = Image.Exif()
        exif[0x0112] = k
        paths[k] = tmp_path / f"o{k}.jpg"
        Image.fromarray(pixels).save(paths[k], quality=95, exif=exif)
    upright = read_image(paths[1])
    got = read_image(paths[orientation])
    assert np.array_equal(got, ORIENTATIONS[orientation](upright))
    with Image.open(paths[orientation]) as im:
        assert im.getexif()[0x0112] == orientation
        assert np.array_equal(got, np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
    reference = _cv2_rgb(paths[orientation])  # OpenCV applies EXIF orientation by default too
    assert reference.shape == got.shape
    assert np.abs(reference.astype(int) - got).mean() < 1.0  # JPEG decoders may differ by rounding only
    if orientation in (5, 6, 7, 8):
        assert got.shape == (64, 48, 3)


# --- the other pixel modes ------------------------------------------------------------------------


def test_palette_cmyk_and_gray_alpha_keep_working(tmp_path):
    rgb = _asymmetric()
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.save(tmp_path / "pal.png")
    notes = []
    assert np.array_equal(read_image(tmp_path / "pal.png", notes=notes), np.asarray(pal.convert("RGB")))
    assert notes == []
    pal.save(tmp_path / "pal_t.png", transparency=0)
    notes = []
    assert np.array_equal(read_image(tmp_path / "pal_t.png", notes=notes), np.asarray(pal.convert("RGB")))
    assert notes == ["alpha channel dropped"]

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    notes = []
    got = read_image(tmp_path / "cmyk.jpg", notes=notes)
    assert notes == ["CMYK converted to RGB"]
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert np.array_equal(got, np.asarray(im.convert("RGB")))

    la = np.dstack([rgb[..., 0], np.full(rgb.shape[:2], 7, np.uint8)])
    Image.fromarray(la).save(tmp_path / "la.png")
    notes = []
    got = read_image(tmp_path / "la.png", notes=notes)
    assert np.array_equal(got, np.repeat(rgb[..., :1], 3, axis=2))  # the alpha of 7 is dropped, not composited
    assert notes == ["grayscale expanded to RGB, alpha channel dropped"]


# --- permissions of written files -----------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        written = [
            atomic_write_json(tmp_path / "r.json", {"a": 1}),
            atomic_write_bytes(tmp_path / "b.bin", b"xyz"),
            atomic_write_image(tmp_path / "i.png", np.zeros((2, 3, 3), np.uint8)),
            atomic_write_json(tmp_path / "r.json", {"a": 2}),  # replacing a file: still the umask's mode
        ]
    finally:
        os.umask(old)
    for path in written:
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "i.png", "r.json"]  # no temp files left


# --- as a new user runs it ------------------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_segment_cli_reads_16bit_and_rotated_photos_and_writes_readable_files(tmp_path):
    """The installed ``samantic segment`` on a 16-bit PNG and an EXIF-rotated JPEG, under umask 022."""
    exe = Path(sys.executable).parent / "samantic"
    if not exe.exists():
        pytest.skip("the samantic console script is not installed")
    rgb = np.asarray(Image.open(Path(__file__).resolve().parents[1] / "sdk/samantic/assets/demo/scene_900001.png")
                     .convert("RGB"))
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "deep.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(photos / "rotated.jpg", quality=95, exif=exif)
    out = tmp_path / "out"
    proc = subprocess.run(["sh", "-c", 'umask 022 && exec "$0" "$@"', str(exe), "segment", str(photos),
                           "--out", str(out), "--points-per-side", "4", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "deep.png: 16-bit samples scaled to 8 bits" in " ".join(proc.stderr.split())
    deep = json.loads((out / "deep.png.json").read_text())
    rotated = json.loads((out / "rotated.jpg.json").read_text())
    assert (deep["image"]["height"], deep["image"]["width"]) == rgb.shape[:2]
    assert (rotated["image"]["height"], rotated["image"]["width"]) == rgb.shape[1::-1]  # displayed upright
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written and all(oct(p.stat().st_mode & 0o777) == oct(0o644) for p in written), written
