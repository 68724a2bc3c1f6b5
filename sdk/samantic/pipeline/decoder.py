"""SAM's prompt encoder + mask decoder, split so masks are upscaled only for survivors.

segment-anything's ``MaskDecoder.predict_masks`` runs the two-way transformer,
then upscales the image embedding and applies the hypernetworks for every
prompt, and predicts IoU from the IoU token. The IoU (and any head reading the
mask tokens) needs only the transformer's output, so :class:`PromptMaskDecoder`
stops there; :meth:`PromptMaskDecoder.masks` computes the low-res logits of the
selected (prompt, mask) pairs only, with the same modules and weights. The
transformer itself runs through :func:`samantic.pipeline.transformer.two_way_transformer`,
which does not copy the image embedding per prompt. On the CPU the upscaling of segment-anything's decoder
(2 x 2 stride-2 transposed convolutions, LayerNorm2d, activations) runs pixel by pixel on channels-last rows, one
prompt at a time, equal up to float rounding and 2.9-3.9x faster than the modules (``benchmarks/upscale_path.py``:
segment-everything 1.6-1.8x faster end to end in the 7 of 10 cases with 4 or more final masks). A model with SUM's task table
(``sam.task_prompt``) gets the task's embedding added to the dense prompt embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from samantic.models.task_prompt import add_task
from samantic.pipeline.transformer import two_way_transformer


@dataclass
class DecoderOutput:
    """Transformer outputs for a batch of B prompts and M masks per prompt.

    Attributes:
        iou_preds: Tensor[B, M], the IoU head's prediction per mask.
        mask_tokens: Tensor[B, M, D], the transformer's output mask tokens (what heads read).
        token_index: Tensor[M], index of each output among the decoder's mask tokens.
        src: Tensor[B, C, h, w], the transformer's per-prompt image embedding (input of upscaling).
    """

    iou_preds: torch.Tensor
    mask_tokens: torch.Tensor
    token_index: torch.Tensor
    src: torch.Tensor


class PromptMaskDecoder:
    """Runs a segment-anything ``Sam``'s prompt encoder and mask decoder on point prompts.

    Args:
        model: a ``segment_anything.modeling.Sam``.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.decoder = model.mask_decoder
        self.prompt_encoder = model.prompt_encoder

    @torch.no_grad()
    def run(self, image_embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
            multimask_output: bool = True, task: Union[str, int] = 0) -> DecoderOutput:
        """Transformer pass for point prompts.

        Args:
            image_embedding: Tensor[1, C, h, w] from the image encoder.
            coords: Tensor[B, N, 2] point coordinates in the model's input frame (after ResizeLongestSide).
            labels: Tensor[B, N] point labels (1 foreground, 0 background).
            multimask_output: three masks per prompt (tokens 1..3) or one (token 0), as in ``MaskDecoder``.
            task: SUM task of every prompt, a name or index (see :mod:`samantic.models.tasks`);
                without a task table on the model every task decodes as the base model.
        """
        dec = self.decoder
        sparse, dense = self.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)
        dense = dense[:1]  # no mask prompts: every prompt's dense embedding is ``no_mask_embed``
        dense = add_task(dense, task, getattr(self.model, "task_prompt", None))  # one task for the batch
        b = tokens.shape[0]
        _, c, h, w = image_embedding.shape
        # the image is not repeated per prompt (see samantic.pipeline.transformer)
        token_index = torch.arange(1, dec.num_mask_tokens) if multimask_output else torch.arange(0, 1)
        # only the IoU token and the mask tokens of the requested outputs leave the transformer
        rows = [0] + (token_index + 1).tolist()
        hs, src = two_way_transformer(dec.transformer, image_embedding + dense, self.prompt_encoder.get_dense_pe(),
                                      tokens, out_tokens=rows)
        iou_all = dec.iou_prediction_head(hs[:, 0, :])
        return DecoderOutput(
            iou_preds=iou_all[:, token_index],
            mask_tokens=hs[:, 1:],
            token_index=token_index,
            src=src.transpose(1, 2).unflatten(2, (h, w)),  # a view: only the upscaled prompts get copied
        )

    @torch.no_grad()
    def masks(self, out: DecoderOutput, prompt_idx: torch.Tensor, mask_idx: torch.Tensor) -> torch.Tensor:
        """Low-res mask logits for selected (prompt, mask) pairs.

        Args:
            out: a :meth:`run` result.
            prompt_idx: Tensor[K] prompt of each selected mask.
            mask_idx: Tensor[K] output index (0..M-1) of each selected mask.

        Returns:
            Tensor[K, 4h, 4w] float32 logits, equal to the reference decoder's for those masks.

        Raises:
            IndexError: ``prompt_idx`` and ``mask_idx`` differ in length, or an index is out of range.
        """
        dec = self.decoder
        k = int(prompt_idx.numel())
        b, m = out.mask_tokens.shape[:2]
        if int(mask_idx.numel()) != k:
            raise IndexError(f"prompt_idx and mask_idx must have one length, got {k} and {int(mask_idx.numel())}")
        if k and not (0 <= int(prompt_idx.min()) and int(prompt_idx.max()) < b
                      and 0 <= int(mask_idx.min()) and int(mask_idx.max()) < m):
            raise IndexError(f"prompt_idx must lie in [0, {b}) and mask_idx in [0, {m}), got prompts "
                             f"{int(prompt_idx.min())}..{int(prompt_idx.max())} and masks "
                             f"{int(mask_idx.min())}..{int(mask_idx.max())}")
        if k == 0:
            side = out.src.shape[-1] * 4
            return out.src.new_zeros((0, out.src.shape[-2] * 4, side))
        uniq, inverse = torch.unique(prompt_idx, sorted=True, return_inverse=True)
        hyper = _hypernetwork_rows(dec, out, prompt_idx, mask_idx)  # [K, c]
        layers = _pixelwise_upscaling(dec.output_upscaling, out.src)
        if layers is not None:
            return _upscaled_logits_per_prompt(layers, out, uniq, inverse, hyper)
        upscaled = dec.output_upscaling(out.src[uniq])  # [U, c, H, W], only for prompts with survivors
        u, c, hh, ww = upscaled.shape
        per_prompt = upscaled.new_zeros((u, m, c))
        per_prompt[inverse, mask_idx] = hyper
        logits = (per_prompt @ upscaled.view(u, c, hh * ww)).view(u, m, hh, ww)
        return logits[inverse, mask_idx]


def _hypernetwork_rows(dec, out: DecoderOutput, prompt_idx: torch.Tensor, mask_idx: torch.Tensor) -> torch.Tensor:
    """Tensor[K, c]: the hypernetwork output of each selected (prompt, mask) pair, one MLP call per output token."""
    hyper = None
    for j in range(out.mask_tokens.shape[1]):
        sel = torch.nonzero(mask_idx == j).flatten()
        if sel.numel():
            mlp = dec.output_hypernetworks_mlps[int(out.token_index[j])]
            rows = mlp(out.mask_tokens[prompt_idx[sel], j])
            if hyper is None:
                hyper = rows.new_zeros((int(mask_idx.numel()), rows.shape[-1]))
            hyper[sel] = rows
    return hyper


# Elementwise activations: they commute with any re-arrangement of the pixels and channels.
_ELEMENTWISE = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Identity)


def _pixelwise_upscaling(upscaling: nn.Module, src: torch.Tensor) -> Optional[Tuple[nn.Module, ...]]:
    """The layers of segment-anything's ``output_upscaling`` when the CPU path of :meth:`PromptMaskDecoder.masks` may
    compute it pixel by pixel, else None (any other module, device or dtype takes the modules as they are).

    ``ConvTranspose2d(k=2, s=2) -> LayerNorm2d -> act -> ConvTranspose2d(k=2, s=2) -> act``: a 2 x 2 stride-2
    transposed convolution maps each input pixel to its own 2 x 2 output block, so every output pixel of the 4x
    upscaling depends on one pixel of the embedding only. The whole chain is then two matrix products on
    channels-last rows, a LayerNorm over the channels and the activations, and the mask logits a third product
    with the hypernetwork outputs.
    """
    from segment_anything.modeling.common import LayerNorm2d

    if src.device.type != "cpu" or src.dtype != torch.float32 or torch.is_grad_enabled():  # grad: a direct caller
        return None
    if type(upscaling) is not nn.Sequential or len(upscaling) != 5:
        return None
    c1, ln, a1, c2, a2 = upscaling
    for conv in (c1, c2):
        if (type(conv) is not nn.ConvTranspose2d or conv.kernel_size != (2, 2) or conv.stride != (2, 2)
                or conv.padding != (0, 0) or conv.output_padding != (0, 0) or conv.dilation != (1, 1)
                or conv.groups != 1 or conv.bias is None):
            return None
    if type(ln) is not LayerNorm2d or type(a1) not in _ELEMENTWISE or type(a2) not in _ELEMENTWISE:
        return None
    if ln.weight.shape[0] != c1.out_channels or c2.in_channels != c1.out_channels:
        return None
    return c1, ln, a1, c2, a2


def _blocks(conv: nn.ConvTranspose2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """A 2 x 2 stride-2 transposed convolution as ``rows [N, Cin] @ W [Cin, 4*Cout] + b``, columns (ky, kx, c)."""
    cin, cout = conv.weight.shape[:2]
    return conv.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout), conv.bias.repeat(4)


def _upscaled_logits_per_prompt(layers, out: DecoderOutput, uniq: torch.Tensor, inverse: torch.Tensor,
                                hyper: torch.Tensor) -> torch.Tensor:
    """:meth:`PromptMaskDecoder.masks` on the CPU: the upscaling (see :func:`_pixelwise_upscaling`) one prompt at a
    time on channels-last rows, so each step's [h*w*16, c] block stays in cache instead of five passes over
    [U, c, 4h, 4w] tensors; equal to the modules up to float rounding."""
    c1, ln, a1, c2, a2 = layers
    w1, b1 = _blocks(c1)
    w2, b2 = _blocks(c2)
    mid, last = c1.out_channels, c2.out_channels
    _, _, h, w = out.src.shape
    rows = out.src.flatten(2).transpose(1, 2)  # [B, h*w, C]: the transformer's own layout, no copy
    k = int(hyper.shape[0])
    logits = out.src.new_empty((k, h * w * 16))
    for u in range(int(uniq.numel())):
        pairs = torch.nonzero(inverse == u).flatten()
        x = torch.addmm(b1, rows[int(uniq[u])], w1).view(-1, mid)  # [h*w*4, mid], rows (y, x, ky1, kx1)
        x = a1(F.layer_norm(x, (mid,), ln.weight, ln.bias, ln.eps))
        x = a2(torch.addmm(b2, x, w2).view(-1, last))  # [h*w*16, last], rows (y, x, ky1, kx1, ky2, kx2)
        logits[pairs] = hyper[pairs] @ x.T
    # output pixel (4y + 2 ky1 + ky2, 4x + 2 kx1 + kx2), in two re-arrangements of 16-byte and 4-byte runs
    blocks = logits.view(k, h, w, 2, 2, 4).permute(0, 1, 3, 2, 4, 5).reshape(k, 2 * h, 2 * w, 2, 2)
    return blocks.permute(0, 1, 3, 2, 4).reshape(k, 4 * h, 4 * w)
