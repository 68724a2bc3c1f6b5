"""Shared helpers of the atheris harnesses in fuzz/ (see fuzz/README.md).

A harness gets structured inputs from ``atheris.FuzzedDataProvider`` and calls
the public ``samantic.ops`` wrappers (and ``samantic._C`` where a wrapper
does not reach). Its rules:

* A documented input error is fine: ``ValueError``, ``TypeError`` or
  ``IndexError`` with a message (``call`` returns it).
* Anything else is a finding: a crash (segfault, abort, sanitizer report), an
  uncaught exception of another type (``SystemError``, ``OverflowError``,
  ``MemoryError``, ``RuntimeError`` ...), an empty or "internal" error message,
  an invalid input that is silently accepted, or a result that disagrees with
  a cheap oracle (pycocotools, a dense numpy reference, a round trip). A
  finding raises ``Finding`` (an uncaught exception: libFuzzer stops and
  writes the input to ``-artifact_prefix``).

``SAMANTIC_C_PATH`` (fuzz/c_override.py) makes the harnesses load another build
of ``samantic._C``, e.g. the ASan/UBSan one of fuzz/asan_build.sh.
"""

from __future__ import annotations

import gc
import math
import os
import random
import sys
import types
import warnings
from typing import Any, Callable, List, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import c_override  # noqa: E402

c_override.from_env()

import atheris  # noqa: E402
import numpy as np  # noqa: E402

import samantic.ops  # noqa: F401,E402
from samantic import _C  # noqa: E402

# numpy's overflow / invalid-value warnings on the harnesses' own arithmetic with NaN and inf
warnings.filterwarnings("ignore", category=RuntimeWarning)

ACCEPTED = (ValueError, TypeError, IndexError)

U32_MAX = 2**32 - 1

# Values that sit on some boundary of a 32/64-bit integer or of a float.
EDGE_INTS = [0, 1, -1, 2, 3, 7, 255, 256, 2**15, 2**31 - 1, 2**31, -(2**31), 2**32 - 1, 2**32, 2**32 + 1, 2**62,
             2**63 - 1, -(2**63), 2**63, 2**64 - 1, 2**64]
EDGE_FLOATS = [0.0, -0.0, 0.5, 1.0, -1.0, 1e-45, -1e-45, 1e-30, 3.4e38, -3.4e38, 3.5e38, 1e300, -1e300, 2.0**31,
               2.0**63, math.nan, math.inf, -math.inf]


class Finding(AssertionError):
    """A bug: raised, it reaches libFuzzer as an uncaught exception."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise Finding(msg)


def call(fn: Callable, *args, **kw) -> Tuple[bool, Any]:
    """``(True, result)``, or ``(False, exception)`` for an accepted error with a real message.

    Every other exception propagates (a finding)."""
    try:
        return True, fn(*args, **kw)
    except ACCEPTED as e:
        msg = str(e)
        check(bool(msg.strip()), f"{type(e).__name__} without a message from {getattr(fn, '__name__', fn)}")
        check("internal" not in msg.lower(), f"internal error reached the user: {msg}")
        return False, e


def must_reject(what: str, fn: Callable, *args, **kw) -> None:
    """``fn`` must raise an accepted error: ``what`` describes why the input is invalid."""
    ok, res = call(fn, *args, **kw)
    check(not ok, f"invalid input accepted ({what}); got {res!r:.300}")


# --------------------------------------------------------------------------- consuming values


def small_int(fdp, lo: int, hi: int) -> int:
    return fdp.ConsumeIntInRange(lo, hi)


def wild_int(fdp, lo: int = -4, hi: int = 64) -> int:
    """Mostly small (in [lo, hi]), sometimes a boundary value of 32/64-bit integers."""
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return fdp.PickValueInList(EDGE_INTS) * (1 if fdp.ConsumeBool() else -1)
    return fdp.ConsumeIntInRange(lo, hi)


def wild_float(fdp, lo: float = -8.0, hi: float = 8.0) -> float:
    k = fdp.ConsumeIntInRange(0, 7)
    if k == 0:
        return fdp.PickValueInList(EDGE_FLOATS)
    if k == 1:
        return fdp.ConsumeFloat()
    if k == 2:  # a small integer: exact ties with thresholds
        return float(fdp.ConsumeIntInRange(-4, 4))
    return fdp.ConsumeFloatInRange(lo, hi)


def bits(fdp, n: int) -> np.ndarray:
    """``n`` booleans (packed 8 per input byte; zeros once the input is used up)."""
    raw = fdp.ConsumeBytes((n + 7) // 8)
    raw += b"\0" * ((n + 7) // 8 - len(raw))
    return np.unpackbits(np.frombuffer(raw, np.uint8))[:n].astype(bool)


def random_masks(fdp, n_max: int = 4, side_max: int = 12, allow_empty_size: bool = True) -> np.ndarray:
    """bool ``[N, H, W]``: noise, blocks, empty or full masks."""
    lo = 0 if allow_empty_size else 1
    n = fdp.ConsumeIntInRange(0, n_max)
    h = fdp.ConsumeIntInRange(lo, side_max)
    w = fdp.ConsumeIntInRange(lo, side_max)
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        kind = fdp.ConsumeIntInRange(0, 4)
        if kind == 0:
            out[i] = bits(fdp, h * w).reshape(h, w)
        elif kind == 1 and h and w:
            y0, x0 = fdp.ConsumeIntInRange(0, h - 1), fdp.ConsumeIntInRange(0, w - 1)
            y1, x1 = fdp.ConsumeIntInRange(y0, h), fdp.ConsumeIntInRange(x0, w)
            out[i, y0:y1, x0:x1] = True
        elif kind == 2:
            out[i] = True
        elif kind == 3 and h and w:  # sparse points
            for _ in range(fdp.ConsumeIntInRange(0, 4)):
                out[i, fdp.ConsumeIntInRange(0, h - 1), fdp.ConsumeIntInRange(0, w - 1)] = True
    return out


def split_total(fdp, total: int, max_runs: int = 12, zeros: bool = True) -> List[int]:
    """Run lengths that sum to ``total`` (some zero-length when ``zeros``): a valid, maybe
    non-canonical, COCO counts list."""
    counts = []
    left = total
    for _ in range(fdp.ConsumeIntInRange(0, max_runs)):
        if left == 0 and not zeros:
            break
        c = fdp.ConsumeIntInRange(0 if zeros else 1, max(left, 0 if zeros else 1)) if left else 0
        c = min(c, left)
        counts.append(c)
        left -= c
    counts.append(left)
    return counts


# --------------------------------------------------------------------------- references


def dense_from_counts(counts: Sequence[int], h: int, w: int) -> np.ndarray:
    """A valid COCO counts list (sum h * w) as a bool ``[H, W]`` mask (column-major runs)."""
    flat = np.zeros(h * w, bool)
    pos = 0
    for j, c in enumerate(counts):
        if j % 2:
            flat[pos:pos + c] = True
        pos += c
    return flat.reshape(w, h).T


def canonical_counts(mask: np.ndarray) -> List[int]:
    """pycocotools' canonical counts of a bool ``[H, W]`` mask."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    counts, cur, run = [], False, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            run, cur = 0, v
        run += 1
    counts.append(run)
    return counts


def xyxy_box(mask: np.ndarray) -> List[int]:
    """XYXY with inclusive max (batched_mask_to_box), zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def xywh_box(mask: np.ndarray) -> List[float]:
    """pycocotools' toBbox convention of a bool ``[H, W]`` mask: [x, y, w, h], zeros when empty."""
    x0, y0, x1, y1 = xyxy_box(mask)
    return [0.0] * 4 if not np.asarray(mask).any() else [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def is_canonical(counts: Sequence[int]) -> bool:
    """No empty run after the first: pycocotools' toBbox is only right for these (an empty run of
    ones gives it a box for an empty mask, [1, 0, 1] of size 2x1 even a height of 2^32 - 1)."""
    return all(c > 0 for c in counts[1:])


def coco():
    from pycocotools import mask

    return mask


def coco_encode(masks: np.ndarray) -> list:
    """pycocotools.mask.encode of bool ``[N, H, W]`` (which wants Fortran-order H x W x N uint8)."""
    return coco().encode(np.asfortranarray(np.asarray(masks, np.uint8).transpose(1, 2, 0)))


# --------------------------------------------------------------------------- seeds and main


def seed_inputs(n: int = 24, seed: int = 0) -> List[bytes]:
    """Deterministic seed inputs: random bytes of several lengths and a few flat patterns."""
    rng = random.Random(seed)
    out = [b"", b"\0" * 64, b"\xff" * 64, bytes(range(256))]
    for i in range(n):
        out.append(bytes(rng.getrandbits(8) for _ in range(rng.choice([8, 32, 128, 512, 2048]))))
    return out


INSTRUMENTED = ("samantic", "common", "__main__", "fuzz_")


def instrument() -> int:
    """Python coverage for libFuzzer: atheris instrumentation of every loaded function of
    samantic and of the harness. atheris.instrument_imports() does not work here (samantic's
    editable install imports through its own loader) and instrument_all() takes 20 s (numpy,
    pycocotools, ...). The C++ of samantic._C is not instrumented: that needs clang's
    -fsanitize=fuzzer-no-link (fuzz/README.md)."""
    funcs = [f for f in gc.get_objects()
             if isinstance(f, types.FunctionType) and (getattr(f, "__module__", None) or "").startswith(INSTRUMENTED)]
    for f in funcs:
        atheris.instrument_func(f)
    return len(funcs)


def main(test_one_input: Callable[[bytes], None], seeds: Callable[[], List[bytes]]) -> None:
    """``--write-seeds DIR`` writes the seed corpus; otherwise libFuzzer's command line (atheris)."""
    argv = list(sys.argv)
    if len(argv) >= 3 and argv[1] == "--write-seeds":
        os.makedirs(argv[2], exist_ok=True)
        for i, data in enumerate(seeds()):
            with open(os.path.join(argv[2], f"seed-{i:03d}"), "wb") as f:
                f.write(data)
        return
    sys.stderr.write(f"INFO: samantic._C is {_C.__file__}\n")
    instrument()
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
