"""ONNX export of SAM for the runtime: image encoder, prompt graph (+ semantic head), upscale graph.

The decoder is exported as two graphs so that the runtime keeps the pipeline's
performance idea (decide first, upscale only the survivors):

``encoder.onnx``
    ``image`` float32 [1, 3, S, S] (normalized, padded) -> ``image_embeddings`` [1, C, h, w].
``prompts.onnx``
    ``image_embeddings`` [1, C, h, w], ``point_coords`` float32 [B, N, 2] (input frame, the
    caller appends the padding point (0, 0) with label -1, as segment-anything's ONNX model
    expects), ``point_labels`` float32 [B, N], ``task`` int32 [1] (SUM's task of every prompt,
    an index into :data:`~samantic.models.tasks.TASKS`; the table is a constant of the graph,
    zeros for a model without one) ->
    ``iou_predictions`` [B, M], ``mask_tokens`` [B, M, D], ``src`` [B, C, h, w] (the
    transformer's image embedding) and, with a head, ``class_logits`` [B, M, C' + 1].
``upscale.onnx``
    ``src`` [B, C, h, w], ``mask_tokens`` [B, M, D], ``rows`` int32 [U] (prompts with a survivor),
    ``token_index`` int32 [K] (``prompt * M + mask``), ``mask_index`` int32 [K], ``row_of`` int32 [K]
    (position of each survivor's prompt in ``rows``) -> ``low_res_logits`` [K, 4h, 4w].

Gathers happen inside the upscale graph, so with IO binding ``src`` and the
tokens never leave the device. Index inputs are int32 (TensorRT's native
index type); B, N, U and K are dynamic. The wrappers here are export-only
rewrites (segment-anything's ``SamOnnxModel`` pattern): boolean-mask
assignment becomes arithmetic, constants (dense positional encoding, the
no-mask embedding) are precomputed.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from samantic.models.tasks import TASKS
from samantic.pipeline.transformer import two_way_transformer

OPSET = 17  # LayerNormalization is native from 17; TensorRT 10 parses opsets 9-20
MULTIMASK = 3  # the pipeline always asks for SAM's three masks per prompt

ENCODER = "encoder"
PROMPTS = "prompts"
UPSCALE = "upscale"
GRAPHS = (ENCODER, PROMPTS, UPSCALE)

# dynamic dimension names; the TensorRT builder makes one optimization-profile entry per name
DYNAMIC_DIMS = {"prompts": "B", "points": "N", "rows": "U", "selected": "K"}


class EncoderOnnx(nn.Module):
    """The ViT image encoder on a preprocessed image."""

    def __init__(self, sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class PromptsOnnx(nn.Module):
    """Prompt encoder + two-way transformer (+ semantic head) for point prompts; no upscaling.

    Args:
        sam: a ``segment_anything.modeling.Sam``.
        head: optional module mapping mask tokens ``[B, M, D]`` to class logits ``[B, M, C + 1]``.
        task_input: take SUM's task as the ``task`` input. False: the graph of bundles from before
            task prompts (three inputs), which decodes every prompt as "unspecified".
    """

    def __init__(self, sam, head: Optional[nn.Module] = None, task_input: bool = True) -> None:
        super().__init__()
        pe = sam.prompt_encoder
        dec = sam.mask_decoder
        self.pe_layer = pe.pe_layer
        self.transformer = dec.transformer
        self.iou_prediction_head = dec.iou_prediction_head
        self.head = head
        self.input_h, self.input_w = (float(v) for v in pe.input_image_size)
        self.num_mask_tokens = dec.num_mask_tokens
        self.register_buffer("not_a_point", pe.not_a_point_embed.weight.detach().clone())
        self.register_buffer("neg_point", pe.point_embeddings[0].weight.detach().clone())
        self.register_buffer("pos_point", pe.point_embeddings[1].weight.detach().clone())
        self.register_buffer("output_tokens", torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0).detach().clone())
        with torch.no_grad():
            dense_pe = pe.get_dense_pe()  # [1, C, h, w], fixed for a fixed input size
            no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(dense_pe)
        self.register_buffer("dense_pe", dense_pe.detach().clone())
        self.register_buffer("no_mask", no_mask.detach().clone())
        table = getattr(sam, "task_prompt", None)
        table = table.embed.weight if table is not None else dense_pe.new_zeros(len(TASKS), dense_pe.shape[1])
        self.register_buffer("task_table", table.detach().clone())  # [T, C]
        self.task_input = task_input

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        coords = coords + 0.5  # centre of the pixel
        x = coords[..., 0:1] / self.input_w
        y = coords[..., 1:2] / self.input_h
        emb = self.pe_layer._pe_encoding(torch.cat([x, y], dim=-1))  # [B, N, C]
        labels = labels.unsqueeze(-1)
        pad = (labels == -1).to(emb.dtype)
        emb = emb * (1.0 - pad) + self.not_a_point * pad
        emb = emb + self.neg_point * (labels == 0).to(emb.dtype)
        return emb + self.pos_point * (labels == 1).to(emb.dtype)

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                task: Optional[torch.Tensor] = None):
        sparse = self.embed_points(point_coords, point_labels)
        b = sparse.shape[0]
        tokens = torch.cat([self.output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        _, c, h, w = self.dense_pe.shape
        # the dense prompt embedding: no mask prompt, plus the task's row of the table (a Gather on int32)
        row = torch.index_select(self.task_table, 0, task) if self.task_input else self.task_table[:1]
        dense = self.no_mask + row.reshape(1, c, 1, 1)
        # the image embedding is shared by every prompt, not repeated (see samantic.pipeline.transformer)
        # the IoU token and the multimask tokens 1..3 (rows 2..num_mask_tokens) are all that is read
        rows = [0] + list(range(2, 1 + self.num_mask_tokens))
        hs, src_out = two_way_transformer(self.transformer, image_embeddings + dense, self.dense_pe, tokens,
                                          out_tokens=rows)
        iou = self.iou_prediction_head(hs[:, 0, :])[:, 1:]
        mask_tokens = hs[:, 1:, :]
        src_out = src_out.transpose(1, 2).reshape(b, c, h, w)
        if self.head is None:
            return iou, mask_tokens, src_out
        return iou, mask_tokens, src_out, self.head(mask_tokens)


class UpscaleOnnx(nn.Module):
    """Output upscaling + hypernetworks for selected (prompt, mask) pairs (see the module docstring)."""

    def __init__(self, sam) -> None:
        super().__init__()
        dec = sam.mask_decoder
        self.output_upscaling = dec.output_upscaling
        # multimask outputs are mask tokens 1..3
        self.mlps = nn.ModuleList(dec.output_hypernetworks_mlps[i] for i in range(1, dec.num_mask_tokens))
        self.register_buffer("mask_ids", torch.arange(len(self.mlps), dtype=torch.int32))

    def forward(self, src, mask_tokens, rows, token_index, mask_index, row_of):
        upscaled = self.output_upscaling(torch.index_select(src, 0, rows))  # [U, c, H, W]
        u, c, hh, ww = upscaled.shape
        d = mask_tokens.shape[-1]
        tokens = torch.index_select(mask_tokens.reshape(-1, d), 0, token_index)  # [K, D]
        hyper = torch.stack([mlp(tokens) for mlp in self.mlps], dim=1)  # [K, M, c]
        onehot = (mask_index.unsqueeze(1) == self.mask_ids.unsqueeze(0)).to(hyper.dtype)
        hyper = (hyper * onehot.unsqueeze(-1)).sum(1)  # [K, c]
        maps = torch.index_select(upscaled.reshape(u, c, hh * ww), 0, row_of)  # [K, c, H*W]
        return torch.matmul(hyper.unsqueeze(1), maps).reshape(-1, hh, ww)


def _sample_inputs(sam, graph: str, head: Optional[nn.Module] = None, task_input: bool = True):
    s = int(sam.image_encoder.img_size)
    c = int(sam.prompt_encoder.embed_dim)
    h, w = sam.prompt_encoder.image_embedding_size
    d = int(sam.mask_decoder.transformer_dim)
    if graph == ENCODER:
        return (torch.randn(1, 3, s, s),)
    if graph == PROMPTS:
        b = 3
        coords = torch.rand(b, 2, 2) * s
        labels = torch.tensor([[1.0, -1.0]] * b)
        task = (torch.tensor([1], dtype=torch.int32),) if task_input else ()
        return (torch.randn(1, c, h, w), coords, labels, *task)
    b, k = 3, 4
    return (torch.randn(b, c, h, w), torch.randn(b, MULTIMASK, d), torch.tensor([0, 2], dtype=torch.int32),
            torch.tensor([0, 1, 6, 8], dtype=torch.int32), torch.tensor([0, 1, 0, 2], dtype=torch.int32),
            torch.tensor([0, 0, 1, 1], dtype=torch.int32)[:k])


IO_NAMES = {
    ENCODER: (["image"], ["image_embeddings"]),
    PROMPTS: (["image_embeddings", "point_coords", "point_labels", "task"], ["iou_predictions", "mask_tokens", "src"]),
    UPSCALE: (["src", "mask_tokens", "rows", "token_index", "mask_index", "row_of"], ["low_res_logits"]),
}


def _dynamic_axes(graph: str, head: bool) -> Dict[str, Dict[int, str]]:
    B, N, U, K = (DYNAMIC_DIMS[k] for k in ("prompts", "points", "rows", "selected"))
    if graph == ENCODER:
        return {}
    if graph == PROMPTS:
        axes = {"point_coords": {0: B, 1: N}, "point_labels": {0: B, 1: N}, "iou_predictions": {0: B},
                "mask_tokens": {0: B}, "src": {0: B}}
        if head:
            axes["class_logits"] = {0: B}
        return axes
    return {"src": {0: B}, "mask_tokens": {0: B}, "rows": {0: U}, "token_index": {0: K}, "mask_index": {0: K},
            "row_of": {0: K}, "low_res_logits": {0: K}}


def export_graph(sam, graph: str, path: Union[str, Path], head: Optional[nn.Module] = None,
                 task_input: bool = True) -> Path:
    """Exports one graph (``"encoder"``, ``"prompts"``, ``"upscale"``) to ``path`` and checks it.

    Args:
        sam: the model.
        graph: which graph.
        path: the ``.onnx`` file to write.
        head: a semantic head riding in the prompts graph.
        task_input: the prompts graph takes SUM's ``task`` (see :class:`PromptsOnnx`).

    Returns:
        The written path. The graph passes ``onnx.checker.check_model(full_check=True)``.

    Raises:
        ValueError: unknown graph name.
        ImportError: onnx missing.
    """
    onnx = _import_onnx()
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    module = {ENCODER: lambda: EncoderOnnx(sam), PROMPTS: lambda: PromptsOnnx(sam, head, task_input),
              UPSCALE: lambda: UpscaleOnnx(sam)}[graph]().eval()
    inputs, outputs = IO_NAMES[graph]
    if graph == PROMPTS and not task_input:
        inputs = [n for n in inputs if n != "task"]
    outputs = list(outputs) + (["class_logits"] if graph == PROMPTS and head is not None else [])
    path = Path(path)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter notices
        torch.onnx.export(module, _sample_inputs(sam, graph, head, task_input), buf, dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs, dynamic_axes=_dynamic_axes(graph, head is not None),
                          do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    model.doc_string = f"samantic {graph} graph"
    _save_checked(onnx, model, path)
    return path


def _save_checked(onnx, model, path: Path) -> None:
    """Checks (full, with shape inference) and writes atomically; >2 GB graphs would need external data."""
    from samantic.io.atomic import atomic_write_bytes

    data = model.SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / path.name
        probe.write_bytes(data)
        onnx.checker.check_model(str(probe), full_check=True)
    atomic_write_bytes(path, data)


def export_onnx(sam, out_dir: Union[str, Path], head: Optional[nn.Module] = None,
                graphs: Sequence[str] = GRAPHS) -> Dict[str, Path]:
    """Exports the runtime's graphs of a ``Sam`` (and head) into ``out_dir`` as ``<graph>.onnx``."""
    out_dir = Path(out_dir)
    return {g: export_graph(sam, g, out_dir / f"{g}.onnx", head=head if g == PROMPTS else None) for g in graphs}


def quantize_int8(src: Union[str, Path], dst: Union[str, Path]) -> Path:
    """onnxruntime dynamic INT8 quantization (weights int8, activations quantized at run time) of one graph.

    MatMul/Gemm weights become int8 (per tensor, 7-bit range); convolutions stay
    float (ConvInteger is slow or missing on several execution providers). The
    reduced range matters on CPUs without VNNI (AVX2): their u8 x s8 kernels
    saturate 16-bit sums with full-range weights, which cost sam_nano's encoder
    ~6 % relative error against ~0.5 % with ``reduce_range``.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise ImportError("INT8 quantization needs: pip install 'samantic[export]'") from e
    import logging

    from samantic.io.atomic import atomic_write_bytes

    dst = Path(dst)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing suggestion on the root logger
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / dst.name
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=False, reduce_range=True,
                             op_types_to_quantize=["MatMul", "Gemm"])
            atomic_write_bytes(dst, out.read_bytes())
    finally:
        root.setLevel(level)
    return dst


def _import_onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs: pip install 'samantic[export]'") from e
    return onnx
