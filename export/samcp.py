"""ONNX export of a SAM-CP head: backbone, patch encoder and affinity decoder graphs.

The runtime (:class:`samantic.runtime.samcp.OnnxSamcpScorer`) resizes the image and reads
the patch masks inside their boxes in numpy (:mod:`samantic.pipeline.samcp_inputs`), then
runs three graphs:

``samcp_backbone.onnx``
    ``image`` float32 [1, 3, h, w] in [0, 1] (longer side ``input_size``; h, w dynamic)
    -> ``feat0`` ... ``feat3`` [1, D, h / s, w / s] (the FPN, strides 4/8/16/32).
``samcp_patches.onnx``
    ``feat0`` ... ``feat3``, ``boxes`` float32 [P, 4] (xyxy, exclusive max, pixels of the
    resized image), ``roi_masks`` float32 [P, m, m] (m: the manifest's ``mask_size``), ``image_hw`` float32 [2]
    -> ``tokens`` [1, P, D], ``pos`` [1, P, D] (mask-RoI features + box encoding, patch encoder).
``samcp_decoder.onnx``
    ``tokens``, ``pos``, ``class_queries`` float32 [C, D]
    -> ``affinity`` [C + P, P] (sigmoid), ``class_probs`` [P, C] (sigmoid, things then stuff),
    ``presence`` [C] (sigmoid) of the last decoder layer.

P and C are dynamic; nothing in the graphs depends on data through control flow: the
RoI of every patch is read on all four FPN levels and the level chosen by a one-hot
weight (the head's torch code gathers per level, same numbers), and the decoder's
attention masks are branch-free. The class queries (learned, or projected text
embeddings) are an input, stored beside the graphs, so a bundle's vocabulary is data.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Dict, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align  # imported before tracing (its import cannot be traced)

from samantic.export.onnx import OPSET, _import_onnx, _save_checked

BACKBONE = "samcp_backbone"
PATCHES = "samcp_patches"
DECODER = "samcp_decoder"
SAMCP_GRAPHS = (BACKBONE, PATCHES, DECODER)
SAMCP_OPSET = max(OPSET, 16)  # RoiAlign with half-pixel coordinates (torchvision's aligned=True) needs 16
LEVELS = 4


def _attention(mha: nn.MultiheadAttention, q, k, v, blocked=None):
    """``nn.MultiheadAttention`` (batch first, no padding) written with reshapes the tracer keeps dynamic.

    The module's own forward bakes the traced sequence length into its reshapes; this one
    reads every size from the tensors. ``blocked``: bool ``[B, Q, K]``, True = not attended.
    """
    h = mha.num_heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)

    def heads(x, w, b):
        return F.linear(x, w, b).unflatten(-1, (h, -1)).transpose(1, 2)  # [B, h, L, dh]

    qh, kh, vh = heads(q, wq, bq), heads(k, wk, bk), heads(v, wv, bv)
    att = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
    if blocked is not None:
        att = att.masked_fill(blocked[:, None], float("-inf"))
    out = (att.softmax(-1) @ vh).transpose(1, 2).flatten(2)
    return mha.out_proj(out)


def _encoder_layer(layer: nn.TransformerEncoderLayer, x):
    """A pre-norm ``nn.TransformerEncoderLayer`` (GELU, no dropout) without its fused fast path."""
    y = layer.norm1(x)
    x = x + _attention(layer.self_attn, y, y, y)
    return x + layer.linear2(F.gelu(layer.linear1(layer.norm2(x))))


def _decoder_layer(layer, q, q_pos, mem, mem_pos, blocked):
    """:class:`samantic.heads.samcp.DecoderLayer` for one image without padding."""
    x = layer.n1(q)
    q = q + _attention(layer.self_attn, x + q_pos, x + q_pos, x)
    x = layer.n2(q)
    q = q + _attention(layer.cross_attn, x + q_pos, mem + mem_pos, mem, blocked)
    return q + layer.ffn(layer.n3(q))


class BackboneOnnx(nn.Module):
    def __init__(self, head) -> None:
        super().__init__()
        self.head = head

    def forward(self, image: torch.Tensor):
        return tuple(self.head.features(image))


class PatchesOnnx(nn.Module):
    """Mask-RoI embedding + patch encoder for one image, without per-level gathers."""

    def __init__(self, head) -> None:
        super().__init__()
        self.head = head
        self.embed = head.roi_embed

    def forward(self, f0, f1, f2, f3, boxes, roi_masks, image_hw):
        emb, info = self.embed, self.head.info
        r = info.roi_size
        feats = [f0, f1, f2, f3]
        rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], 1)
        level = emb.levels(boxes)  # [P]
        x = torch.zeros(boxes.shape[0], info.roi_channels, r, r, dtype=boxes.dtype)
        for i, (f, s) in enumerate(zip(feats, emb.strides)):
            got = roi_align(emb.reduce(f), rois, (r, r), spatial_scale=1.0 / s, sampling_ratio=2, aligned=True)
            x = x + got * (level == i).to(got.dtype)[:, None, None, None]
        tex = emb.texture(feats[emb.finest], rois, roi_masks) if emb.texture_mlp is not None else None
        x = emb.content(x, roi_masks, tex)
        wh = torch.stack([image_hw[1], image_hw[0], image_hw[1], image_hw[0]])
        b01 = (boxes / wh).clamp(0, 1)
        from samantic.heads.samcp import _sine_box_encoding

        pos = emb.pos(_sine_box_encoding(b01, info.d_model // 4))
        tokens = (emb.norm(x) + pos)[None]
        enc = self.head.patch_encoder
        for layer in enc.layers:
            tokens = _encoder_layer(layer, tokens)
        if enc.norm is not None:
            tokens = enc.norm(tokens)
        return tokens, pos[None]


class DecoderOnnx(nn.Module):
    def __init__(self, head) -> None:
        super().__init__()
        self.head = head

    def forward(self, tokens, pos, class_queries):
        head = self.head
        b, p, d = tokens.shape
        c = class_queries.shape[0]
        q = torch.cat([(class_queries + head.type_embed[0]).expand(b, c, d), head.query_in(tokens) + head.type_embed[1]], 1)
        q_pos = torch.cat([torch.zeros_like(q[:, :c]), pos], 1)
        aff, lg, pr = head._predict(0, q, q_pos, tokens, pos, class_queries, c, None)
        for l, layer in enumerate(head.layers, start=1):
            # affinity_attention_mask without padding: a row whose patches would all be blocked keeps them all
            sig = aff.sigmoid()
            thresh = head.info.attn_mask_thresh
            blocked = (sig < thresh) & (sig.amax(-1, keepdim=True) >= thresh)
            q = _decoder_layer(layer, q, q_pos, tokens, pos, blocked)
            aff, lg, pr = head._predict(l, q, q_pos, tokens, pos, class_queries, c, aff)
        return aff[0].sigmoid(), lg[0, :, :c].sigmoid(), pr[0].sigmoid()


IO_NAMES = {
    BACKBONE: (["image"], [f"feat{i}" for i in range(LEVELS)]),
    PATCHES: ([f"feat{i}" for i in range(LEVELS)] + ["boxes", "roi_masks", "image_hw"], ["tokens", "pos"]),
    DECODER: (["tokens", "pos", "class_queries"], ["affinity", "class_probs", "presence"]),
}


def _dynamic_axes(graph: str) -> Dict[str, Dict[int, str]]:
    if graph == BACKBONE:
        axes = {"image": {2: "H", 3: "W"}}
        axes.update({f"feat{i}": {2: f"H{i}", 3: f"W{i}"} for i in range(LEVELS)})
        return axes
    if graph == PATCHES:
        axes = {f"feat{i}": {2: f"H{i}", 3: f"W{i}"} for i in range(LEVELS)}
        axes.update({"boxes": {0: "P"}, "roi_masks": {0: "P"}, "tokens": {1: "P"}, "pos": {1: "P"}})
        return axes
    return {"tokens": {1: "P"}, "pos": {1: "P"}, "class_queries": {0: "C"},
            "affinity": {0: "CP", 1: "P"}, "class_probs": {0: "P", 1: "C"}, "presence": {0: "C"}}


def sample_inputs(head, graph: str, patches: int = 5) -> Tuple[torch.Tensor, ...]:
    """Example inputs of one graph (for export and tests)."""
    info = head.info
    s = int(info.input_size) or 256
    h, w = s * 3 // 4, s
    g = torch.Generator().manual_seed(0)
    if graph == BACKBONE:
        return (torch.rand(1, 3, h, w, generator=g),)
    with torch.no_grad():
        feats = head.features(torch.rand(1, 3, h, w, generator=g))
    if graph == PATCHES:
        xy = torch.rand(patches, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 4 + torch.rand(patches, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
        boxes = torch.cat([xy, xy + wh], 1)
        roi = torch.rand(patches, info.mask_side, info.mask_side, generator=g)
        return (*feats, boxes, roi, torch.tensor([float(h), float(w)]))
    d = info.d_model
    return (torch.randn(1, patches, d, generator=g), torch.randn(1, patches, d, generator=g),
            torch.randn(info.num_classes, d, generator=g))


def check_exportable(head) -> None:
    """Refuses heads the graphs do not cover (a custom backbone's stage count)."""
    strides = tuple(head.roi_embed.strides)
    if len(strides) != LEVELS:
        raise ValueError(f"SAM-CP export needs a {LEVELS}-level FPN backbone, this head's has strides {strides}")


def export_samcp_graph(head, graph: str, path: Union[str, Path]) -> Path:
    """Exports one SAM-CP graph to ``path`` (checked with the full ONNX checker)."""
    onnx = _import_onnx()
    if graph not in SAMCP_GRAPHS:
        raise ValueError(f"graph must be one of {SAMCP_GRAPHS}, got {graph!r}")
    check_exportable(head)
    head = head.eval()
    module = {BACKBONE: BackboneOnnx, PATCHES: PatchesOnnx, DECODER: DecoderOnnx}[graph](head).eval()
    inputs, outputs = IO_NAMES[graph]
    buf = io.BytesIO()
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused encoder-layer kernel has no ONNX form
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, sample_inputs(head, graph), buf, dynamo=False, opset_version=SAMCP_OPSET,
                              input_names=inputs, output_names=outputs, dynamic_axes=_dynamic_axes(graph),
                              do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    model = onnx.load_from_string(buf.getvalue())
    model.doc_string = f"samantic {graph} graph"
    path = Path(path)
    _save_checked(onnx, model, path)
    return path


def class_queries(head) -> torch.Tensor:
    """``[C, D]`` Type-I queries of the head's own vocabulary (learned or from stored text embeddings)."""
    with torch.no_grad():
        return head.class_queries().detach().float().cpu()


def export_samcp(head, out_dir: Union[str, Path]) -> Dict[str, Path]:
    """Writes the three graphs and ``samcp_queries.safetensors`` into ``out_dir``."""
    from safetensors.numpy import save as st_save

    from samantic.io.atomic import atomic_write_bytes

    out_dir = Path(out_dir)
    paths = {g: export_samcp_graph(head, g, out_dir / f"{g}.onnx") for g in SAMCP_GRAPHS}
    tensors = {"class_queries": class_queries(head).numpy()}
    text = getattr(head, "text_embeddings", None)
    if text is not None:
        tensors["text_embeddings"] = text.detach().float().cpu().numpy()
    q = out_dir / "samcp_queries.safetensors"
    atomic_write_bytes(q, st_save(tensors, metadata={"names": json.dumps(list(head.info.names))}))
    paths["queries"] = q
    return paths


def samcp_manifest_entry(head, head_file: str, queries_file: str) -> Dict[str, object]:
    """The ``samcp`` section of a bundle manifest: vocabulary, input geometry, patch options, files."""
    from samantic.pipeline.panoptic import INFERENCE_KEY, parse_inference, patch_options

    info = head.info
    return {
        "classes": list(info.classes),
        "stuff": list(info.stuff),
        "input_size": int(info.input_size),
        "roi_size": int(info.roi_size),
        "mask_size": int(info.mask_side),  # side of the roi_masks input (the runtime resamples patches to it)
        "d_model": int(info.d_model),
        "model": info.model,
        "patches": patch_options(info),
        "inference": parse_inference(info.extra.get(INFERENCE_KEY)),
        "text_encoder": info.extra.get("text_encoder") or None,
        "file": head_file,
        "queries": queries_file,
        "graphs": list(SAMCP_GRAPHS),
    }

