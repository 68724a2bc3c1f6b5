"""Official SAM checkpoints: the weight table, the cache, download with resume, verification.

Standard library only (rich for the progress bar), so that ``samantic weights``
works on an install without torch.

A weight tag names one file of trained weights for one registered model, as
``"<model>.<source>"``, e.g. ``"sam_vit_b.sa1b"``. Every tag carries its URL,
size and SHA-256; nothing is used before its hash has been checked.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

__all__ = [
    "ChecksumError",
    "DownloadError",
    "VerifyResult",
    "WeightSpec",
    "cache_dir",
    "cached_path",
    "download",
    "download_url",
    "file_sha256",
    "get_weight",
    "is_weight_ref",
    "list_weights",
    "register_weight",
    "verify",
    "weights_dir",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "SAMANTIC_CACHE"
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")

PathLike = Union[str, "os.PathLike[str]"]


class DownloadError(RuntimeError):
    """The server refused, failed or the connection broke during a download."""


class ChecksumError(ValueError):
    """A file's size or SHA-256 is not the expected one."""


@dataclass(frozen=True)
class WeightSpec:
    """One downloadable checkpoint.

    Attributes:
        tag: Unique name, ``"<model>.<source>"``.
        model: Registered model name the weights fit (see ``samantic.models.list_models``).
        filename: File name in the cache.
        url: Where to download it from.
        size: Exact size in bytes.
        sha256: Lower-case hex SHA-256 of the whole file.
    """

    tag: str
    model: str
    filename: str
    url: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        if not self.tag.startswith(self.model + "."):
            raise ValueError(f"weight tag must look like '<model>.<source>', got {self.tag!r} for {self.model!r}")
        if not _SHA256_RE.match(self.sha256):
            raise ValueError(f"sha256 must be 64 hex digits, got {self.sha256!r}")
        if self.size <= 0:
            raise ValueError(f"size must be > 0, got {self.size!r}")
        if Path(self.filename).name != self.filename:
            raise ValueError(f"filename must be a bare file name, got {self.filename!r}")
        object.__setattr__(self, "sha256", self.sha256.lower())


_OFFICIAL_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"

# Tags in insertion order; the first tag of a model is its default.
_WEIGHTS: Dict[str, WeightSpec] = {}


def register_weight(spec: WeightSpec) -> WeightSpec:
    """Adds a checkpoint to the weight table.

    Args:
        spec: The checkpoint. The first tag registered for a model becomes the
            model's default tag.

    Returns:
        ``spec``, unchanged.

    Raises:
        ValueError: If the tag is already registered.
    """
    if spec.tag in _WEIGHTS:
        raise ValueError(f"weight tag {spec.tag!r} is already registered")
    _WEIGHTS[spec.tag] = spec
    return spec


for _spec in (
    WeightSpec(
        tag="sam_vit_h.sa1b",
        model="sam_vit_h",
        filename="sam_vit_h_4b8939.pth",
        url=_OFFICIAL_BASE + "sam_vit_h_4b8939.pth",
        size=2564550879,
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    WeightSpec(
        tag="sam_vit_l.sa1b",
        model="sam_vit_l",
        filename="sam_vit_l_0b3195.pth",
        url=_OFFICIAL_BASE + "sam_vit_l_0b3195.pth",
        size=1249524607,
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    WeightSpec(
        tag="sam_vit_b.sa1b",
        model="sam_vit_b",
        filename="sam_vit_b_01ec64.pth",
        url=_OFFICIAL_BASE + "sam_vit_b_01ec64.pth",
        size=375042383,
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
):
    register_weight(_spec)
del _spec


# --------------------------------------------------------------------------- table


def list_weights(model: Optional[str] = None) -> List[WeightSpec]:
    """Returns the weight table, optionally only the tags of one model.

    Args:
        model: A registered model name, e.g. ``"sam_vit_b"``; ``None`` for all.
    """
    return [s for s in _WEIGHTS.values() if model is None or s.model == model]


def get_weight(tag: Union[str, WeightSpec]) -> WeightSpec:
    """Looks up a checkpoint by tag, or by model name for that model's default tag.

    Args:
        tag: ``"sam_vit_b.sa1b"``, or ``"sam_vit_b"`` for its default tag. A
            :class:`WeightSpec` is returned as is.

    Raises:
        ValueError: If nothing matches; close matches and all tags are listed.
    """
    if isinstance(tag, WeightSpec):
        return tag
    if not isinstance(tag, str):
        raise ValueError(f"weight tag must be a str, got {type(tag).__name__}")
    if tag in _WEIGHTS:
        return _WEIGHTS[tag]
    for spec in _WEIGHTS.values():
        if spec.model == tag:
            return spec
    names = list(_WEIGHTS) + sorted({s.model for s in _WEIGHTS.values()})
    close = difflib.get_close_matches(tag, names, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown weight tag {tag!r}.{hint} Known tags: {', '.join(_WEIGHTS)}")


def is_weight_ref(name: str) -> bool:
    """Whether ``name`` is a known tag or a model name that has a default tag."""
    return name in _WEIGHTS or any(s.model == name for s in _WEIGHTS.values())


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Root of samantic's cache.

    ``$SAMANTIC_CACHE`` if set, else ``$XDG_CACHE_HOME/samantic``, else
    ``~/.cache/samantic``. Read on every call, so changing the environment
    takes effect at once. Checkpoints go in its ``weights/`` subfolder.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "samantic"
    return Path.home() / ".cache" / "samantic"


def weights_dir() -> Path:
    """Folder where downloaded checkpoints are cached (``cache_dir() / "weights"``)."""
    return cache_dir() / "weights"


def cached_path(tag: Union[str, WeightSpec], dest_dir: Optional[PathLike] = None) -> Optional[Path]:
    """Path of a checkpoint if it is present with the expected size, else ``None``.

    A cheap check (no hashing): use :func:`verify` for the full one.
    """
    spec = get_weight(tag)
    path = Path(dest_dir if dest_dir is not None else weights_dir()) / spec.filename
    try:
        return path if path.stat().st_size == spec.size else None
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`; true when the file is good.

    Attributes:
        path: The checked file.
        ok: Whether size and hash match what was expected.
        size: Actual size in bytes.
        sha256: Actual SHA-256, or ``None`` if hashing was skipped because the
            size already did not match.
        expected_sha256: Reference hash.
        expected_size: Reference size, if known.
        tag: The weight tag the reference came from, if any.
    """

    path: Path
    ok: bool
    size: int
    sha256: Optional[str]
    expected_sha256: str
    expected_size: Optional[int] = None
    tag: Optional[str] = None

    def __bool__(self) -> bool:
        return self.ok

    @property
    def reason(self) -> str:
        """One line saying why the file is bad (empty when it is good)."""
        if self.expected_size is not None and self.size != self.expected_size:
            return f"size is {self.size} bytes, expected {self.expected_size}"
        if self.sha256 != self.expected_sha256:
            return f"sha256 is {self.sha256}, expected {self.expected_sha256}"
        return ""


def file_sha256(path: PathLike, *, progress: bool = False) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks.

    Raises:
        FileNotFoundError: If the file does not exist.
    """
    return _sha256(Path(path), progress, Path(path).name)


def state_sha256(model: Any) -> str:
    """Hex SHA-256 of a module's parameters and buffers, by name: its weights, however they were loaded.

    Two models with equal state dicts (names, shapes and values) get the same digest, whether
    their weights came from a file, a tag or memory; a SAM-CP head records the digest of the
    SAM whose patches it learned from (see ``SamcpHead.check_weights``).
    """
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _sha256(path: Path, progress: bool, label: str) -> str:
    digest = hashlib.sha256()
    with _progress_bar(progress, f"verify {label}", path.stat().st_size) as advance:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
                advance(len(chunk))
    return digest.hexdigest()


def verify(
    path: PathLike,
    tag_or_sha256: Union[str, WeightSpec, None] = None,
    *,
    progress: bool = False,
) -> VerifyResult:
    """Checks a file's size and full SHA-256.

    Args:
        path: The file.
        tag_or_sha256: A weight tag or model name (size and hash from the
            table), a :class:`WeightSpec`, or a 64-digit hex SHA-256 (hash only).
            ``None`` looks the file name up in the table.
        progress: Show a progress bar while hashing.

    Returns:
        A :class:`VerifyResult`, truthy when the file is good.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If no reference is known for the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    expected_size: Optional[int] = None
    tag: Optional[str] = None
    if isinstance(tag_or_sha256, str) and _SHA256_RE.match(tag_or_sha256):
        expected_sha = tag_or_sha256.lower()
    else:
        if tag_or_sha256 is None:
            spec = _spec_for_filename(path.name)
        else:
            spec = get_weight(tag_or_sha256)
        expected_sha, expected_size, tag = spec.sha256, spec.size, spec.tag
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        # A wrong size already decides it; don't hash gigabytes for nothing.
        return VerifyResult(path, False, size, None, expected_sha, expected_size, tag)
    actual = file_sha256(path, progress=progress)
    return VerifyResult(path, actual == expected_sha, size, actual, expected_sha, expected_size, tag)


def _spec_for_filename(name: str) -> WeightSpec:
    for spec in _WEIGHTS.values():
        if spec.filename == name:
            return spec
    raise ValueError(
        f"no reference hash known for a file named {name!r}: pass a weight tag or a sha256. "
        f"Known files: {', '.join(s.filename for s in _WEIGHTS.values())}"
    )


# --------------------------------------------------------------------------- download


def download(
    tag_or_spec: Union[str, WeightSpec],
    dest_dir: Optional[PathLike] = None,
    progress: bool = True,
) -> Path:
    """Downloads a checkpoint into the cache (or ``dest_dir``) and verifies it.

    A file already present that verifies is returned without any network access.

    Args:
        tag_or_spec: A weight tag, a model name (its default tag) or a :class:`WeightSpec`.
        dest_dir: Target folder; default :func:`weights_dir`.
        progress: Show a progress bar (only when stderr is a terminal).

    Returns:
        Path of the verified file.

    Raises:
        ValueError: Unknown tag.
        DownloadError: HTTP error or broken connection (a partial file is kept
            for resuming).
        ChecksumError: The downloaded file is not the expected one (it is deleted).
    """
    spec = get_weight(tag_or_spec)
    folder = Path(dest_dir) if dest_dir is not None else weights_dir()
    return download_url(spec.url, folder / spec.filename, sha256=spec.sha256, size=spec.size, progress=progress)


def download_url(
    url: str,
    dest: PathLike,
    *,
    sha256: str,
    size: Optional[int] = None,
    progress: bool = True,
) -> Path:
    """Downloads ``url`` to ``dest`` with resume and full SHA-256 verification.

    Bytes go to ``dest + ".part"``; an existing ``.part`` is resumed with an
    HTTP Range request (restarted from zero if the server ignores the range).
    Only a file whose size and hash match is renamed, atomically, to ``dest``.
    A ``dest + ".lock"`` file serializes concurrent downloads of the same file.

    Args:
        url: http(s) URL.
        dest: Final path of the file.
        sha256: Expected hex SHA-256 of the whole file.
        size: Expected size in bytes, if known; checked before and after.
        progress: Show a progress bar (only when stderr is a terminal).

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        DownloadError: HTTP error status, unreachable server, or a connection
            that broke mid-way (the ``.part`` file is kept; call again to resume).
        ChecksumError: Size or hash mismatch; the bad file is deleted.
    """
    if not _SHA256_RE.match(sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    sha256 = sha256.lower()
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)

    with _file_lock(dest.with_name(dest.name + ".lock")):
        # step: a good file is already there -> no network at all
        if dest.is_file():
            if _matches(dest, sha256, size):
                return dest
            logger.warning("%s does not match its expected hash; downloading it again", dest)
            dest.unlink()

        # step: fetch (resuming a .part if there is one), unless the .part is already whole
        if not (size is not None and part.is_file() and part.stat().st_size == size):
            _fetch(url, part, size, progress)

        # step: full verification, then the atomic rename
        got_size = part.stat().st_size
        if size is not None and got_size != size:
            part.unlink()
            raise ChecksumError(f"download of {url} has {got_size} bytes, expected {size}; the file was deleted")
        got = _sha256(part, progress, dest.name)
        if got != sha256:
            part.unlink()
            raise ChecksumError(
                f"sha256 mismatch for {url}: expected {sha256}, got {got}; the file was deleted"
            )
        os.replace(part, dest)
    return dest


def _matches(path: Path, sha256: str, size: Optional[int]) -> bool:
    if size is not None and path.stat().st_size != size:
        return False
    return file_sha256(path) == sha256


def _fetch(url: str, part: Path, size: Optional[int], progress: bool) -> None:
    """Appends the rest of ``url`` to ``part``; restarts once from zero if resuming is impossible."""
    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset > size:
        offset = 0
    for _ in range(2):
        resumed = offset > 0
        request = urllib.request.Request(url, headers={"User-Agent": "samantic"})
        if resumed:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and resumed:
                # The server has nothing past our offset: the .part is stale or
                # oversized. Start over rather than guess.
                logger.info("server refused to resume %s (416); restarting from zero", url)
                offset = 0
                continue
            raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise DownloadError(f"cannot reach {url}: {reason}") from None

        with response:
            status = response.status
            start = _range_start(response.headers.get("Content-Range")) if status == 206 else 0
            if status == 206 and start != offset:
                logger.info("server resumed %s at byte %s instead of %s; restarting", url, start, offset)
                offset = 0
                continue
            if status not in (200, 206):
                raise DownloadError(f"download of {url} failed: unexpected HTTP {status}")
            if status == 200:
                # A plain 200 carries the whole file, whatever we asked for.
                offset = 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None and length.isdigit() else size
            if size is not None and total is not None and total != size:
                raise DownloadError(
                    f"server announces {total} bytes for {url}, expected {size}; not downloading"
                )
            _stream(response, url, part, offset, total, progress)
            return
    raise DownloadError(f"could not resume or restart the download of {url}")


def _range_start(content_range: Optional[str]) -> Optional[int]:
    match = re.match(r"bytes\s+(\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _stream(response, url: str, part: Path, offset: int, total: Optional[int], progress: bool) -> None:
    written = offset
    with open(part, "ab" if offset else "wb") as f, _progress_bar(
        progress, f"download {part.name[: -len('.part')]}", total, offset
    ) as advance:
        if offset:
            f.truncate(offset)
        while total is None or written <= total:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as e:
                # Only network errors land here: disk errors come from f.write below.
                raise DownloadError(
                    f"download of {url} was interrupted after {written} bytes ({e.__class__.__name__}); "
                    f"the partial file {part} was kept: call again to resume"
                ) from None
            if not chunk:
                break
            f.write(chunk)
            written += len(chunk)
            advance(len(chunk))
    if total is not None and written < total:
        raise DownloadError(
            f"download of {url} was interrupted after {written} of {total} bytes; "
            f"the partial file {part} was kept: call again to resume"
        )


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: Optional[int], completed: int = 0) -> Iterator:
    if not (enabled and sys.stderr.isatty()):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total, completed=completed)
        yield lambda n: bar.advance(task, n)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serializes downloads of one file across processes (POSIX; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
