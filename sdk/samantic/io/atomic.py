"""Atomic file writes: a reader (or an interrupted run) never sees a half-written file."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def _create_temp(path: Path) -> Tuple[int, str]:
    """A new, empty file beside ``path``, opened for writing.

    Unlike ``tempfile.mkstemp`` (mode 0600), the file is created with mode 0666
    less the process umask, so the result has the permissions of any file the
    user creates (0644 under umask 022) and a teammate or web server can read it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Writes ``data`` to a temporary file beside ``path``, fsyncs it and renames it into place.

    The file gets the permissions the umask gives a new file (0644 under umask 022).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_json(path: PathLike, obj: Any, indent: int = None) -> Path:
    """JSON-encodes ``obj`` (numpy scalars and arrays included) and writes it atomically."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, bytes):
            return o.decode("ascii")
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"cannot serialise {type(o).__name__} to JSON")

    return atomic_write_bytes(path, json.dumps(obj, indent=indent, default=default).encode("utf-8"))


def atomic_write_image(path: PathLike, image_rgb: np.ndarray) -> Path:
    """Encodes an RGB (or single-channel) uint8 image by the file's extension (Pillow) and writes it atomically."""
    import io

    from PIL import Image

    path = Path(path)
    img = np.asarray(image_rgb)
    fmt = Image.registered_extensions().get((path.suffix or ".png").lower())
    if fmt is None or img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        raise ValueError(f"cannot encode a {img.dtype} image of shape {img.shape} as {path.suffix!r} for {path}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format=fmt)
    return atomic_write_bytes(path, buf.getvalue())
