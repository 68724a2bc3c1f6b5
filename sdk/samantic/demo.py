"""The embedded default run by ``make demo``: segment-everything with sam_nano on bundled scenes.

The scenes in ``assets/demo/`` were rendered by the shapes-world generator from
held-out seeds (:data:`DEMO_SEEDS`, never used in training; see
:func:`render_demo_scenes`). The demo runs the same code path as
``samantic segment`` (resumable, atomic writes, bad files reported) with the
shipped ``sam_nano`` weights and writes, per scene, ``NAME.json`` (COCO results
with RLE masks) and ``NAME.overlay.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

DEMO_DIR = Path(__file__).parent / "assets" / "demo"
DEMO_SEEDS = (900001, 900004, 900008)
DEMO_SIZE = (384, 512)
DEMO_MODEL = "sam_nano"
# No threshold flags: `samantic segment` uses sam_nano's calibrated thresholds (its registry entry; model card).
DEMO_THRESHOLDS: tuple = ()


def demo_images() -> List[Path]:
    """The bundled demo scenes."""
    return [DEMO_DIR / f"scene_{s}.png" for s in DEMO_SEEDS]


def render_demo_scenes(out_dir: Path = DEMO_DIR, seeds: Sequence[int] = DEMO_SEEDS) -> List[Path]:
    """Re-renders the demo scenes (how the bundled PNGs were made)."""
    from samantic.io import atomic_write_image
    from samantic.train.data.shapes import render_scene

    return [atomic_write_image(Path(out_dir) / f"scene_{s}.png", render_scene(s, size=DEMO_SIZE).image) for s in seeds]


def segment_args(out: Path, images: Optional[Sequence[Path]] = None, checkpoint: Optional[str] = None) -> List[str]:
    """The ``samantic segment`` command line the demo runs."""
    args = ["segment", *[str(p) for p in (images or demo_images())], "--out", str(out), "--model", DEMO_MODEL,
            *DEMO_THRESHOLDS, "--overwrite"]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    return args
