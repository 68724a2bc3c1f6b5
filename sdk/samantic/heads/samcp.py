"""SAM-CP's model: label SAM patches (Type-I queries) and group them into instances (Type-II queries).

SAM-CP ("Marrying SAM with Composable Prompts for Versatile Segmentation") answers
two composable questions over the patches SAM gives for one image:

* Type-I: does patch ``p`` belong to class ``t``? One query per class.
* Type-II: do patches ``p1`` and ``p2`` belong to the same instance? One query per patch.

Both are read off one *affinity* matrix ``[C + P, P]`` (rows: queries, columns:
patches) that every decoder layer predicts, as in the paper's Algorithm 1.

Data flow (one image; a batch pads the patch axis and carries a validity mask)::

    image [3, H, W] -> backbone (CNN + FPN, strides 4/8/16/32, D channels)
    patch boxes [P, 4] + patch masks [P, m, m] (m = mask_size or 7; see mask_to_roi)
        -> mask-RoI features: roi_align of the box on the FPN level of its size (7x7),
           times the patch's own mask at 7x7, MLP over them and the m x m mask to D,
           + sine/MLP encoding of the box
        -> patch encoder (transformer encoder over the patch tokens)  -> tokens [P, D]
    queries: C class embeddings (Type-I) + the P patch tokens (Type-II)
        -> decoder layers: self-attention, cross-attention to the tokens (masked by
           the previous layer's affinity, Mask2Former style), FFN
        -> per layer: affinity logits [C + P, P] (residual across layers),
           class logits of the Type-II queries [P, C + 1] (last column: "no object"),
           presence logits of the Type-I queries [C].

Plugging in a pretrained backbone (no new dependency here: the user installs timm
or open_clip)::

    import timm
    body = timm.create_model("convnext_tiny", pretrained=True, features_only=True, out_indices=(0, 1, 2, 3))
    backbone = FpnBackbone(body, in_channels=body.feature_info.channels(),
                           strides=body.feature_info.reduction(), out_channels=info.d_model)
    head = SamcpHead(info, backbone=backbone)            # info.backbone = "custom:convnext_tiny"
    save_samcp(head, "samcp.safetensors")
    head = load_samcp("samcp.safetensors", backbone=FpnBackbone(...same construction...))

Any ``nn.Module`` whose forward maps ``images [B, 3, H, W]`` to a list of feature
maps works as a body (an open_clip ConvNeXt trunk: ``model.visual.trunk`` with a
small wrapper returning its stage outputs). A :class:`Backbone` may also be written
from scratch: it needs ``strides``, ``out_channels`` and ``forward(images) -> list``.
Images enter :class:`SamcpHead` as float ``[B, 3, H, W]`` in ``[0, 1]``; the head
normalises them with ``info.pixel_mean`` / ``info.pixel_std`` (ImageNet by default,
what timm and open_clip ConvNeXts expect).

A head file is safetensors whose header holds ``format``, ``classes`` and ``stuff``
(JSON lists), ``config`` (JSON of the architecture), ``model`` (the SAM whose
patches it was trained on) and any extra entries (e.g. thresholds).

Open vocabulary: a head built with text embeddings of its class names
(``SamcpHead(info, text_embeddings=...)``, ``info.text_dim`` wide; see
:mod:`samantic.heads.text`) takes its Type-I queries from them (``text_proj``) instead of
learned class embeddings. The embeddings are a tensor of the head file
(``text_embeddings``), and the header names the encoder (``text_encoder``) and the prompt
template (``text_template``), so inference needs no text encoder, and
:func:`add_samcp_classes` can append names encoded the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMCP_FORMAT = "samantic.samcp_head.v1"
PRIOR_PROB = 0.01
_PRIOR_LOGIT = math.log(PRIOR_PROB / (1.0 - PRIOR_PROB))
SMALL_FPN = "small_fpn"
# header entry: state-dict digest of the SAM whose patches the head was trained on
SAM_STATE_KEY = "sam_state_sha256"
# header entries of a head with text embeddings (kept in SamcpInfo.extra)
TEXT_ENCODER_KEY = "text_encoder"
TEXT_TEMPLATE_KEY = "text_template"
ADDED_CLASSES_KEY = "added_classes"

__all__ = [
    "SAMCP_FORMAT", "Backbone", "SmallCnn", "FpnBackbone", "small_fpn_backbone", "SamcpInfo", "SamcpOutput",
    "SamcpHead", "mask_to_roi", "patch_inputs", "save_samcp", "load_samcp", "affinity_attention_mask",
    "add_samcp_classes", "TEXT_ENCODER_KEY", "TEXT_TEMPLATE_KEY", "ADDED_CLASSES_KEY",
]


# ---------------------------------------------------------------------------
# config


@dataclass
class SamcpInfo:
    """Vocabulary and architecture of a SAM-CP head.

    Args:
        classes: thing class names (countable objects).
        stuff: stuff class names (amorphous regions); the closed vocabulary is
            ``classes + stuff`` in that order.
        d_model: width D of the FPN, the patch tokens and the queries.
        layers: affinity decoder layers (the outputs hold ``layers + 1`` entries: the
            prediction from the initial queries, then one per layer).
        heads: attention heads, also the η of Algorithm 1 (``d_model % heads == 0``).
        encoder_layers: patch encoder layers.
        ffn_dim: hidden width of the transformer FFNs.
        roi_size: side of the RoI grid (7 in the paper).
        mask_size: side of the patch-mask input (0: ``roi_size``, the paper's). A multiple of
            ``roi_size``: the token sees the patch's shape at this finer grid, and the mask-RoI
            weights are its block means. The shapes world's classes differ mostly by silhouette,
            which a 7 x 7 mask blurs (a star, a circle and a crescent look alike at 7 x 7).
        roi_channels: channels the FPN features are reduced to before the RoI MLP.
        texture_channels: texture statistics of each patch (0: off). The finest FPN level, reduced
            to this many channels, is sampled on the patch-mask grid over the patch's box; the
            mask-weighted mean and standard deviation of each channel go through an MLP whose last
            layer starts at zero and are added to the content embedding. A large region's 7 x 7 RoI
            on the coarsest level keeps little of its texture (tiles, faint banding, strokes), which
            is what tells the shapes world's stuff classes apart when colour does not. Zero at
            initialisation, so a head started from a file without it (``--init``) starts as that file.
        backbone: ``"small_fpn"`` (built here, trained from scratch) or
            ``"custom:NAME"`` (the caller passes the module to the head and to load).
        backbone_channels: stage widths of the small CNN (strides 4, 8, 16, 32).
        fpn_smooth: the FPN's smoothing after the top-down sum: ``"conv"`` (a full 3 x 3
            convolution, D to D, per level: the FPN paper's) or ``"separable"`` (a depthwise 3 x 3
            then a pointwise 1 x 1, as EfficientDet's BiFPN fuses). At D = 128 the full convolution
            of the stride-4 level is most of a training step on the CPU; the separable one costs
            about a ninth of its multiply-adds. For the ``small_fpn`` backbone (a custom one is
            built by its caller: ``FpnBackbone(..., smooth=...)``).
        canonical_box: box side (pixels) that maps to the stride-16 FPN level; smaller
            boxes go to finer levels (FPN paper's level rule, k = 4 + log2(sqrt(wh) / canonical)).
        text_dim: width of text embeddings the head can take as Type-I queries (0: none); a head
            whose vocabulary is text (``SamcpHead(info, text_embeddings=...)``) needs it.
        mask_roi: multiply the RoI features by the patch mask (False: box RoI only, the ablation).
        affinity_residual: add each layer's affinity logits to the previous layer's.
        attn_mask_thresh: cross-attention of a query skips patches whose previous
            affinity (sigmoid) is below this; a row never loses all its patches.
        pixel_mean / pixel_std: image normalisation (images enter in [0, 1]).
        input_size: the backbone sees images resized so their longer side is this (boxes
            are scaled with them; 0 keeps the given size). Patch masks are relative to their
            boxes, so they need no change.
        model: the SAM whose patches the head was trained on (informational, checked by check_model).
        extra: further header entries (thresholds, training recipe), kept on save/load; a head
            with text embeddings records ``text_encoder`` (spec) and ``text_template`` here.
    """

    classes: Tuple[str, ...]
    stuff: Tuple[str, ...] = ()
    d_model: int = 128
    layers: int = 3
    heads: int = 4
    encoder_layers: int = 2
    ffn_dim: int = 256
    roi_size: int = 7
    mask_size: int = 0
    roi_channels: int = 32
    texture_channels: int = 0
    backbone: str = SMALL_FPN
    backbone_channels: Tuple[int, ...] = (32, 64, 96, 128)
    fpn_smooth: str = "conv"
    canonical_box: float = 128.0
    text_dim: int = 0
    mask_roi: bool = True
    affinity_residual: bool = True
    attn_mask_thresh: float = 0.5
    pixel_mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_size: int = 384
    model: str = ""
    extra: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        self.stuff = tuple(self.stuff)
        self.backbone_channels = tuple(int(c) for c in self.backbone_channels)
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)
        self.pixel_std = tuple(float(v) for v in self.pixel_std)
        names = self.names
        if not names:
            raise ValueError("a SAM-CP head needs at least one class (classes or stuff)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"class names must be unique across classes and stuff, repeated: {dup}")
        if self.d_model <= 0 or self.d_model % self.heads:
            raise ValueError(f"d_model must be a positive multiple of heads, got d_model={self.d_model}, heads={self.heads}")
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")
        if self.roi_size < 1 or self.mask_size < 0 or (self.mask_size and self.mask_size % self.roi_size):
            raise ValueError(f"mask_size must be 0 or a positive multiple of roi_size ({self.roi_size}), "
                             f"got {self.mask_size}")
        if self.texture_channels < 0:
            raise ValueError(f"texture_channels must be >= 0 (0: off), got {self.texture_channels}")
        if self.backbone != SMALL_FPN and not self.backbone.startswith("custom:"):
            raise ValueError(f"backbone must be {SMALL_FPN!r} or 'custom:NAME', got {self.backbone!r}")
        if self.fpn_smooth not in FPN_SMOOTH:
            raise ValueError(f"fpn_smooth must be one of {', '.join(FPN_SMOOTH)}, got {self.fpn_smooth!r}")
        if self.backbone == SMALL_FPN and len(self.backbone_channels) != 4:
            raise ValueError(f"backbone_channels needs 4 widths (strides 4, 8, 16, 32), got {self.backbone_channels}")

    @property
    def names(self) -> Tuple[str, ...]:
        """The closed vocabulary: things then stuff."""
        return tuple(self.classes) + tuple(self.stuff)

    @property
    def num_classes(self) -> int:
        return len(self.classes) + len(self.stuff)

    @property
    def mask_side(self) -> int:
        """Side of the patch masks the head takes (``mask_size``, or ``roi_size`` when that is 0)."""
        return int(self.mask_size or self.roi_size)

    def config(self) -> Dict[str, Any]:
        skip = {"classes", "stuff", "model", "extra"}
        if not self.mask_size:  # the paper's 7 x 7 masks: a file older samantic reads too
            skip.add("mask_size")
        if not self.texture_channels:  # likewise: a head without texture statistics is the one older samantic wrote
            skip.add("texture_channels")
        if self.fpn_smooth == "conv":  # likewise: the full 3 x 3 smoothing is the only one older samantic built
            skip.add("fpn_smooth")
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self) if f.name not in skip}

    def to_metadata(self) -> Dict[str, str]:
        meta = dict(self.extra)
        meta.update({
            "format": SAMCP_FORMAT,
            "classes": json.dumps(list(self.classes)),
            "stuff": json.dumps(list(self.stuff)),
            "config": json.dumps(self.config(), sort_keys=True),
            "model": self.model,
        })
        return meta

    @staticmethod
    def from_metadata(meta: Dict[str, str], source: str = "head") -> "SamcpInfo":
        if meta.get("format") != SAMCP_FORMAT:
            raise ValueError(f"{source}: not a samantic SAM-CP head (format {meta.get('format')!r}, expected {SAMCP_FORMAT!r})")
        try:
            config = json.loads(meta["config"])
            classes = tuple(json.loads(meta["classes"]))
            stuff = tuple(json.loads(meta.get("stuff", "[]")))
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{source}: damaged SAM-CP header ({e!r})") from None
        known = {f.name for f in fields(SamcpInfo)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{source}: unknown SAM-CP config keys {unknown} (written by a newer samantic?)")
        reserved = {"format", "classes", "stuff", "config", "model"}
        extra = {k: v for k, v in meta.items() if k not in reserved}
        try:
            return SamcpInfo(classes=classes, stuff=stuff, model=meta.get("model", ""), extra=extra, **config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid SAM-CP config ({e})") from None


# ---------------------------------------------------------------------------
# backbone


@runtime_checkable
class Backbone(Protocol):
    """What the head needs from a backbone.

    ``forward(images: Tensor[B, 3, H, W]) -> list of Tensor[B, out_channels, H / s, W / s]``,
    one map per stride in ``strides`` (increasing).
    """

    strides: Tuple[int, ...]
    out_channels: int

    def __call__(self, images: torch.Tensor) -> List[torch.Tensor]: ...


def _conv_gn(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.GroupNorm(min(8, cout), cout), nn.GELU())


class SmallCnn(nn.Module):
    """A plain CNN with four stages at strides 4, 8, 16, 32 (trained from scratch)."""

    def __init__(self, channels: Sequence[int] = (32, 64, 96, 128)) -> None:
        super().__init__()
        c = list(channels)
        self.stem = nn.Sequential(_conv_gn(3, c[0] // 2, 2), _conv_gn(c[0] // 2, c[0], 2))
        self.stages = nn.ModuleList([nn.Sequential(_conv_gn(c[0], c[0]), _conv_gn(c[0], c[0]))])
        for cin, cout in zip(c[:-1], c[1:]):
            self.stages.append(nn.Sequential(_conv_gn(cin, cout, 2), _conv_gn(cout, cout)))
        self.channels = tuple(c)
        self.strides = (4, 8, 16, 32)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


FPN_SMOOTH = ("conv", "separable")


def _smooth_conv(d: int, kind: str) -> nn.Module:
    if kind == "separable":
        return nn.Sequential(nn.Conv2d(d, d, 3, padding=1, groups=d), nn.Conv2d(d, d, 1))
    return nn.Conv2d(d, d, 3, padding=1)


class FpnBackbone(nn.Module):
    """Any multi-scale body + a feature pyramid (top-down sum, 3x3 smoothing) to ``out_channels``.

    Args:
        body: module mapping images ``[B, 3, H, W]`` to a list of maps (finest first).
        in_channels: channels of each map of ``body``.
        strides: stride of each map of ``body``.
        out_channels: D.
        smooth: ``"conv"`` (3 x 3, D to D) or ``"separable"`` (depthwise 3 x 3, then 1 x 1).
    """

    def __init__(self, body: nn.Module, in_channels: Sequence[int], strides: Sequence[int], out_channels: int,
                 smooth: str = "conv") -> None:
        super().__init__()
        if len(in_channels) != len(strides) or not strides:
            raise ValueError(f"in_channels and strides must be non-empty and of one length, got {in_channels} and {strides}")
        if list(strides) != sorted(strides):
            raise ValueError(f"strides must increase (finest first), got {strides}")
        self.body = body
        self.strides = tuple(int(s) for s in strides)
        self.out_channels = int(out_channels)
        self.lateral = nn.ModuleList([nn.Conv2d(c, out_channels, 1) for c in in_channels])
        if smooth not in FPN_SMOOTH:
            raise ValueError(f"smooth must be one of {', '.join(FPN_SMOOTH)}, got {smooth!r}")
        self.smooth = nn.ModuleList([_smooth_conv(out_channels, smooth) for _ in in_channels])

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        feats = list(self.body(images))
        if len(feats) != len(self.lateral):
            raise ValueError(f"backbone body gave {len(feats)} feature maps, the FPN expects {len(self.lateral)}")
        lat = [l(f) for l, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        return [s(x) for s, x in zip(self.smooth, lat)]


def small_fpn_backbone(info: SamcpInfo) -> FpnBackbone:
    """The default backbone: :class:`SmallCnn` + FPN at strides 4/8/16/32, D channels."""
    body = SmallCnn(info.backbone_channels)
    return FpnBackbone(body, body.channels, body.strides, info.d_model, smooth=info.fpn_smooth)


# ---------------------------------------------------------------------------
# patch inputs


def mask_to_roi(masks: Any, boxes: torch.Tensor, size: int = 7, image_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Resamples each patch's mask inside its own box to ``size x size`` (the mask-RoI weights).

    Args:
        masks: the patches' masks, one of
            * ``Tensor[P, h, w]`` (bool / uint8 / float in [0, 1], e.g. SAM's low-res
              mask probabilities), at image resolution or at any resolution of the
              same image (then give ``image_size``);
            * a sequence of COCO RLE dicts (or a :class:`samantic.ops.RleBatch`), decoded
              with ``samantic.ops.rle_decode`` at their own size.
        boxes: ``Tensor[P, 4]`` xyxy in image pixels (the boxes given to the head).
        size: output side (the head's ``roi_size``).
        image_size: ``(H, W)`` of the image the boxes refer to, when the masks are at
            another resolution (default: the masks' own size).

    Returns:
        ``Tensor[P, size, size]`` float in [0, 1] (fraction of the patch in each cell).
    """
    from torchvision.ops import roi_align

    if not isinstance(masks, torch.Tensor):
        from samantic.ops import rle_decode

        masks = torch.from_numpy(rle_decode(masks))
    if masks.ndim != 3:
        raise ValueError(f"masks must be [P, h, w], got shape {tuple(masks.shape)}")
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or boxes.shape[0] != masks.shape[0]:
        raise ValueError(f"boxes must be [P, 4] with P = {masks.shape[0]} masks, got shape {tuple(boxes.shape)}")
    p, h, w = masks.shape
    if p == 0:
        return torch.zeros(0, size, size)
    ih, iw = image_size if image_size is not None else (h, w)
    sy, sx = h / float(ih), w / float(iw)
    scaled = boxes.to(masks.device) * torch.tensor([sx, sy, sx, sy], device=masks.device)
    rois = torch.cat([torch.arange(p, dtype=torch.float32, device=masks.device)[:, None], scaled], 1)
    out = roi_align(masks[:, None].float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return out[:, 0].clamp_(0.0, 1.0)


def patch_inputs(rles: Sequence[dict], boxes_xyxy_inclusive: np.ndarray, size: Tuple[int, int], roi_size: int = 7
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """The head's inputs for patches: boxes ``[P, 4]`` xyxy (max exclusive) and ``[P, r, r]`` mask-RoI weights."""
    boxes = np.asarray(boxes_xyxy_inclusive, np.float32).reshape(-1, 4).copy()
    boxes[:, 2:] += 1.0
    if not len(rles):
        return boxes, np.zeros((0, roi_size, roi_size), np.float32)
    roi = mask_to_roi(list(rles), torch.from_numpy(boxes), size=roi_size, image_size=tuple(size))
    return boxes, roi.numpy().astype(np.float32)


def _sine_box_encoding(boxes01: torch.Tensor, num_feats: int, max_cycles: float = 32.0) -> torch.Tensor:
    """``[..., 4]`` normalised xyxy -> ``[..., 4 * num_feats]`` sine/cosine features.

    Frequencies are log-spaced from 1 to ``max_cycles`` cycles per image side: with a
    small D, the transformer default (temperature 10000) would leave only the lowest
    one useful, and patches of two look-alike objects would be hard to tell apart.
    """
    n = max(num_feats // 2, 1)
    exps = torch.linspace(0.0, math.log2(max_cycles), n, dtype=boxes01.dtype, device=boxes01.device)
    pos = boxes01[..., None] * (2 * math.pi) * torch.pow(2.0, exps)  # [..., 4, F/2]
    pos = torch.cat([pos.sin(), pos.cos()], -1)
    return pos.flatten(-2)


def _mlp(dims: Sequence[int], act=nn.GELU) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class MaskRoiEmbed(nn.Module):
    """Mask-RoI features of the patches + box positional encoding -> patch tokens before the encoder."""

    def __init__(self, info: SamcpInfo, strides: Sequence[int], in_channels: int) -> None:
        super().__init__()
        d, r, ms = info.d_model, info.roi_size, info.mask_side
        self.info = info
        self.strides = tuple(strides)
        self.finest = min(range(len(self.strides)), key=self.strides.__getitem__)  # the texture's level
        self.reduce = nn.Conv2d(in_channels, info.roi_channels, 1)
        # the mask itself is appended: the token knows the patch's shape, not only its look
        self.mlp = _mlp([info.roi_channels * r * r + ms * ms, 2 * d, d])
        self.pos = _mlp([4 * (d // 4), d, d])
        self.norm = nn.LayerNorm(d)
        self.texture_reduce: Optional[nn.Module] = None
        self.texture_mlp: Optional[nn.Module] = None
        if info.texture_channels:
            self.texture_reduce = nn.Conv2d(in_channels, info.texture_channels, 1)
            self.texture_mlp = _mlp([2 * info.texture_channels, d, d])
            nn.init.zeros_(self.texture_mlp[-1].weight)  # adds nothing until trained
            nn.init.zeros_(self.texture_mlp[-1].bias)

    def levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """FPN level index (into ``strides``) of each box: coarser for larger boxes."""
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0)
        side = (wh[:, 0] * wh[:, 1]).sqrt()
        # the level whose stride is 16 takes boxes of side `canonical_box`
        k = torch.floor(math.log2(16) + torch.log2(side / self.info.canonical_box) + 1e-6)
        log_strides = torch.tensor([math.log2(s) for s in self.strides], device=boxes.device)
        return (k[:, None] - log_strides[None]).abs().argmin(1)

    def roi_features(self, feats: List[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        r = self.info.roi_size
        out = feats[0].new_zeros(rois.shape[0], self.info.roi_channels, r, r)
        level = self.levels(rois[:, 1:])
        for i, (f, s) in enumerate(zip(feats, self.strides)):
            sel = (level == i).nonzero().flatten()
            if sel.numel():
                out[sel] = roi_align(self.reduce(f), rois[sel], (r, r), spatial_scale=1.0 / s,
                                     sampling_ratio=2, aligned=True)
        return out

    def texture(self, finest: torch.Tensor, rois: torch.Tensor, roi_masks: torch.Tensor) -> torch.Tensor:
        """Texture embedding ``[N, D]`` of the patches (``info.texture_channels`` > 0).

        The finest FPN map, reduced, is sampled once per cell of the patch-mask grid over each box
        (one sample a cell: averaging several would smooth away the texture); the mask-weighted
        mean and standard deviation of every channel over the cells go through the texture MLP.
        """
        from torchvision.ops import roi_align

        if self.texture_reduce is None or self.texture_mlp is None:
            raise ValueError("this head has no texture statistics (texture_channels 0)")
        ms = self.info.mask_side
        x = roi_align(self.texture_reduce(finest), rois, (ms, ms), spatial_scale=1.0 / self.strides[self.finest],
                      sampling_ratio=1, aligned=True)                     # [N, t, m, m]
        w = roi_masks.to(x.dtype)[:, None]                                 # [N, 1, m, m]
        n = w.sum(dim=(2, 3)).clamp(min=1e-3)                              # [N, 1]; an empty mask: zeros
        mean = (x * w).sum(dim=(2, 3)) / n
        var = (w * (x - mean[:, :, None, None]) ** 2).sum(dim=(2, 3)) / n
        return self.texture_mlp(torch.cat([mean, (var + 1e-6).sqrt()], 1))

    def content(self, x: torch.Tensor, roi_masks: torch.Tensor, texture: Optional[torch.Tensor] = None) -> torch.Tensor:
        """RoI features ``[N, c, r, r]`` and patch masks ``[N, m, m]`` (+ the texture embedding
        ``[N, D]`` of a head with texture statistics) -> content embedding ``[N, D]``."""
        r, ms = self.info.roi_size, self.info.mask_side
        m = roi_masks.to(x.dtype)
        if self.info.mask_roi:
            # the mask-RoI weights: the finer mask's block means (reshape + mean, so ONNX exports it as is)
            w = m if ms == r else m.reshape(-1, r, ms // r, r, ms // r).mean(dim=(2, 4))
            x = x * w[:, None]
        else:
            m = torch.ones_like(m)
        out = self.mlp(torch.cat([x.flatten(1), m.flatten(1)], 1))
        return out if texture is None else out + texture

    def forward(self, feats: List[torch.Tensor], rois: torch.Tensor, roi_masks: torch.Tensor,
                image_hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """rois ``[N, 5]`` (batch index, xyxy), roi_masks ``[N, m, m]`` (m: ``info.mask_side``) ->
        (tokens ``[N, D]``, pos ``[N, D]``)."""
        tex = self.texture(feats[self.finest], rois, roi_masks) if self.texture_mlp is not None else None
        x = self.content(self.roi_features(feats, rois), roi_masks, tex)
        h, w = image_hw
        b01 = rois[:, 1:] / torch.tensor([w, h, w, h], dtype=rois.dtype, device=rois.device)
        pos = self.pos(_sine_box_encoding(b01.clamp(0, 1), self.info.d_model // 4))
        # content normalised on its own: a strong look must not drown the position
        return self.norm(x) + pos, pos


# ---------------------------------------------------------------------------
# affinity decoder


class Affinity(nn.Module):
    """Algorithm 1 of the paper: affinity logits ``[B, Q, P]`` between queries and patches.

    ``A = MLP_heads(q_h · k_h / sqrt(D / η)) / s + (b1 · k + b0)``; ``s = exp(log_scale)``
    is learned, ``b0`` starts at ``bias_init`` and ``b1`` at 0. The last layer of the
    head MLP starts at 0, so the first scores are exactly ``sigmoid(bias_init)``.
    """

    def __init__(self, d: int, heads: int, bias_init: float, hidden: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.head_mlp = nn.Sequential(nn.Linear(heads, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.patch_bias = nn.Linear(d, 1)
        nn.init.zeros_(self.head_mlp[-1].weight)
        nn.init.zeros_(self.head_mlp[-1].bias)
        nn.init.zeros_(self.patch_bias.weight)
        nn.init.constant_(self.patch_bias.bias, bias_init)

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        b, q, d = queries.shape
        p = patches.shape[1]
        h, dh = self.heads, d // self.heads
        qh = self.q_proj(queries).view(b, q, h, dh).transpose(1, 2)
        kh = self.k_proj(patches).view(b, p, h, dh).transpose(1, 2)
        a = qh @ kh.transpose(-1, -2) / math.sqrt(dh)  # [B, η, Q, P]
        a = self.head_mlp(a.permute(0, 2, 3, 1)).squeeze(-1)  # [B, Q, P]
        return a * torch.exp(-self.log_scale) + self.patch_bias(patches).transpose(1, 2)


def affinity_attention_mask(affinity: torch.Tensor, valid: torch.Tensor, thresh: float) -> torch.Tensor:
    """Cross-attention mask from affinity logits (True = blocked), Mask2Former style.

    Args:
        affinity: ``[B, Q, P]`` logits of the previous layer.
        valid: ``[B, P]`` real (not padded) patches.
        thresh: patches with sigmoid(affinity) below it are blocked.

    Returns:
        ``[B, Q, P]`` bool. Padded patches are always blocked; a row whose real patches
        would all be blocked gets them all back; an image without patches keeps its
        first (padded) column open so attention stays defined.
    """
    blocked = (affinity.detach().sigmoid() < thresh) | ~valid[:, None, :]
    full = blocked.all(-1, keepdim=True)
    blocked = torch.where(full, ~valid[:, None, :], blocked)
    # branch-free (the exported decoder has no data-dependent control flow)
    empty = ~valid.any(1)
    first = torch.zeros_like(valid)
    first[:, 0] = True
    return blocked & ~(empty[:, None, None] & first[:, None, :])


class DecoderLayer(nn.Module):
    """Self-attention over all queries, masked cross-attention to the patch tokens, FFN (pre-norm)."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, q: torch.Tensor, q_pos: torch.Tensor, q_pad: torch.Tensor, mem: torch.Tensor,
                mem_pos: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        x = self.n1(q)
        q = q + self.self_attn(x + q_pos, x + q_pos, x, key_padding_mask=q_pad, need_weights=False)[0]
        x = self.n2(q)
        mask = blocked.repeat_interleave(self.heads, dim=0)  # [B * heads, Q, P]
        q = q + self.cross_attn(x + q_pos, mem + mem_pos, mem, attn_mask=mask, need_weights=False)[0]
        return q + self.ffn(self.n3(q))


@dataclass
class SamcpOutput:
    """Everything one forward pass predicts, per decoder stage (deep supervision).

    ``affinity[l]``: ``Tensor[B, C + P, P]`` logits; rows ``:C`` are the Type-I (class)
    queries, rows ``C:`` the Type-II (patch) queries, columns the patches.
    ``class_logits[l]``: ``Tensor[B, P, C + 1]`` of the Type-II queries (last column
    "no object"; sigmoid-style logits start at 0.01). ``presence_logits[l]``:
    ``Tensor[B, C]``, whether each Type-I query's class is in the image.
    ``valid``: ``Tensor[B, P]`` bool, real patches (padded rows and columns are junk).
    Index ``0`` is the prediction from the initial queries, ``l`` after decoder layer ``l``.
    """

    affinity: List[torch.Tensor]
    class_logits: List[torch.Tensor]
    presence_logits: List[torch.Tensor]
    valid: torch.Tensor
    num_classes: int
    patch_tokens: torch.Tensor

    def semantic_affinity(self, layer: int = -1) -> torch.Tensor:
        """``[B, C, P]`` Type-I rows of a stage."""
        return self.affinity[layer][:, : self.num_classes]

    def instance_affinity(self, layer: int = -1) -> torch.Tensor:
        """``[B, P, P]`` Type-II rows of a stage."""
        return self.affinity[layer][:, self.num_classes:]


class SamcpHead(nn.Module):
    """SAM-CP: backbone + mask-RoI patch tokens + patch encoder + unified affinity decoder.

    Args:
        info: vocabulary and architecture.
        backbone: a :class:`Backbone` with ``out_channels == info.d_model`` (required when
            ``info.backbone`` is ``"custom:NAME"``; default: :func:`small_fpn_backbone`).
        text_embeddings: optional ``Tensor[C, info.text_dim]``, text embeddings of
            ``info.names`` (see :mod:`samantic.heads.text`). Given, the Type-I queries are
            their projection (the head has no learned class embeddings) and new names can be
            added later (:meth:`add_classes`); they are stored L2-normalised, in the head file.
    """

    def __init__(self, info: SamcpInfo, backbone: Optional[nn.Module] = None,
                 text_embeddings: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.info = info
        d = info.d_model
        if backbone is None:
            if info.backbone != SMALL_FPN:
                raise ValueError(f"info.backbone is {info.backbone!r}: pass the backbone module (backbone=...)")
            backbone = small_fpn_backbone(info)
        if int(getattr(backbone, "out_channels", -1)) != d or not getattr(backbone, "strides", None):
            raise ValueError(f"the backbone must have strides and out_channels == d_model ({d}), "
                             f"got out_channels={getattr(backbone, 'out_channels', None)}")
        self.backbone = backbone
        self.register_buffer("pixel_mean", torch.tensor(info.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(info.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.roi_embed = MaskRoiEmbed(info, backbone.strides, d)
        enc_layer = nn.TransformerEncoderLayer(d, info.heads, info.ffn_dim, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
        self.patch_encoder = nn.TransformerEncoder(enc_layer, info.encoder_layers, norm=nn.LayerNorm(d),
                                                   enable_nested_tensor=False)
        # Type-I queries: learned class embeddings, or projected text embeddings (frozen, in the file)
        self.text_proj = nn.Linear(info.text_dim, d) if info.text_dim > 0 else None
        if text_embeddings is None:
            self.class_embed = nn.Parameter(torch.randn(info.num_classes, d) * 0.02)
            self.register_buffer("text_embeddings", None)
        else:
            self.register_parameter("class_embed", None)
            self.register_buffer("text_embeddings", _text_table(text_embeddings, info))
        self.type_embed = nn.Parameter(torch.randn(2, d) * 0.02)  # [Type-I, Type-II]
        self.query_in = nn.Linear(d, d)
        self.layers = nn.ModuleList([DecoderLayer(d, info.heads, info.ffn_dim) for _ in range(info.layers)])
        self.out_norm = nn.LayerNorm(d)
        # layer 0 starts the scores at 0.01; with the residual, later layers add deltas that start at 0
        self.affinity = nn.ModuleList([
            Affinity(d, info.heads, _PRIOR_LOGIT if (l == 0 or not info.affinity_residual) else 0.0)
            for l in range(info.layers + 1)])
        # Type-II classifier: dot product with the class embeddings (so text embeddings work) + "no object"
        self.cls_proj = nn.Linear(d, d)
        # a cosine classifier with a learned temperature (CLIP-style, so text embeddings fit): a
        # scaled dot product (1 / sqrt(D)) left the class scores undecided between classes after
        # 1200 steps on 300 scenes
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.cls_bias = nn.Parameter(torch.full((), _PRIOR_LOGIT))
        self.no_object = nn.Linear(d, 1)
        self.presence = nn.Linear(d, 1)
        nn.init.constant_(self.presence.bias, _PRIOR_LOGIT)

    @property
    def classes(self) -> Tuple[str, ...]:
        return self.info.names

    # -- steps --------------------------------------------------------------

    def resize_input(self, images: torch.Tensor, boxes: Sequence[torch.Tensor]
                     ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Resizes images (bilinear, antialiased) so the longer side is ``info.input_size``, and the boxes with them."""
        size = int(self.info.input_size)
        h, w = images.shape[-2:]
        if size <= 0 or max(h, w) == size:
            return images, list(boxes)
        scale = size / float(max(h, w))
        hw = (max(1, round(h * scale)), max(1, round(w * scale)))
        images = F.interpolate(images.float(), size=hw, mode="bilinear", align_corners=False, antialias=scale < 1)
        sx, sy = hw[1] / float(w), hw[0] / float(h)
        factor = torch.tensor([sx, sy, sx, sy])
        return images, [b.float() * factor.to(b.device) for b in boxes]

    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Images float ``[B, 3, H, W]`` in [0, 1] -> FPN maps (one per backbone stride)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be float [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        return self.backbone(x)

    def encode_patches(self, feats: List[torch.Tensor], boxes: Sequence[torch.Tensor],
                       patch_masks: Sequence[torch.Tensor], image_hw: Tuple[int, int]
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch tokens of every image, padded: (tokens ``[B, P, D]``, pos ``[B, P, D]``, valid ``[B, P]``)."""
        b = feats[0].shape[0]
        if len(boxes) != b or len(patch_masks) != b:
            raise ValueError(f"need boxes and patch_masks for each of the {b} images, got {len(boxes)} and {len(patch_masks)}")
        r = self.info.mask_side
        counts = []
        for i, (bx, pm) in enumerate(zip(boxes, patch_masks)):
            if bx.ndim != 2 or bx.shape[-1] != 4:
                raise ValueError(f"boxes[{i}] must be [P, 4] xyxy, got shape {tuple(bx.shape)}")
            if pm.shape != (bx.shape[0], r, r):
                raise ValueError(f"patch_masks[{i}] must be [{bx.shape[0]}, {r}, {r}] (see mask_to_roi), "
                                 f"got shape {tuple(pm.shape)}")
            counts.append(int(bx.shape[0]))
        device, d = feats[0].device, self.info.d_model
        pmax = max(counts + [1])  # an image batch without patches keeps one (padded) dummy column
        tokens = feats[0].new_zeros(b, pmax, d)
        pos = feats[0].new_zeros(b, pmax, d)
        valid = torch.zeros(b, pmax, dtype=torch.bool, device=device)
        if sum(counts):
            rois = torch.cat([torch.cat([torch.full((n, 1), float(i), device=device), bx.to(device, torch.float32)], 1)
                              for i, (n, bx) in enumerate(zip(counts, boxes))])
            masks = torch.cat([pm.to(device) for pm in patch_masks])
            tok, ps = self.roi_embed(feats, rois, masks, image_hw)
            bi = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(counts)]).to(device)
            pi = torch.cat([torch.arange(n) for n in counts]).to(device)
            tokens = tokens.index_put((bi, pi), tok)
            pos = pos.index_put((bi, pi), ps)
            valid[bi, pi] = True
        pad_enc = ~valid
        pad_enc[~valid.any(1), 0] = False  # an image without patches attends to one dummy token
        tokens = self.patch_encoder(tokens, src_key_padding_mask=pad_enc)
        return tokens, pos, valid

    def class_queries(self, class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Type-I queries ``Tensor[C, D]``.

        Args:
            class_embeddings: optional text embeddings ``[C, text_dim]`` of other names (projected
                to D). Default: the queries of the head's own vocabulary ``info.names``: its
                stored text embeddings projected when it has them, else its learned class
                embeddings.
        """
        if class_embeddings is None:
            if self.text_embeddings is None:
                return self.class_embed
            class_embeddings = self.text_embeddings
        if self.text_proj is None:
            raise ValueError("this head takes no text embeddings (info.text_dim == 0)")
        if class_embeddings.ndim != 2 or class_embeddings.shape[1] != self.info.text_dim:
            raise ValueError(f"class_embeddings must be [C, {self.info.text_dim}], got shape {tuple(class_embeddings.shape)}")
        return self.text_proj(F.normalize(class_embeddings.to(self.text_proj.weight.dtype), dim=-1))

    def add_classes(self, names: Sequence[str], embeddings: torch.Tensor, stuff: bool = False) -> None:
        """Appends names to the vocabulary of a head with text embeddings (in place).

        New things go after the existing things, new stuff after the existing stuff, so
        ``info.names`` (things, then stuff) and the category ids of stuff classes shift when
        things are added. The queries of the existing names do not change.

        Args:
            names: the new class names (not in the vocabulary yet).
            embeddings: ``Tensor[len(names), text_dim]`` from the encoder and prompt template the
                head's embeddings came from (``info.extra["text_encoder"]`` / ``["text_template"]``).
            stuff: add stuff classes (default: things).

        Raises:
            ValueError: a head with learned class embeddings (it needs retraining for new
                names), a name it knows already, or embeddings of the wrong shape.
        """
        if self.text_embeddings is None:
            raise ValueError(_LEARNED_HEAD)
        self.info, table = _extend_vocabulary(self.info, self.text_embeddings, names, embeddings, stuff)
        self.roi_embed.info = self.info
        self.text_embeddings = table

    def _predict(self, l: int, q: torch.Tensor, q_pos: torch.Tensor, mem: torch.Tensor, mem_pos: torch.Tensor,
                 cls: torch.Tensor, c: int, prev: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.out_norm(q)
        # positions enter the affinity explicitly (as in attention): look-alike patches of two
        # instances differ only there
        aff = self.affinity[l](x + q_pos, mem + mem_pos)
        if prev is not None and self.info.affinity_residual:
            aff = aff + prev
        inst = x[:, c:]
        logits = (F.normalize(self.cls_proj(inst), dim=-1) @ F.normalize(cls, dim=-1).t() * self.logit_scale.exp()
                  + self.cls_bias)
        logits = torch.cat([logits, self.no_object(inst)], -1)
        presence = self.presence(x[:, :c]).squeeze(-1)
        return aff, logits, presence

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
               class_embeddings: Optional[torch.Tensor] = None) -> SamcpOutput:
        """Runs the affinity decoder over encoded patch tokens (see :meth:`encode_patches`);
        ``class_embeddings`` as in :meth:`class_queries`."""
        b, p, d = tokens.shape
        cls = self.class_queries(class_embeddings)
        c = cls.shape[0]
        q = torch.cat([(cls + self.type_embed[0]).expand(b, c, d), self.query_in(tokens) + self.type_embed[1]], 1)
        q_pos = torch.cat([pos.new_zeros(b, c, d), pos], 1)
        q_pad = torch.cat([valid.new_zeros(b, c), ~valid], 1)
        affs, logits, presence = [], [], []
        aff, lg, pr = self._predict(0, q, q_pos, tokens, pos, cls, c, None)
        affs.append(aff), logits.append(lg), presence.append(pr)
        for l, layer in enumerate(self.layers, start=1):
            blocked = affinity_attention_mask(aff, valid, self.info.attn_mask_thresh)
            q = layer(q, q_pos, q_pad, tokens, pos, blocked)
            aff, lg, pr = self._predict(l, q, q_pos, tokens, pos, cls, c, aff)
            affs.append(aff), logits.append(lg), presence.append(pr)
        return SamcpOutput(affs, logits, presence, valid, c, tokens)

    def forward(self, images: torch.Tensor, boxes: Sequence[torch.Tensor], patch_masks: Sequence[torch.Tensor],
                class_embeddings: Optional[torch.Tensor] = None) -> SamcpOutput:
        """Predicts affinities and classes for the patches of a batch of images.

        Args:
            images: float ``[B, 3, H, W]`` in [0, 1] (images of one batch share a size; pad smaller ones).
            boxes: per image ``Tensor[P_i, 4]`` xyxy in pixels of ``images``.
            patch_masks: per image ``Tensor[P_i, m, m]`` in [0, 1] (m: ``info.mask_side``): each
                patch's mask inside its box, from :func:`mask_to_roi`.
            class_embeddings: optional ``Tensor[C, text_dim]`` (open vocabulary); default
                the queries of ``info.names`` (:meth:`class_queries`).

        Returns:
            A :class:`SamcpOutput` with ``info.layers + 1`` stages.
        """
        images, boxes = self.resize_input(images, boxes)
        feats = self.features(images)
        tokens, pos, valid = self.encode_patches(feats, boxes, patch_masks, tuple(images.shape[-2:]))
        return self.decode(tokens, pos, valid, class_embeddings)

    # -- checks ---------------------------------------------------------------

    def check_classes(self, names: Sequence[str]) -> Tuple[str, ...]:
        """Requested names -> the same tuple; an unknown name raises ``ValueError`` listing the known ones."""
        from samantic.pipeline.panoptic import check_names

        return check_names(self.info.names, names)

    def sam_for(self, model_name: Optional[str], source: Union[str, Path] = "head") -> str:
        """The registered SAM to cut this head's patches with: ``model_name`` when given (refused when it is not the
        one the head was trained on), else the head's own (``sam_nano`` for a head that records none)."""
        if model_name is None:
            from samantic.models.registry import DEFAULT_MODEL

            return self.info.model or DEFAULT_MODEL
        self.check_model(model_name, source)
        return model_name

    def check_model(self, model_name: str, source: Union[str, Path] = "head") -> None:
        """Refuses patches of a SAM other than the one the head was trained on (other granularity)."""
        if self.info.model and self.info.model != model_name:
            raise ValueError(f"{source}: the SAM-CP head was trained on patches of {self.info.model}, not {model_name}")

    def check_weights(self, sam: nn.Module, source: Union[str, Path] = "head") -> Optional[str]:
        """Why ``sam``'s patches are not the ones the head learned from, or None when they are.

        A head records the state-dict digest of the SAM it was trained on (``sam_state_sha256``,
        written by ``samantic train samcp``); other weights of the same architecture segment
        differently, and the head scores their patches worse. Heads without the record pass.
        """
        from samantic.models.weights import state_sha256

        want = self.info.extra.get(SAM_STATE_KEY, "")
        if not want:
            return None
        got = state_sha256(sam)
        if got == want:
            return None
        trained = self.info.extra.get("checkpoint") or "its shipped weights"
        return (f"{source}: the SAM-CP head was trained on patches of {self.info.model or 'a SAM'} with {trained} "
                f"(weights {want[:12]}), but the SAM given has other weights ({got[:12]}): its patches differ from "
                f"those the head learned from, so expect lower accuracy; load the weights the head was trained with")

    def save(self, path: Union[str, Path], metadata: Optional[Dict[str, Any]] = None) -> Path:
        return save_samcp(self, path, metadata)


_LEARNED_HEAD = ("this SAM-CP head has learned class embeddings (no text embeddings of its class names): it cannot "
                 "take new class names without retraining (train it with --text-encoder for an open vocabulary)")


def _text_table(embeddings: torch.Tensor, info: SamcpInfo) -> torch.Tensor:
    """Checked, L2-normalised float32 copy of text embeddings ``[C, text_dim]`` of ``info.names``."""
    if info.text_dim <= 0:
        raise ValueError("text embeddings need a head with info.text_dim > 0 (their width)")
    if not isinstance(embeddings, torch.Tensor) or embeddings.shape != (info.num_classes, info.text_dim):
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"text_embeddings must be [{info.num_classes}, {info.text_dim}] (one row per name of "
                         f"classes + stuff), got {shape}")
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError("text_embeddings must be finite")
    x = embeddings.detach().float().clone()
    norms = x.norm(dim=-1, keepdim=True)
    # rows already of unit length stay bit for bit (re-normalising rounds their last bit differently
    # on some CPUs, and the stored vocabulary must not move when names are added)
    return torch.where((norms - 1).abs() > 1e-6, x / norms.clamp(min=1e-12), x)


def _check_new_names(info: SamcpInfo, names: Sequence[str]) -> Tuple[str, ...]:
    names = tuple(str(n).strip() for n in names)
    if not names or not all(names):
        raise ValueError(f"new class names must be non-empty, got {list(names)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    known = sorted(set(names) & set(info.names))
    if dup or known:
        raise ValueError(f"new class names must be new and unique; repeated: {dup}, already known: {known}")
    return names


def _extend_vocabulary(info: SamcpInfo, table: torch.Tensor, names: Sequence[str], embeddings: torch.Tensor,
                       stuff: bool) -> Tuple[SamcpInfo, torch.Tensor]:
    """(info, text embeddings) with ``names`` appended to the things or to the stuff."""
    names = _check_new_names(info, names)
    if not isinstance(embeddings, torch.Tensor) or embeddings.shape != (len(names), info.text_dim):
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings of the new names must be [{len(names)}, {info.text_dim}], got {shape}")
    new = F.normalize(embeddings.detach().to(table.device, table.dtype), dim=-1)
    k = len(info.classes)
    extra = dict(info.extra)
    extra[ADDED_CLASSES_KEY] = json.dumps(json.loads(extra.get(ADDED_CLASSES_KEY, "[]")) + list(names))
    if stuff:
        info = replace(info, stuff=info.stuff + names, extra=extra)
        table = torch.cat([table, new])
    else:
        info = replace(info, classes=info.classes + names, extra=extra)
        table = torch.cat([table[:k], new, table[k:]])
    return info, _text_table(table, info).to(new.device)


def save_samcp(head: SamcpHead, path: Union[str, Path], metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Writes the head as safetensors; the header holds classes, stuff, config, model and ``metadata``."""
    from samantic.models import save_checkpoint

    meta: Dict[str, Any] = dict(head.info.to_metadata())
    for k, v in (metadata or {}).items():
        if k in {"format", "classes", "stuff", "config"}:
            raise ValueError(f"metadata key {k!r} is reserved for the head's own description")
        meta[k] = v
    return save_checkpoint(head.state_dict(), path, metadata=meta)


def load_samcp(path: Union[str, Path], map_location: str = "cpu", backbone: Optional[nn.Module] = None) -> SamcpHead:
    """Reads a head written by :func:`save_samcp` (errors name the file and the problem).

    Args:
        path: the ``.safetensors`` file.
        map_location: device of the weights.
        backbone: the (untrained or pretrained) module for a ``"custom:NAME"`` backbone; its
            weights are then replaced by the file's.
    """
    from samantic.heads._files import read_head_file

    path, meta, state = read_head_file(path, "SAM-CP head", map_location)
    info = SamcpInfo.from_metadata(meta, str(path))
    if info.backbone != SMALL_FPN and backbone is None:
        raise ValueError(f"{path}: the head uses backbone {info.backbone!r}; pass that module as backbone=...")
    try:
        head = SamcpHead(info, backbone=backbone, text_embeddings=state.get("text_embeddings"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        missing, unexpected = head.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"{path}: SAM-CP weights do not match its description ({e})") from None
    if missing or unexpected:
        raise ValueError(f"{path}: SAM-CP weights do not match its description (missing {missing}, unexpected {unexpected})")
    return head.to(map_location).eval()


def add_samcp_classes(path: Union[str, Path], names: Sequence[str], *, stuff: bool = False,
                      text_encoder: Optional[str] = None, out: Optional[Union[str, Path]] = None,
                      device: str = "cpu") -> Path:
    """Appends class names to the vocabulary of a head file with text embeddings.

    The names are encoded with the head's recorded encoder and prompt template (header
    ``text_encoder`` / ``text_template``) or with ``text_encoder``, which must give the
    head's stored embeddings back for its own names (else it is not the encoder the head
    was trained with). The file is rewritten atomically; the header lists the names added
    after training under ``added_classes``. Works at the file level: a ``custom:`` backbone
    needs no module here.

    Args:
        path: the head file.
        names: new class names.
        stuff: add them as stuff classes (default: things; see :meth:`SamcpHead.add_classes`
            for the order of the vocabulary).
        text_encoder: ``open_clip:MODEL[:PRETRAINED]`` (default: the recorded one).
        out: where to write the head (default: ``path`` itself).
        device: where the text encoder runs.

    Returns:
        The path written.

    Raises:
        ValueError: a head with learned class embeddings, known or repeated names, no encoder
            recorded or given, or an encoder that does not reproduce the stored embeddings.
        ImportError: open_clip is not installed.
    """
    from samantic.heads._files import read_head_file
    from samantic.heads.text import DEFAULT_TEMPLATE, open_text_encoder
    from samantic.models import save_checkpoint

    path, meta, state = read_head_file(path, "SAM-CP head")
    info = SamcpInfo.from_metadata(meta, str(path))
    table = state.get("text_embeddings")
    if table is None:
        raise ValueError(f"{path}: {_LEARNED_HEAD}")
    try:
        table = _text_table(table, info)
        names = _check_new_names(info, names)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    spec = text_encoder or info.extra.get(TEXT_ENCODER_KEY, "")
    if not spec:
        raise ValueError(f"{path}: the head does not record its text encoder; give one (open_clip:MODEL[:PRETRAINED])")
    template = info.extra.get(TEXT_TEMPLATE_KEY, DEFAULT_TEMPLATE)
    encoder = open_text_encoder(spec, device=device)
    if encoder.dim != info.text_dim:
        raise ValueError(f"{path}: {encoder.spec} gives {encoder.dim}-wide embeddings, the head takes {info.text_dim}")
    # the encoder must be the head's: its embeddings of the known names are the stored ones
    cos = (encoder.encode(info.names, template) * table).sum(-1)
    worst = int(cos.argmin())
    if float(cos[worst]) < 0.99:
        raise ValueError(f"{path}: {encoder.spec} is not the text encoder this head was trained with (it encodes "
                         f"{info.names[worst]!r} at cosine {float(cos[worst]):.3f} to the stored embedding; recorded "
                         f"encoder: {info.extra.get(TEXT_ENCODER_KEY) or 'none'})")
    info, table = _extend_vocabulary(info, table, names, encoder.encode(names, template), stuff)
    info.extra[TEXT_ENCODER_KEY] = info.extra.get(TEXT_ENCODER_KEY) or str(encoder.spec)
    info.extra[TEXT_TEMPLATE_KEY] = template
    info.extra.pop("samantic_version", None)  # the writer records its own
    state["text_embeddings"] = table
    return save_checkpoint(state, Path(out) if out is not None else path, metadata=info.to_metadata())
