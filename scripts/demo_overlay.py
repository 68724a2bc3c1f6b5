"""README's demo picture: the overlays `make demo` wrote, side by side at one height.

    python scripts/demo_overlay.py [--demo runs/demo] [--out docs/images/demo_overlay.png] [--height 253]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image


def compose(paths: list[Path], height: int, gap: int = 3) -> Image.Image:
    tiles = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        tiles.append(im.resize((round(im.width * height / im.height), height), Image.LANCZOS))
    out = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height), "white")
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + gap
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"))
    ap.add_argument("--out", type=Path, default=Path("docs/images/demo_overlay.png"))
    ap.add_argument("--height", type=int, default=253)
    a = ap.parse_args()
    paths = sorted(a.demo.glob("*.overlay.png"))
    if not paths:
        print(f"no *.overlay.png in {a.demo}: run `make demo` first", file=sys.stderr)
        return 1
    tmp = a.out.with_suffix(".tmp.png")
    compose(paths, a.height).save(tmp, optimize=True)
    tmp.replace(a.out)
    print(f"{a.out}: {len(paths)} overlays")
    return 0


if __name__ == "__main__":
    sys.exit(main())
