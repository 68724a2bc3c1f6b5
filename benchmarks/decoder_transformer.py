"""SAM's two-way transformer: segment-anything's (image repeated per prompt) vs samantic's shared-image one.

Same module, same weights (random, with random biases), same inputs, in one
process, alternating; reports the median of several runs and the ratio, and the
largest output difference. Decoder shapes: sam_nano's (width 128, 4 heads) and
the official checkpoints' (width 256, 8 heads, vit_b/l/h alike), each on its
image-token grid (24x24, 64x64), a batch of 64 single-point prompts (7 tokens
each), as the pipeline runs it.

    python benchmarks/decoder_transformer.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402

# decoder: (width, heads, MLP width, side of the image-token grid)
SHAPES = {"sam_nano": (128, 4, 512, 24), "official (vit_b/l/h)": (256, 8, 2048, 64)}


def main() -> None:
    import torch
    from segment_anything.modeling import TwoWayTransformer

    from samantic.pipeline.transformer import two_way_transformer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, table = [], []
    for name, (width, heads, mlp, side) in SHAPES.items():
        torch.manual_seed(0)
        tr = TwoWayTransformer(depth=2, embedding_dim=width, num_heads=heads, mlp_dim=mlp).eval()
        with torch.no_grad():
            for p in tr.parameters():
                p.add_(0.1 * torch.randn_like(p))
        image, pe = torch.randn(1, width, side, side), torch.randn(1, width, side, side)
        tokens = torch.randn(args.batch, 7, width)
        b = args.batch
        ref_t, new_t = [], []
        with torch.no_grad():
            for _ in range(args.repeats):
                t = time.perf_counter()
                ref = tr(image.repeat(b, 1, 1, 1), pe.repeat(b, 1, 1, 1), tokens)
                ref_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                new = two_way_transformer(tr, image, pe, tokens)
                new_t.append(time.perf_counter() - t)
        diff = max(float((a - c).abs().max()) for a, c in zip(ref, new))
        r, n = statistics.median(ref_t), statistics.median(new_t)
        rows.append({"decoder": name, "reference_s": r, "samantic_s": n, "speedup": r / n, "max_abs_diff": diff})
        table.append([name, f"{r:.3f}", f"{n:.3f}", f"**{r / n:.2f}x**", f"{diff:.1e}"])
        print(f"{name}: reference {r:.3f} s, samantic {n:.3f} s, {r / n:.2f}x, max diff {diff:.1e}", flush=True)
    command = "python benchmarks/decoder_transformer.py " + " ".join(sys.argv[1:])
    write_report(args.out, "decoder_transformer", {"command": command, "machine": machine(), "batch": args.batch,
                                                   "threads": args.threads, "rows": rows}, table,
                 ["decoder", "segment-anything s", "samantic s", "speed-up", "max abs diff"],
                 preamble=f"`{command}`\n\n{args.batch} prompts x 7 tokens; image tokens 24x24 (nano), 64x64 (official); {args.threads} "
                          f"threads, median of {args.repeats}")


if __name__ == "__main__":
    main()
