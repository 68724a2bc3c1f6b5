"""SUM's mask-refinement module and the uncertainty map it gives: U = |pseudo-label p - refined p|.

The authors' refinement module is not released; this one is ours. It is a small
U-Net that sees, in the decoder's low-res frame (``L x L``, the padded input
frame / 4: 192 x 192 for sam_nano):

* the image, normalised as SAM's encoder input and area-averaged to ``L``;
* SAM's mask logits (clamped) and their probabilities;
* SAM's image embedding (``[C, L / 4, L / 4]``, computed anyway), projected at its own scale,

and outputs refined logits as a residual on the clamped SAM logits, scaled to the clamp (the
last layer starts at zero, so an untrained refiner returns SAM's mask). It is trained on the
labelled set only: SAM (frozen) is prompted with a point inside a labelled mask
(three outputs), a jittered box of it (one output) or a point anywhere in the image,
as segment-everything's grid does (three outputs); each output is paired with the
labelled mask it overlaps most (a box output with its own mask), if that overlap
reaches ``min_match`` IoU, and the refiner learns to turn the output into that mask
(cross-entropy + dice in the valid part of the frame).

On the pool, :class:`UncertaintyEstimator` refines every pseudo-label and returns
``U = |sigmoid(l_sam) - sigmoid(l_refined)|`` at image size, both logits upscaled
as SAM upscales its masks. :func:`evaluate_uncertainty` measures how well U finds the
pixels where a pseudo-label is wrong (against :class:`~samantic.train.sum.PoolGroundTruth`,
the pool's evaluation accessor, read here and nowhere in training), next to the
pseudo-label's own confidence ``1 - |2p - 1|``; :func:`uncertainty_benchmark` runs the
whole chain (``benchmarks/sum_uncertainty.py``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from samantic.train.sum import (LABELLED_SEED, POOL_SEED, PoolGroundTruth, PseudoLabelCache, PseudoLabels,
                                UnlabelledPool, progress_bar, upscale_logits)

__all__ = [
    "BinnedAuroc",
    "MaskRefiner",
    "RefinerConfig",
    "RefinerExamples",
    "SamView",
    "UncertaintyEstimator",
    "auroc",
    "evaluate_uncertainty",
    "load_refiner",
    "refiner_examples",
    "sam_view",
    "save_refiner",
    "train_refiner",
    "uncertainty_benchmark",
]

PathLike = Union[str, Path]


# ---------------------------------------------------------------- the module


@dataclass(frozen=True)
class RefinerConfig:
    """Architecture of :class:`MaskRefiner`.

    Attributes:
        embed_dim: channels of SAM's image embedding (128 for sam_nano, 256 for SAM).
        widths: channels at ``L``, ``L / 2`` and ``L / 4``.
        logit_clamp: SAM's logits are clamped to +-this before they enter (and before the residual).
    """

    embed_dim: int = 128
    widths: Tuple[int, int, int] = (8, 16, 32)
    logit_clamp: float = 8.0

    def __post_init__(self) -> None:
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {self.widths!r}")
        if self.embed_dim < 1 or self.logit_clamp <= 0:
            raise ValueError(f"embed_dim and logit_clamp must be positive, got {self.embed_dim}, {self.logit_clamp}")


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(max(1, cout // 8), cout),
        nn.ReLU(inplace=True),
    )


class MaskRefiner(nn.Module):
    """Refines SAM's low-res mask logits given the image and SAM's image embedding.

    Args:
        config: a :class:`RefinerConfig`.
    """

    def __init__(self, config: RefinerConfig = RefinerConfig()) -> None:
        super().__init__()
        self.config = config
        w0, w1, w2 = config.widths
        self.enc0 = _conv(5, w0)
        self.enc1 = nn.Sequential(_conv(w0, w1, stride=2), _conv(w1, w1))
        self.enc2 = _conv(w1, w2, stride=2)
        self.embed = nn.Sequential(nn.Conv2d(config.embed_dim, w2, 1), nn.GroupNorm(max(1, w2 // 8), w2),
                                   nn.ReLU(inplace=True))
        self.context = nn.Sequential(_conv(2 * w2, w2), _conv(w2, w2, dilation=2), _conv(w2, w2, dilation=4))
        self.dec1 = _conv(w2 + w1, w1)
        self.dec0 = _conv(w1 + w0, w0)
        self.head = nn.Conv2d(w0, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, image: torch.Tensor, logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Refined logits.

        Args:
            image: float ``[B, 3, L, L]``, normalised like SAM's encoder input.
            logits: float ``[B, L, L]``, SAM's low-res mask logits.
            embedding: float ``[B, C, e, e]``, SAM's image embedding (``e = L / 4`` for SAM).

        Returns:
            float ``[B, L, L]``.
        """
        c = self.config.logit_clamp
        coarse = logits.float().clamp(-c, c)[:, None]
        x0 = self.enc0(torch.cat([image.float(), torch.sigmoid(coarse), coarse / c], 1))
        x1 = self.enc1(x0)
        x2 = self.enc2(x1)
        e = self.embed(embedding.float())
        if e.shape[-2:] != x2.shape[-2:]:
            e = F.interpolate(e, x2.shape[-2:], mode="bilinear", align_corners=False)
        x2 = self.context(torch.cat([x2, e], 1))
        up = F.interpolate(x2, x1.shape[-2:], mode="bilinear", align_corners=False)
        x1 = self.dec1(torch.cat([up, x1], 1))
        up = F.interpolate(x1, x0.shape[-2:], mode="bilinear", align_corners=False)
        x0 = self.dec0(torch.cat([up, x0], 1))
        # the residual is scaled to the clamp, so one unit of the head's output can flip a confident pixel
        return (coarse + c * self.head(x0))[:, 0]


def save_refiner(refiner: MaskRefiner, path: PathLike, metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Writes the refiner's weights and config as safetensors (atomically)."""
    from safetensors.torch import save

    from samantic.io import atomic_write_bytes

    meta = {"format": "samantic.sum_refiner/1", "config": json.dumps(asdict(refiner.config))}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    state = {k: v.detach().cpu().contiguous() for k, v in refiner.state_dict().items()}
    return atomic_write_bytes(path, save(state, metadata=meta))


def load_refiner(path: PathLike) -> MaskRefiner:
    """A :class:`MaskRefiner` from :func:`save_refiner`'s file (in eval mode)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "samantic.sum_refiner/1":
        raise ValueError(f"{path}: not a SUM refiner file (format {meta.get('format')!r})")
    config = json.loads(meta["config"])
    refiner = MaskRefiner(RefinerConfig(**{**config, "widths": tuple(config["widths"])}))
    refiner.load_state_dict(state)
    return refiner.eval()


# ---------------------------------------------------------------- SAM's view of an image


@dataclass
class SamView:
    """An image as the refiner sees it.

    Attributes:
        image: float32 ``[3, L, L]``, SAM's normalised, padded input area-averaged to ``L``.
        embedding: float32 ``[C, e, e]``, SAM's image embedding.
        input_size: (h, w) of the image in SAM's input frame.
        size: (H, W) of the image.
        valid: (hl, wl): the part of the ``L x L`` frame the image covers.
    """

    image: torch.Tensor
    embedding: torch.Tensor
    input_size: Tuple[int, int]
    size: Tuple[int, int]
    valid: Tuple[int, int]


@torch.no_grad()
def sam_view(model, image: np.ndarray) -> SamView:
    """Encodes an RGB uint8 image ``[H, W, 3]`` with SAM's encoder (one pass) for the refiner."""
    from segment_anything.utils.transforms import ResizeLongestSide

    s = int(model.image_encoder.img_size)
    low = int(model.prompt_encoder.mask_input_size[0])
    resized = ResizeLongestSide(s).apply_image(np.ascontiguousarray(image))
    x = torch.as_tensor(resized, device=model.device).permute(2, 0, 1)[None].float()
    x = model.preprocess(x)  # normalise, pad to S x S with zeros
    embedding = model.image_encoder(x)[0].float().cpu()
    f = s // low
    h, w = resized.shape[:2]
    return SamView(F.avg_pool2d(x, f)[0].float().cpu(), embedding, (h, w), tuple(image.shape[:2]),
                   (math.ceil(h / f), math.ceil(w / f)))


def _low_res_masks(masks: np.ndarray, input_size: Sequence[int], img_size: int, low: int) -> np.ndarray:
    """float32 ``[N, L, L]``: masks resized into the input frame (nearest), area-averaged to ``L`` (as the trainer)."""
    import cv2

    h, w = input_size
    f = img_size // low
    out = np.zeros((len(masks), img_size, img_size), np.float32)
    for i, m in enumerate(masks):
        out[i, :h, :w] = cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    return out.reshape(len(masks), low, f, low, f).mean((2, 4))


# ---------------------------------------------------------------- training examples


@dataclass
class RefinerExamples:
    """SAM's predictions of labelled masks and the masks they should have been.

    Attributes:
        images: float16 ``[N, 3, L, L]``; embeddings: float16 ``[N, C, e, e]``; valid: int64 ``[N, 2]``
            (one row per labelled image, from :class:`SamView`).
        coarse: float16 ``[M, L, L]`` SAM's logits; target: uint8 ``[M, L, L]`` the labelled mask's
            coverage of each low-res pixel, x 255; owner: int64 ``[M]`` image row.
        prompt: int8 ``[M]``: 0 a point in the mask, 1 its box, 2 a point anywhere.
        coarse_iou: float32 ``[M]``: IoU of SAM's mask and the target at ``L``.
    """

    images: torch.Tensor
    embeddings: torch.Tensor
    valid: torch.Tensor
    coarse: torch.Tensor
    target: torch.Tensor
    owner: torch.Tensor
    prompt: torch.Tensor
    coarse_iou: torch.Tensor

    def __len__(self) -> int:
        return len(self.owner)


def _unique_masks(masks: np.ndarray) -> np.ndarray:
    seen, out = set(), []
    for m in masks:
        key = np.packbits(m).tobytes()
        if key not in seen and m.any():
            seen.add(key)
            out.append(m)
    return np.stack(out) if out else masks[:0]


def _iou_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of bool ``[A, L, L]`` with bool ``[B, L, L]`` -> ``[A, B]``."""
    af, bf = a.flatten(1).float(), b.flatten(1).float()
    inter = af @ bf.T
    union = af.sum(1)[:, None] + bf.sum(1)[None] - inter
    return inter / union.clamp(min=1)


@torch.no_grad()
def refiner_examples(model, labelled, *, masks_per_image: int = 6, random_points: int = 4, per_image: int = 8,
                     box_prob: float = 0.5, min_match: float = 0.3, seed: int = 0,
                     progress: bool = True) -> RefinerExamples:
    """Prompts SAM (frozen) on every labelled image and pairs its outputs with the labelled masks.

    Args:
        model: the SAM whose pseudo-labels will be refined.
        labelled: indexable :class:`~samantic.train.sam.Sample` s (e.g. :class:`~samantic.train.sum.LabelledScenes`);
            every distinct mask of an image counts, whatever its task.
        masks_per_image: labelled masks prompted per image (a point each; a box too with ``box_prob``).
        random_points: points anywhere in the image, like segment-everything's grid.
        per_image: examples kept per image, drawn at random from the matched outputs.
        min_match: least IoU between an output and its labelled mask for a pair to count.
        seed: prompt placement and selection.
        progress: show a progress bar.
    """
    rng = np.random.default_rng(seed)
    s = int(model.image_encoder.img_size)
    low = int(model.prompt_encoder.mask_input_size[0])
    f = s // low
    pe = model.prompt_encoder.get_dense_pe()
    images, embeddings, valids = [], [], []
    coarse, target, owner, prompt, coarse_iou = [], [], [], [], []
    with progress_bar("refiner data", progress, len(labelled)) as advance:
        for i in range(len(labelled)):
            sample = labelled[i]
            masks = _unique_masks(np.asarray(sample.masks, bool))
            if not len(masks):
                advance()
                continue
            view = sam_view(model, sample.image)
            soft = torch.from_numpy(_low_res_masks(masks, view.input_size, s, low))
            hard = soft > 0.5
            hard = torch.where(hard.flatten(1).any(1)[:, None, None], hard, soft > 0)
            chosen = rng.permutation(len(masks))[:masks_per_image]
            # step: prompts (point coordinates in the input frame, pixel centres of the low-res frame)
            pts, point_src = [], []
            for k in chosen.tolist():
                ys, xs = np.nonzero(hard[k].numpy())
                j = int(rng.integers(len(xs)))
                pts.append(((xs[j] + 0.5) * f, (ys[j] + 0.5) * f))
                point_src.append(0)
            hl, wl = view.valid
            for _ in range(random_points):
                pts.append((rng.uniform(0, wl) * f, rng.uniform(0, hl) * f))
                point_src.append(2)
            boxes, box_of = [], []
            for k in chosen.tolist():
                if rng.random() < box_prob:
                    ys, xs = np.nonzero(hard[k].numpy())
                    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64) * f
                    bw, bh = box[2] - box[0], box[3] - box[1]
                    box += np.clip(rng.normal(0, 0.1, 4) * np.array([bw, bh, bw, bh]), -20, 20)
                    boxes.append(np.clip(box, 0, s - 1))
                    box_of.append(k)
            # step: SAM's outputs
            emb = view.embedding[None].to(model.device)
            outs, src, prompted = [], [], []
            coords = torch.tensor(pts, dtype=torch.float32, device=model.device)[:, None]
            labels = torch.ones(len(pts), 1, dtype=torch.int, device=model.device)
            sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            low_res, _ = model.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                            dense_prompt_embeddings=dense, multimask_output=True)
            outs.append(low_res.flatten(0, 1).float().cpu())
            src += [p for p in point_src for _ in range(low_res.shape[1])]
            prompted += [-1] * low_res.shape[0] * low_res.shape[1]
            if boxes:
                bt = torch.tensor(np.stack(boxes), dtype=torch.float32, device=model.device)
                sparse, dense = model.prompt_encoder(points=None, boxes=bt, masks=None)
                low_res, _ = model.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                                dense_prompt_embeddings=dense, multimask_output=False)
                outs.append(low_res[:, 0].float().cpu())
                src += [1] * len(boxes)
                prompted += box_of
            logits = torch.cat(outs)
            # step: pair each output with the labelled mask it overlaps most (a box with its own mask)
            ious = _iou_matrix(logits > 0, hard)
            best_iou, best = ious.max(1)
            for r, k in enumerate(prompted):
                if k >= 0:
                    best[r], best_iou[r] = k, ious[r, k]
            ok = np.flatnonzero((best_iou >= min_match).numpy())
            ok = rng.permutation(ok)[:per_image]
            if not len(ok):
                advance()
                continue
            row = len(images)
            images.append(view.image.half())
            embeddings.append(view.embedding.half())
            valids.append(view.valid)
            idx = torch.from_numpy(ok)
            coarse.append(logits[idx].half())
            target.append((soft[best[idx]] * 255).round().to(torch.uint8))
            owner += [row] * len(ok)
            prompt += [src[r] for r in ok.tolist()]
            coarse_iou.append(best_iou[idx])
            advance()
    if not owner:
        raise ValueError("no labelled mask gave a usable SAM output (is the labelled set empty?)")
    return RefinerExamples(
        images=torch.stack(images), embeddings=torch.stack(embeddings), valid=torch.tensor(valids, dtype=torch.long),
        coarse=torch.cat(coarse), target=torch.cat(target), owner=torch.tensor(owner, dtype=torch.long),
        prompt=torch.tensor(prompt, dtype=torch.int8), coarse_iou=torch.cat(coarse_iou).float(),
    )


# ---------------------------------------------------------------- training


def _valid_mask(valid: torch.Tensor, low: int) -> torch.Tensor:
    r = torch.arange(low)
    return (r[None, :, None] < valid[:, 0, None, None]) & (r[None, None, :] < valid[:, 1, None, None])


def refiner_loss(refined: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (mean over the valid pixels) + dice, per batch; target: soft ``[B, L, L]`` in [0, 1]."""
    v = valid.float()
    ce = F.binary_cross_entropy_with_logits(refined, target, reduction="none")
    ce = (ce * v).flatten(1).sum(1) / v.flatten(1).sum(1).clamp(min=1)
    p = torch.sigmoid(refined) * v
    t = target * v
    dice = 1 - (2 * (p * t).flatten(1).sum(1) + 1) / (p.flatten(1).sum(1) + t.flatten(1).sum(1) + 1)
    return (ce + dice).mean()


def train_refiner(examples: RefinerExamples, config: Optional[RefinerConfig] = None, *, steps: int = 2000,
                  batch_size: int = 8, lr: float = 5e-3, weight_decay: float = 1e-4, time_budget: float = 0.0,
                  seed: int = 0, progress: bool = True) -> Tuple[MaskRefiner, List[Dict[str, float]]]:
    """Trains a :class:`MaskRefiner` on :func:`refiner_examples`'s pairs (AdamW, cosine decay).

    Args:
        examples: the training pairs.
        config: architecture (default: ``embed_dim`` from the examples).
        steps: optimizer steps at most.
        batch_size: pairs per step.
        lr, weight_decay: AdamW.
        time_budget: seconds (0: none); the cosine then follows the larger of step and time progress
            and training stops when it is spent.
        seed: initialisation and batch order.
        progress: show a progress bar.

    Returns:
        (the refiner in eval mode, log rows every 50 steps: step, loss, seconds).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    torch.manual_seed(seed)
    config = config or RefinerConfig(embed_dim=int(examples.embeddings.shape[1]))
    refiner = MaskRefiner(config).train()
    opt = torch.optim.AdamW(refiner.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    low = int(examples.coarse.shape[-1])
    history: List[Dict[str, float]] = []
    window: List[float] = []
    start = time.perf_counter()
    with progress_bar("train refiner", progress, steps) as advance:
        for step in range(steps):
            elapsed = time.perf_counter() - start
            if time_budget > 0 and elapsed >= time_budget:
                break
            t = step / steps if time_budget <= 0 else max(step / steps, elapsed / time_budget)
            for g in opt.param_groups:
                g["lr"] = lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))
            idx = torch.randint(len(examples), (batch_size,), generator=gen)
            own = examples.owner[idx]
            refined = refiner(examples.images[own].float(), examples.coarse[idx].float(),
                              examples.embeddings[own].float())
            loss = refiner_loss(refined, examples.target[idx].float() / 255, _valid_mask(examples.valid[own], low))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window.append(float(loss.detach()))
            if (step + 1) % 50 == 0:
                history.append({"step": step + 1, "loss": sum(window) / len(window),
                                "seconds": time.perf_counter() - start})
                window = []
            advance()
    if window:
        history.append({"step": step + 1, "loss": sum(window) / len(window), "seconds": time.perf_counter() - start})
    return refiner.eval(), history


# ---------------------------------------------------------------- uncertainty


class UncertaintyEstimator:
    """``U = |p - r|`` per pseudo-label and pixel: ``p`` SAM's probability, ``r`` the refined one.

    Args:
        model: the SAM that made the pseudo-labels (its encoder gives the refiner's embedding).
        refiner: a trained :class:`MaskRefiner`.
        batch_size: pseudo-labels refined at once.
    """

    def __init__(self, model, refiner: MaskRefiner, batch_size: int = 16) -> None:
        self.model = model
        self.refiner = refiner.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def logits(self, image: np.ndarray, labels: PseudoLabels) -> Tuple[torch.Tensor, torch.Tensor]:
        """(SAM's, refined) logits at image size, float32 ``[K, H, W]`` each."""
        if not len(labels):
            z = torch.zeros((0,) + tuple(labels.size))
            return z, z.clone()
        view = sam_view(self.model, image)
        coarse = torch.from_numpy(labels.logits).float()
        refined = []
        for i in range(0, len(coarse), self.batch_size):
            c = coarse[i : i + self.batch_size]
            n = len(c)
            refined.append(self.refiner(view.image[None].expand(n, -1, -1, -1), c,
                                        view.embedding[None].expand(n, -1, -1, -1)))
        refined = torch.cat(refined)
        up = upscale_logits(torch.cat([coarse, refined]), labels.input_size, labels.size, labels.img_size)
        return up[: len(coarse)], up[len(coarse):]

    def __call__(self, image: np.ndarray, labels: PseudoLabels) -> np.ndarray:
        """float32 ``[K, H, W]`` in [0, 1]: the uncertainty map of every pseudo-label."""
        sam, refined = self.logits(image, labels)
        return (torch.sigmoid(sam) - torch.sigmoid(refined)).abs().numpy()


# ---------------------------------------------------------------- AUROC


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact area under the ROC curve (Mann-Whitney U, ties count half); nan without both classes."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):  # average rank of every tie group (1-based)
        ranks[a:b] = (a + b + 1) / 2
    rank_of = np.empty(len(s), np.float64)
    rank_of[order] = ranks
    return float((rank_of[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class BinnedAuroc:
    """AUROC over far more pixels than fit a sort: scores in [0, 1] are counted in log-spaced bins.

    Bin ``b`` of ``bins`` holds scores in ``[floor ** (1 - b / (bins - 1)), ...)``; scores at or below
    ``floor`` share bin 0. Pairs in the same bin count as ties (half), so the result equals
    :func:`auroc` of the binned scores.
    """

    def __init__(self, bins: int = 4096, floor: float = 1e-9) -> None:
        self.bins = bins
        self.floor = floor
        self.pos = np.zeros(bins, np.int64)
        self.neg = np.zeros(bins, np.int64)

    def bin(self, scores: np.ndarray) -> np.ndarray:
        s = np.clip(np.asarray(scores, np.float64), self.floor, 1.0)
        lo = math.log10(self.floor)
        return np.clip(((np.log10(s) - lo) / -lo * (self.bins - 1)).astype(np.int64), 0, self.bins - 1)

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        b = self.bin(scores).ravel()
        labels = np.asarray(labels, bool).ravel()
        self.pos += np.bincount(b[labels], minlength=self.bins)
        self.neg += np.bincount(b[~labels], minlength=self.bins)

    def value(self) -> float:
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        below = np.concatenate([[0], np.cumsum(self.neg)[:-1]])
        return float((self.pos * below).sum() + 0.5 * (self.pos * self.neg).sum()) / (n_pos * n_neg)

    @property
    def positives(self) -> int:
        return int(self.pos.sum())

    @property
    def total(self) -> int:
        return int(self.pos.sum() + self.neg.sum())


# ---------------------------------------------------------------- evaluation


SCORES = ("uncertainty", "confidence", "refined_confidence")


def _window(mask: np.ndarray, margin: float) -> Tuple[slice, slice]:
    ys, xs = np.nonzero(mask.any(1)), np.nonzero(mask.any(0))
    y0, y1, x0, x1 = ys[0][0], ys[0][-1] + 1, xs[0][0], xs[0][-1] + 1
    dy, dx = int(round((y1 - y0) * margin)), int(round((x1 - x0) * margin))
    h, w = mask.shape
    return slice(max(0, y0 - dy), min(h, y1 + dy)), slice(max(0, x0 - dx), min(w, x1 + dx))


def evaluate_uncertainty(estimator: UncertaintyEstimator, pool: UnlabelledPool, cache: PseudoLabelCache, *,
                         margin: float = 0.25, progress: bool = True) -> Dict[str, Any]:
    """How well the uncertainty map finds the pixels where pseudo-labels are wrong, on ``pool``.

    Each pseudo-label is matched to the ground-truth segment (entity or part, through
    :class:`~samantic.train.sum.PoolGroundTruth`) it overlaps most; its error pixels are where it and
    that segment differ. Three per-pixel scores are ranked against the errors:
    ``uncertainty`` (U = |p - r|), ``confidence`` (the pseudo-label's own ``1 - |2p - 1|``, the baseline)
    and ``refined_confidence`` (``1 - |2r - 1|``), pooled over all masks, on two pixel sets:
    ``image`` (every pixel) and ``near`` (the box around the pseudo-label and its segment, widened by
    ``margin`` of its size each way).

    Returns:
        ``auroc``: {region: {score: AUROC}}; ``mean_mask_auroc``: {region: {score: mean over masks}};
        ``masks``, ``images``, ``error_fraction`` {region}, ``pseudo_iou`` and ``refined_iou`` (mean IoU of
        the pseudo-labels and of their refinements (r > 0.5) with the matched segments), ``seconds``.
    """
    start = time.perf_counter()
    truth = PoolGroundTruth(pool)
    regions = ("image", "near")
    pooled = {r: {s: BinnedAuroc() for s in SCORES} for r in regions}
    per_mask: Dict[str, Dict[str, List[float]]] = {r: {s: [] for s in SCORES} for r in regions}
    pseudo_iou, refined_iou = [], []
    n_masks = 0
    with progress_bar("uncertainty eval", progress, len(pool)) as advance:
        for i in range(len(pool)):
            image = pool[i]
            labels = cache.get_or_compute(image, pool.key(i))
            if not len(labels):
                advance()
                continue
            sam, refined = estimator.logits(image, labels)
            gt = torch.from_numpy(truth[i])
            hard = sam > 0
            best = _iou_matrix(hard, gt).argmax(1)  # ground truth read here, for the evaluation only
            for k in range(len(labels)):
                p, r = torch.sigmoid(sam[k]).numpy(), torch.sigmoid(refined[k]).numpy()
                seg = gt[best[k]].numpy()
                pl = hard[k].numpy()
                error = pl != seg
                scores = {"uncertainty": np.abs(p - r), "confidence": 1 - np.abs(2 * p - 1),
                          "refined_confidence": 1 - np.abs(2 * r - 1)}
                win = _window(pl | seg, margin)
                for region in regions:
                    sl = (slice(None), slice(None)) if region == "image" else win
                    for name, sc in scores.items():
                        pooled[region][name].update(sc[sl], error[sl])
                        one = BinnedAuroc()
                        one.update(sc[sl], error[sl])
                        per_mask[region][name].append(one.value())
                pseudo_iou.append(float((pl & seg).sum() / max(1, (pl | seg).sum())))
                rl = r > 0.5
                refined_iou.append(float((rl & seg).sum() / max(1, (rl | seg).sum())))
                n_masks += 1
            advance()
    return {
        "auroc": {r: {s: pooled[r][s].value() for s in SCORES} for r in regions},
        "mean_mask_auroc": {r: {s: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                                for s, v in per_mask[r].items()} for r in regions},
        "error_fraction": {r: pooled[r]["uncertainty"].positives / max(1, pooled[r]["uncertainty"].total)
                           for r in regions},
        "pixels": {r: pooled[r]["uncertainty"].total for r in regions},
        "masks": n_masks,
        "masks_with_errors": int(sum(np.isfinite(v) for v in per_mask["image"]["uncertainty"])),
        "images": len(pool),
        "pseudo_iou": float(np.mean(pseudo_iou)) if pseudo_iou else float("nan"),
        "refined_iou": float(np.mean(refined_iou)) if refined_iou else float("nan"),
        "margin": margin,
        "bins": BinnedAuroc().bins,
        "seconds": time.perf_counter() - start,
    }


@dataclass
class BenchmarkConfig:
    """Options of :func:`uncertainty_benchmark` (see ``benchmarks/sum_uncertainty.py``)."""

    model: str = "sam_nano"
    labelled: int = 120
    labelled_seed: int = LABELLED_SEED
    pool: int = 10
    pool_seed: int = POOL_SEED
    heldout: int = 30
    heldout_seed: int = 0
    points_per_side: int = 16
    pred_iou_thresh: Optional[float] = None
    stability_score_thresh: Optional[float] = None
    refiner_steps: int = 2000  # at 1000 the refiner's quality depends on the seed (sum_uncertainty.py)
    refiner_minutes: float = 0.0
    batch_size: int = 8
    lr: float = 5e-3
    seed: int = 0
    cache_dir: str = "runs/sum/pseudo"
    refiner_out: str = "runs/sum/refiner.safetensors"


def uncertainty_benchmark(config: BenchmarkConfig, progress: bool = True, log=print) -> Dict[str, Any]:
    """The whole item-2 chain: refiner data from the labelled set, refiner training, pool pseudo-labels,
    and the uncertainty evaluation on held-out pool images.

    Returns:
        JSON-ready results: the config, the refiner's training log and example counts, the pool's
        pseudo-label report and :func:`evaluate_uncertainty`'s numbers, with timings.
    """
    from samantic.models import create_model
    from samantic.train.metrics import TRAIN_SEED_START
    from samantic.train.sum import LabelledScenes, build_pseudo_labels

    c = config
    if c.heldout_seed + c.heldout > TRAIN_SEED_START:
        raise ValueError(f"held-out seeds must lie below {TRAIN_SEED_START}, "
                         f"got {c.heldout_seed}:{c.heldout_seed + c.heldout}")
    for name, first, n in (("labelled", c.labelled_seed, c.labelled), ("pool", c.pool_seed, c.pool)):
        if first < TRAIN_SEED_START:
            raise ValueError(f"{name} seeds must lie in the training range (>= {TRAIN_SEED_START}), got {first}")
    if c.labelled_seed < c.pool_seed + c.pool and c.pool_seed < c.labelled_seed + c.labelled:
        raise ValueError("the labelled and pool seed ranges overlap")
    model = create_model(c.model).eval()
    out: Dict[str, Any] = {"config": asdict(c)}
    # step: the refiner's training pairs (labelled set only)
    t = time.perf_counter()
    examples = refiner_examples(model, LabelledScenes(c.labelled_seed, c.labelled), seed=c.seed, progress=progress)
    out["examples"] = {"pairs": len(examples), "images": int(len(examples.images)),
                       "by_prompt": {name: int((examples.prompt == k).sum()) for k, name in
                                     enumerate(("point", "box", "anywhere"))},
                       "coarse_iou": float(examples.coarse_iou.mean()), "seconds": time.perf_counter() - t}
    log(f"refiner data: {len(examples)} pairs from {len(examples.images)} labelled images "
        f"(SAM's IoU with them {out['examples']['coarse_iou']:.3f}), {out['examples']['seconds']:.0f} s")
    # step: train it
    refiner, history = train_refiner(examples, steps=c.refiner_steps, batch_size=c.batch_size, lr=c.lr,
                                     time_budget=c.refiner_minutes * 60, seed=c.seed, progress=progress)
    del examples
    out["refiner"] = {"steps": history[-1]["step"] if history else 0, "history": history,
                      "parameters": sum(p.numel() for p in refiner.parameters()),
                      "config": asdict(refiner.config)}
    if c.refiner_out:
        save_refiner(refiner, c.refiner_out, {"model": c.model, "labelled": f"{c.labelled_seed}:{c.labelled}"})
        out["refiner"]["file"] = c.refiner_out
    log(f"refiner: {out['refiner']['steps']} steps, loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}, "
        f"{history[-1]['seconds']:.0f} s")
    # step: pseudo-labels of the training pool (cached) and of the held-out pool images
    kw = dict(points_per_side=c.points_per_side, pred_iou_thresh=c.pred_iou_thresh,
              stability_score_thresh=c.stability_score_thresh)
    if c.pool:
        report = build_pseudo_labels(model, UnlabelledPool(c.pool_seed, c.pool), c.cache_dir, progress=progress, **kw)
        out["pool"] = {"images": c.pool, "masks": report.masks, "computed": report.computed, "reused": report.reused,
                       "key": report.key, "seconds": report.seconds}
        log(f"pool pseudo-labels: {report.masks} masks on {c.pool} images ({report.computed} computed), "
            f"{report.seconds:.0f} s")
    heldout = UnlabelledPool(c.heldout_seed, c.heldout)
    report = build_pseudo_labels(model, heldout, c.cache_dir, progress=progress, **kw)
    out["heldout_pseudo_labels"] = {"images": c.heldout, "masks": report.masks, "computed": report.computed,
                                    "key": report.key, "thresholds": {k: report.metadata[k] for k in
                                                                      ("pred_iou_thresh", "stability_score_thresh")},
                                    "seconds": report.seconds}
    # step: evaluate
    cache = PseudoLabelCache(c.cache_dir, model, **kw)
    out["evaluation"] = evaluate_uncertainty(UncertaintyEstimator(model, refiner), heldout, cache, progress=progress)
    return out
