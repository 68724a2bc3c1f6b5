"""COCO run-length encoding, compatible with pycocotools (column-major, zeros first)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Union

import numpy as np

from samantic.ops._common import as_numpy, load_C

Rle = Dict[str, Any]
RleLike = Union[Rle, "RleBatch"]


@dataclass(frozen=True)
class RleBatch:
    """Many RLEs of one size as flat arrays (CSR): the form the kernels use.

    Attributes:
        counts: uint32[M], every RLE's run lengths back to back.
        offsets: int64[N + 1], RLE i is ``counts[offsets[i]:offsets[i + 1]]``.
        size: (h, w) of every mask.
    """

    counts: np.ndarray
    offsets: np.ndarray
    size: tuple

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def counts_of(self, i: int) -> np.ndarray:
        return self.counts[self.offsets[i] : self.offsets[i + 1]]

    def to_dicts(self, compressed: bool = False) -> List[Rle]:
        """COCO dicts; ``compressed=True`` gives pycocotools-style ``str`` counts."""
        h, w = self.size
        if compressed:
            strings = load_C().rle_to_strings(self.counts, self.offsets)
            return [{"size": [h, w], "counts": s.decode("ascii")} for s in strings]
        return [{"size": [h, w], "counts": self.counts_of(i).tolist()} for i in range(len(self))]

    def select(self, index: Any) -> "RleBatch":
        """A sub-batch: ``index`` is a boolean mask or integer indices."""
        idx = np.arange(len(self))[_index(index)]
        return RleBatch.pack([self.counts_of(int(i)) for i in idx], self.size)

    @classmethod
    def pack(cls, parts: Sequence[np.ndarray], size: Sequence[int]) -> "RleBatch":
        """Packs per-mask count arrays (all of masks of ``size``) into one batch."""
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        if len(parts):
            offsets[1:] = np.cumsum([len(p) for p in parts])
        counts = np.concatenate(parts).astype(np.uint32, copy=False) if len(parts) else np.zeros(0, dtype=np.uint32)
        return cls(counts, offsets, tuple(int(v) for v in size))

    @classmethod
    def concat(cls, batches: Sequence["RleBatch"]) -> "RleBatch":
        """The masks of several batches of one size, in order."""
        return cls.pack([b.counts_of(i) for b in batches for i in range(len(b))], batches[0].size)

    @classmethod
    def from_dicts(cls, rles: Sequence[Rle], name: str = "rles") -> "RleBatch":
        """Packs COCO dicts (list, str or bytes counts) of one size into a batch."""
        if isinstance(rles, dict):
            rles = [rles]
        parts = []
        size = None
        for i, r in enumerate(rles):
            if not isinstance(r, dict) or "size" not in r or "counts" not in r:
                raise ValueError(f"{name}[{i}] must be a dict with 'size' and 'counts', got {type(r).__name__}")
            s = _size(r["size"], f"{name}[{i}]")
            if size is None:
                size = s
            elif s != size:
                raise ValueError(f"{name} must all have one size; {name}[0] is {list(size)}, {name}[{i}] is {list(s)}")
            parts.append(_counts_array(r["counts"], f"{name}[{i}]"))
        return cls.pack(parts, size if size is not None else (0, 0))


def _index(index: Any) -> np.ndarray:
    """A boolean mask or integer indices as a numpy index (an empty list selects nothing)."""
    idx = as_numpy(index)
    if idx.size == 0 and idx.dtype != bool:
        idx = idx.astype(np.int64)
    return idx


def _size(size: Any, name: str) -> tuple:
    """``[h, w]`` as two ints; a float must hold an integer (``int()`` would truncate 2.5 to 2)."""
    try:
        if isinstance(size, (str, bytes)):
            raise TypeError
        s = tuple(int(v) for v in size)
        if any(isinstance(v, (float, np.floating)) and v != int(v) for v in size):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}['size'] must be [h, w] (two integers), got {size!r:.80}") from None
    if len(s) != 2 or min(s) < 0:
        raise ValueError(f"{name}['size'] must be [h, w] (two integers >= 0), got {size!r:.80}")
    return s


def _counts_array(counts: Any, name: str) -> np.ndarray:
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if isinstance(counts, bytes):
        return load_C().rle_from_string(counts)
    arr = np.asarray(counts)
    if arr.ndim != 1 or (arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0)):
        raise ValueError(f"{name}['counts'] must be non-negative integers or a compressed string, got {counts!r:.80}")
    if arr.size and arr.max() > np.iinfo(np.uint32).max:  # astype would wrap it silently
        raise ValueError(f"{name}['counts'] must be run lengths below 2^32 (COCO RLEs count in uint32), "
                         f"got {arr.max()}")
    return arr.astype(np.uint32)


def _batch(rles: RleLike, name: str = "rles") -> RleBatch:
    return rles if isinstance(rles, RleBatch) else RleBatch.from_dicts(rles, name)


def rle_encode(masks: Any) -> RleBatch:
    """Encodes binary masks.

    Args:
        masks: bool/uint8 ``[N, H, W]`` (or ``[H, W]`` for one mask), numpy or torch.

    Returns:
        An :class:`RleBatch`; ``.to_dicts()`` gives the COCO dicts.
    """
    m = as_numpy(masks)
    if m.ndim == 2:
        m = m[None]
    counts, offsets = load_C().rle_encode(m)
    return RleBatch(counts, offsets, (int(m.shape[1]), int(m.shape[2])))


def rle_decode(rles: RleLike) -> np.ndarray:
    """Decodes RLEs to a uint8 array ``[N, H, W]``."""
    b = _batch(rles)
    return load_C().rle_decode(b.counts, b.offsets, *b.size)


def rle_area(rles: RleLike) -> np.ndarray:
    """Foreground pixel count per RLE, int64 ``[N]``."""
    b = _batch(rles)
    return load_C().rle_area(b.counts, b.offsets, *b.size)


def rle_to_bbox(rles: RleLike) -> np.ndarray:
    """Boxes in pycocotools' XYWH convention (float64 ``[N, 4]``, zeros for empty masks)."""
    b = _batch(rles)
    return load_C().rle_bbox(b.counts, b.offsets, *b.size)


def rle_iou(dt: RleLike, gt: RleLike, iscrowd: Any = None) -> np.ndarray:
    """Mask IoU matrix ``[len(dt), len(gt)]`` (float64), like ``pycocotools.mask.iou``.

    For a crowd ground truth the union is the detection's area alone.
    """
    d, g = _batch(dt, "dt"), _batch(gt, "gt")
    if len(d) and len(g) and d.size != g.size:
        raise ValueError(f"dt and gt masks must have one size, got {list(d.size)} and {list(g.size)}")
    crowd = np.zeros(len(g), dtype=np.uint8) if iscrowd is None else np.asarray(iscrowd).astype(np.uint8)
    size = d.size if len(d) else g.size
    return load_C().rle_iou(d.counts, d.offsets, g.counts, g.offsets, size[0], size[1], crowd)


def rle_merge(rles: RleLike, intersect: bool = False) -> Rle:
    """Union (or intersection) of RLEs of one size, as one uncompressed COCO dict."""
    b = _batch(rles)
    if len(b) == 0:
        raise ValueError("rle_merge needs at least one RLE, got none")
    counts = load_C().rle_merge(b.counts, b.offsets, b.size[0], b.size[1], bool(intersect))
    return {"size": list(b.size), "counts": counts.tolist()}


def rle_compress(rles: RleLike) -> List[Rle]:
    """COCO dicts with compressed ``str`` counts (byte-identical to pycocotools)."""
    return _batch(rles).to_dicts(compressed=True)


def rle_decompress(rles: RleLike) -> List[Rle]:
    """COCO dicts with uncompressed ``list[int]`` counts."""
    return _batch(rles).to_dicts(compressed=False)
