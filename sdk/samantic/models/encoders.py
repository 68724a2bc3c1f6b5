"""Image encoders other than segment-anything's ViT, for small SAMs trained from scratch.

A SAM's image encoder is any module that maps the padded, normalised input
``[B, 3, S, S]`` to an image embedding ``[B, C, S / stride, S / stride]`` and
has an ``img_size`` attribute (read by ``Sam.preprocess``, ``SamPredictor``
and the generators). MobileSAM, EdgeSAM and EfficientViT-SAM all swap the
encoder this way; the prompt encoder and the mask decoder stay segment-anything's.

:class:`ConvImageEncoder` is a hybrid of the kind edge SAMs use: a convolutional
pyramid (strides 4, 8, 16, 32; inverted-residual blocks with batch norm, which
folds into the convolutions at export), a few self-attention blocks at stride 32
for global context, and a feature-pyramid fusion of every level at the output
stride, so that fine detail from stride 4-8 reaches the embedding that the mask
decoder upsamples. The output goes through segment-anything's neck (1x1 conv,
LayerNorm2d, 3x3 conv, LayerNorm2d), as the ViT's does.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvImageEncoder"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (segment-anything's, written for ONNX-friendly ops)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.GELU())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 project (MobileNetV2 / RepViT style), residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 3) -> None:
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(
            _conv_bn(cin, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, act=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class AttentionBlock(nn.Module):
    """Pre-norm global self-attention + MLP on a feature map, with a depthwise-conv position encoding."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.pos = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # [B, N, C]
        qkv = self.qkv(self.norm1(t)).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (1.0 / math.sqrt(c // self.num_heads))) @ k.transpose(-2, -1)
        a = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, h * w, c)
        t = t + self.proj(a)
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class ConvImageEncoder(nn.Module):
    """Convolutional pyramid + global attention + multi-scale fusion, as a SAM image encoder.

    Args:
        img_size: side of the square input.
        out_stride: stride of the output embedding (8 or 16; 16 = segment-anything's patch 16).
        widths: channels at strides 4, 8, 16 and 32.
        blocks: inverted-residual blocks at strides 4, 8, 16 and 32 (the first block of
            strides 8-32 downsamples).
        attn_depth: global self-attention blocks at stride 32.
        num_heads: heads of those blocks.
        out_chans: channels of the embedding (the prompt encoder's width).
    """

    def __init__(self, img_size: int, out_stride: int, widths: Sequence[int], blocks: Sequence[int],
                 attn_depth: int, num_heads: int, out_chans: int) -> None:
        super().__init__()
        if out_stride not in (8, 16):
            raise ValueError(f"out_stride must be 8 or 16, got {out_stride}")
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError(f"widths and blocks need 4 entries (strides 4, 8, 16, 32), got {widths} and {blocks}")
        if img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32 for a stride-32 pyramid, got {img_size}")
        self.img_size = img_size
        self.out_stride = out_stride
        self.stem = nn.Sequential(_conv_bn(3, widths[0] // 2, 3, 2), _conv_bn(widths[0] // 2, widths[0], 3, 2))
        stages = []
        cin = widths[0]
        for level, (width, n) in enumerate(zip(widths, blocks)):
            layers = []
            for i in range(max(n, 1 if level else 0)):
                stride = 2 if (level and i == 0) else 1
                layers.append(InvertedResidual(cin, width, stride))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.attn = nn.Sequential(*[AttentionBlock(widths[3], num_heads) for _ in range(attn_depth)])
        # fusion: every level brought to out_stride and summed (FPN-style lateral 1x1 convs)
        fuse = widths[1] if out_stride == 8 else widths[2]
        self.lateral = nn.ModuleList()
        for level, width in enumerate(widths):
            stride = 4 << level
            if stride < out_stride:  # finer than the output: strided convs
                steps = int(math.log2(out_stride // stride))
                mods = [_conv_bn(width if i == 0 else fuse, fuse, 3, 2, act=i < steps - 1) for i in range(steps)]
                self.lateral.append(nn.Sequential(*mods))
            else:
                self.lateral.append(_conv_bn(width, fuse, 1, act=False))
        self.neck = nn.Sequential(
            nn.Conv2d(fuse, out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        feats = []
        for level, stage in enumerate(self.stages):
            x = stage(x)
            if level == 3:
                x = self.attn(x)
            feats.append(x)
        side = self.img_size // self.out_stride
        out = None
        for level, (f, lateral) in enumerate(zip(feats, self.lateral)):
            y = lateral(f)
            if y.shape[-1] != side:
                y = F.interpolate(y, size=(side, side), mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        return self.neck(out)
