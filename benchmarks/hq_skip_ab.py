"""A/B for issue 15's speed target: sam_nano's mask decoder at stride 16 with a stride-8 skip into its upscaling.

sam_nano v7 (conv encoder fused at stride 8) spends about 91% of segment-everything in the mask decoder, whose
two-way transformer works on every image token for every prompt: 48 x 48 = 2,304 tokens at 384 px, four times
v4's 24 x 24, hence 3.0x v4's time per image. HQ-SAM's idea, as a candidate: the transformer runs on the
embedding average-pooled to stride 16 (v4's token count at 384 px), and the stride-8 embedding enters the
upscaling after its first transposed convolution through a zero-initialised 1 x 1 convolution (the
embedding travels packed: [pooled C | pixel-unshuffled stride-8 4C] channels, so the model stays a
segment-anything ``Sam`` that ``SamPredictor`` and the trainer run unchanged). Low-res masks come out at
stride 4 (96 x 96 at 384 px) instead of v7's stride 2.

The candidate starts from the shipped v7 weights (encoder, prompt encoder, decoder; only the skip convolution is
new) and its mask decoder is fine-tuned with the v7 recipe for ``--minutes`` on this CPU; v7 itself is the
reference column (its held-out numbers with the same evaluation). Reported: held-out 1-point / 3-point mIoU
(seeds never trained on) and the transformer's time per prompt on this CPU (samantic's segment-everything path,
``two_way_transformer``) at each token grid.

    python benchmarks/hq_skip_ab.py --minutes 30 --out benchmarks/results/hq_skip_ab
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam
from torch import nn


class PackedSkipEncoder(nn.Module):
    """A stride-8 conv encoder whose output is packed: [stride-16 average pool | pixel-unshuffled stride 8]."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.img_size = base.img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e8 = self.base(x)
        return torch.cat([F.avg_pool2d(e8, 2), F.pixel_unshuffle(e8, 2)], dim=1)


class SkipMaskDecoder(MaskDecoder):
    """segment-anything's ``MaskDecoder`` on a packed embedding: the transformer sees the first ``transformer_dim``
    channels; the rest, pixel-shuffled back to twice the grid, enter the upscaling after its first transposed
    convolution through ``skip_proj`` (zero-initialised: the decoder starts as its base on the pooled tokens)."""

    def __init__(self, base: MaskDecoder, skip_chans: int) -> None:
        super().__init__(transformer_dim=base.transformer_dim, transformer=base.transformer,
                         num_multimask_outputs=base.num_multimask_outputs,
                         iou_head_depth=len(base.iou_prediction_head.layers),
                         iou_head_hidden_dim=base.iou_prediction_head.layers[0].out_features)
        self.load_state_dict(base.state_dict())
        self.skip_proj = nn.Conv2d(skip_chans, base.transformer_dim // 4, 1)
        nn.init.zeros_(self.skip_proj.weight)
        nn.init.zeros_(self.skip_proj.bias)

    def split_embedding(self, packed: torch.Tensor):
        c = self.transformer_dim
        return packed[:, :c], F.pixel_shuffle(packed[:, c:], 2)

    def upscale(self, src: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        ct1, norm, act1, ct2, act2 = self.output_upscaling
        return act2(ct2(act1(norm(ct1(src) + self.skip_proj(skip)))))

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output: bool):
        from samantic.train.sam import decode_prompts

        src = torch.repeat_interleave(image_embeddings, sparse_prompt_embeddings.shape[0], dim=0) \
            if image_embeddings.shape[0] != sparse_prompt_embeddings.shape[0] else image_embeddings
        return decode_prompts(self, src, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                              multimask_output)


def skip_model(v7: Sam) -> Sam:
    """The candidate built around v7's modules (weights copied)."""
    import copy

    v7 = copy.deepcopy(v7)
    side = v7.image_encoder.img_size
    grid = side // 16
    pe = PromptEncoder(embed_dim=v7.prompt_encoder.embed_dim, image_embedding_size=(grid, grid),
                       input_image_size=(side, side), mask_in_chans=v7.prompt_encoder.mask_downscaling[0].out_channels * 4)
    pe.load_state_dict(v7.prompt_encoder.state_dict())
    c = v7.mask_decoder.transformer_dim
    sam = Sam(image_encoder=PackedSkipEncoder(v7.image_encoder), prompt_encoder=pe,
              mask_decoder=SkipMaskDecoder(v7.mask_decoder, c),  # pixel-shuffled: 4c channels -> c at twice the grid
              pixel_mean=v7.pixel_mean.flatten().tolist(), pixel_std=v7.pixel_std.flatten().tolist())
    return sam.eval()


def transformer_ms(model: Sam, grid: int, prompts: int = 16, seconds: float = 3.0) -> float:
    """ms per prompt of samantic's two-way transformer on a grid x grid embedding (segment-everything's path)."""
    from samantic.pipeline.transformer import two_way_transformer

    c = model.mask_decoder.transformer_dim
    emb = torch.randn(1, c, grid, grid)
    pe = model.prompt_encoder.pe_layer((grid, grid)).unsqueeze(0)
    tokens = torch.randn(prompts, 7, c)
    with torch.no_grad():
        for _ in range(2):
            two_way_transformer(model.mask_decoder.transformer, emb, pe, tokens, out_tokens=[0, 1, 2, 3])
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            two_way_transformer(model.mask_decoder.transformer, emb, pe, tokens, out_tokens=[0, 1, 2, 3])
            n += 1
    return 1000 * (time.perf_counter() - t) / n / prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="CPU minutes of fine-tuning (0: evaluate --init as it is)")
    ap.add_argument("--init", type=Path, default=None, help="start from these candidate weights (default: v7 + zero skip)")
    ap.add_argument("--trainable", default="mask_decoder", help="comma-separated parts that train")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--freeze-batchnorm", action="store_true")
    ap.add_argument("--name", default="skip", help="the run's name: NAME.safetensors and a row of result_NAME.json")
    ap.add_argument("--seeds", default="0:100", help="held-out scenes for the point mIoU")
    ap.add_argument("--data", default="shapes:44000000", help="training scenes (seeds >= 1,000,000)")
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True, help="also evaluate v7")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/hq_skip_ab"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from samantic.models import create_model
    from samantic.train.metrics import evaluate_sam
    from samantic.train.sam import SamTrainConfig, SamTrainer, open_dataset

    a, b = (int(v) for v in args.seeds.split(":"))
    v7 = create_model("sam_nano")
    cand = skip_model(v7)
    if args.init is not None:
        cand.load_state_dict(load_file(str(args.init)))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.minutes > 0:
        weights = args.out / f"{args.name}.safetensors"
        cfg = SamTrainConfig(steps=1_000_000, images_per_step=4, masks_per_image=6, iterations=2, lr=args.lr,
                             warmup_steps=50, focal_weight=2.0, focal_alpha=0.5, focal_gamma=0.0,
                             trainable=tuple(args.trainable.split(",")), time_budget=60 * args.minutes,
                             freeze_batchnorm=args.freeze_batchnorm, checkpoint_every=200, log_every=20)
        SamTrainer(cand, cfg, open_dataset(args.data)).train(weights, resume=Path(f"{weights}.ckpt").exists(),
                                                            progress=False)
        cand.load_state_dict(load_file(str(weights)))
    models = [("v7 (shipped)", v7)] if args.reference else []
    models.append((args.name, cand))
    rows = {}
    for name, model in models:
        grid = model.prompt_encoder.image_embedding_size[0]
        t0 = time.perf_counter()
        r = evaluate_sam(model.eval(), range(a, b), amg_seeds=range(0), progress=False)
        rows[name] = {**{k: r.metrics[k] for k in ("miou_1pt_top", "miou_1pt_oracle", "miou_3pt") if k in r.metrics},
                      "eval_s": time.perf_counter() - t0, "tokens": grid * grid,
                      "transformer_ms_per_prompt": transformer_ms(model, grid)}
        print(name, json.dumps(rows[name]), flush=True)
    record = {"command": "python benchmarks/hq_skip_ab.py " + " ".join(__import__("sys").argv[1:]),
              "minutes": args.minutes, "seeds": args.seeds, "rows": rows}
    (args.out / f"result_{args.name}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
