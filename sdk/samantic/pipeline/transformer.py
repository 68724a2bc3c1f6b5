"""SAM's two-way transformer for a batch of prompts on one image, without per-prompt copies of the image.

segment-anything's ``TwoWayTransformer`` is run on the image embedding repeated
once per prompt, and most of its time goes into linear projections of the
h*w image tokens for every prompt (keys and values of the token-to-image
attention, queries and output of the image-to-token attention). The prompts
bring only T tokens each (the IoU token, the mask tokens and the points), so
every one of those projections can be moved to the token side by
associativity: with H heads the image tokens meet H*T vectors of the model's
width instead of an internal_dim-wide projection (2.3x fewer multiply-adds for
SAM's decoders), and the first layer, whose image tokens are the same for every
prompt, does its image-side products once for the whole batch.

:func:`two_way_transformer` computes the same function from the same modules
and weights; results differ from the reference only by float rounding.
The rewrites, per attention with weights ``W_q, W_k, W_v, W_o`` and heads ``h``:

- token-to-image: ``q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x + const`` (the
  constant drops out of the softmax), and ``sum_n p_n (W_v,h x_n + b_v,h) =
  W_v,h (sum_n p_n x_n) + b_v,h`` since each softmax row sums to one.
- image-to-token: ``(W_q,h x + b_q,h) . k_h = x . (W_q,h^T k_h) + b_q,h . k_h``, and
  ``W_o (concat_h sum_t p_ht v_ht) + b_o = sum_h sum_t p_ht (W_o,h v_ht + b_o / H)``.

Things that are not algebra but memory layout (1.3x, then another 1.3-1.5x, on the
whole transformer on 2 CPU cores): the image-to-token scores are kept token-major (a softmax over
the T = 7 prompt tokens along a 7-wide last axis is several times slower than
along a strided one), and bias adds and the block's skip connection go into
the matrix products (``addmm`` / ``baddbmm``) instead of separate passes over
B x h*w x C tensors. Once the image tokens are per prompt (after the first
layer), their positional encoding is not added to them (another B x h*w x C
pass): it is shared, so its share of every score product is one product for
the whole batch, and the block's skip connection is accumulated in place into
keys nobody reads again (not while autograd or an ONNX export traces).
The last token-to-image attention runs only for the
output tokens the caller reads (``out_tokens``): each query row is independent.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def _heads(x: Tensor, heads: int) -> Tensor:
    """``[B, T, H*d]`` -> ``[H, B*T, d]``."""
    b, t, i = x.shape
    return x.reshape(b * t, heads, i // heads).transpose(0, 1)


def _per_prompt(x: Tensor, b: int, t: int) -> Tensor:
    """``[H, B*T, C]`` -> ``[B, H*T, C]``."""
    h, _, c = x.shape
    return x.view(h, b, t, c).transpose(0, 1).reshape(b, h * t, c)


def _image_product(a: Tensor, img: Tensor) -> Tensor:
    """``a [B, M, C] @ img[b]^T`` for image tokens ``img`` of batch 1 (shared) or B; returns ``[B, M, N]``."""
    if img.shape[0] == 1:
        b, m, c = a.shape
        return (a.reshape(b * m, c) @ img[0].t()).view(b, m, -1)
    return torch.bmm(a, img.transpose(1, 2))


def _pool_image(p: Tensor, img: Tensor) -> Tensor:
    """``p [B, M, N] @ img[b]`` for image tokens of batch 1 (shared) or B; returns ``[B, M, C]``."""
    if img.shape[0] == 1:
        b, m, n = p.shape
        return (p.reshape(b * m, n) @ img[0]).view(b, m, -1)
    return torch.bmm(p, img)


def _apart(x: Tensor, pe: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """``(x, pe)`` for a product with ``x + pe``: a batch-1 encoding of per-prompt tokens stays apart (its
    share of the product is one product for the whole batch); otherwise it is added here."""
    if pe is None or (x.shape[0] > 1 and pe.shape[0] == 1):
        return x, pe
    return x + pe, None


def token_to_image(attn, q: Tensor, k: Tensor, v: Tensor, k_pe: Optional[Tensor] = None) -> Tensor:
    """``attn(q=q, k=k + k_pe, v=v)`` for a segment-anything ``Attention`` whose keys/values are image tokens.

    Args:
        attn: ``segment_anything.modeling.transformer.Attention``.
        q: Tensor[B, T, C] prompt tokens.
        k: Tensor[1 or B, N, C] image tokens (plus positional encoding, unless ``k_pe`` is given).
        v: Tensor[1 or B, N, C] image tokens.
        k_pe: optional Tensor[1 or B, N, C] positional encoding of the keys. A batch-1 encoding of
            per-prompt keys is shared: its share of the scores is one product for the whole batch,
            instead of a B x N x C sum.

    Returns:
        Tensor[B, T, C].
    """
    heads, c = attn.num_heads, attn.embedding_dim
    d = attn.internal_dim // heads
    b, t, _ = q.shape
    qh = _heads(attn.q_proj(q), heads)  # [H, B*T, d]
    # fold W_k into the queries; b_k adds a per-row constant, which softmax ignores
    qk = _per_prompt(torch.matmul(qh, attn.k_proj.weight.view(heads, d, c)) / (d**0.5), b, t)  # [B, H*T, C]
    k, k_pe = _apart(k, k_pe)
    if k_pe is None:
        scores = _image_product(qk, k)
    else:
        scores = torch.baddbmm(_image_product(qk, k_pe), qk, k.transpose(1, 2))
    p = torch.softmax(scores, dim=-1)  # [B, H*T, N]
    pooled = _pool_image(p, v)  # [B, H*T, C]
    pooled = pooled.view(b, heads, t, c).transpose(0, 1).reshape(heads, b * t, c)
    out = torch.matmul(pooled, attn.v_proj.weight.view(heads, d, c).transpose(1, 2))  # [H, B*T, d]
    out = out + attn.v_proj.bias.view(heads, 1, d)
    return attn.out_proj(out.transpose(0, 1).reshape(b, t, heads * d))


def image_to_token(attn, q: Tensor, k: Tensor, v: Tensor, residual: Optional[Tensor] = None,
                   q_pe: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
    """``attn(q=q + q_pe, k=k, v=v)`` (plus ``residual``) for a segment-anything ``Attention`` whose queries are image tokens.

    Args:
        attn: ``segment_anything.modeling.transformer.Attention``.
        q: Tensor[1 or B, N, C] image tokens (plus positional encoding, unless ``q_pe`` is given).
        k: Tensor[B, T, C] prompt tokens plus their positional encoding.
        v: Tensor[B, T, C] prompt tokens.
        residual: Tensor[1 or B, N, C] added to the result inside the last product (the block's skip connection).
        q_pe: optional Tensor[1 or B, N, C] positional encoding of the queries (shared like
            ``token_to_image``'s ``k_pe``).
        inplace: the result may be written into ``residual`` (a per-prompt tensor the caller no longer needs),
            which saves a copy of B x N x C.

    Returns:
        Tensor[B, N, C].

    The scores are laid out token-major, ``[.., T, H]``: a softmax over the T
    prompt tokens then runs along a strided axis instead of a 7-wide last
    axis, which is several times faster on CPU. The bias ``b_q . k`` enters
    as the input of the score product, and the output bias as ``b_o / H`` on
    every value row (each head's attention row sums to one, so H rows give
    ``b_o``), which keeps every bias add inside a matrix product.
    """
    heads, c = attn.num_heads, attn.embedding_dim
    d = attn.internal_dim // heads
    b, t, _ = k.shape
    n = q.shape[1]
    kh = attn.k_proj(k).view(b * t, heads, d)  # token-major: row (b, t), then head
    scale = d**-0.5
    # fold W_q into the keys; b_q . k is one bias per (prompt, token, head)
    qk = torch.matmul(kh.transpose(0, 1), attn.q_proj.weight.view(heads, d, c)).transpose(0, 1) * scale  # [B*T, H, C]
    bias = (kh * attn.q_proj.bias.view(1, heads, d)).sum(-1) * scale  # [B*T, H]
    # fold W_o into the values: W_o (concat_h p_h @ v_h) = sum_h p_h @ (v_h W_o,h^T)
    vh = attn.v_proj(v).view(b * t, heads, d)
    vo = torch.matmul(vh.transpose(0, 1), attn.out_proj.weight.view(c, heads, d).permute(1, 2, 0)).transpose(0, 1)
    vo = vo + attn.out_proj.bias / heads  # [B*T, H, C]
    # the softmax runs over the T prompt tokens; torch is fastest along a strided axis (token-major
    # rows (t, h)), onnxruntime along the last one (rows (h, t)), so an ONNX export takes that layout
    last = torch.onnx.is_in_onnx_export()
    if last:
        qk = qk.view(b, t, heads, c).transpose(1, 2)
        bias = bias.view(b, t, heads).transpose(1, 2)
        vo = vo.view(b, t, heads, c).transpose(1, 2)
    rows, axis = ((heads, t), 3) if last else ((t, heads), 2)
    qk = qk.reshape(b * t * heads, c)
    vo = vo.reshape(b, t * heads, c)
    q, q_pe = _apart(q, q_pe)
    if q.shape[0] == 1:
        scores = torch.addmm(bias.reshape(-1), q[0], qk.t())  # [N, B*T*H]
        p = torch.softmax(scores.view(n, b, *rows), dim=axis).view(n, b, t * heads).transpose(0, 1)  # strided, no copy
    else:
        if q_pe is None:
            start = bias.reshape(b, 1, t * heads)
        else:  # the shared positional encoding's scores, [N, B*T*H] -> [B, N, T*H], plus the bias
            pe_scores = torch.addmm(bias.reshape(-1), q_pe[0], qk.t())
            start = pe_scores.view(n, b, t * heads).transpose(0, 1)
        scores = torch.baddbmm(start, q, qk.view(b, t * heads, c).transpose(1, 2))
        p = torch.softmax(scores.view(b, n, *rows), dim=axis).view(b, n, t * heads)
    if residual is None:
        return torch.bmm(p, vo)
    if inplace and residual.shape[0] == b and residual.is_contiguous() and residual.dtype == p.dtype == vo.dtype:
        return residual.baddbmm_(p, vo)
    return torch.baddbmm(residual, p, vo)


def two_way_transformer(transformer, image_embedding: Tensor, image_pe: Tensor,
                        point_embedding: Tensor, out_tokens: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
    """segment-anything's ``TwoWayTransformer.forward`` for B prompts on one image.

    Args:
        transformer: ``segment_anything.modeling.TwoWayTransformer``.
        image_embedding: Tensor[1, C, h, w], the image embedding (plus the dense prompt embedding),
            shared by every prompt; a batch of B is accepted too.
        image_pe: Tensor[1, C, h, w] positional encoding of the image tokens.
        point_embedding: Tensor[B, T, C] tokens of each prompt.
        out_tokens: indices of the output tokens the caller reads (default: all T). The last
            token-to-image attention and norm act on each token alone, so they run for these only.

    Returns:
        (queries Tensor[B, T or len(out_tokens), C], keys Tensor[B, h*w, C]) as ``transformer(...)``
        returns them for the image embedding repeated B times.
    """
    keys = image_embedding.flatten(2).transpose(1, 2)  # [1, N, C]
    key_pe = image_pe.flatten(2).transpose(1, 2)
    # keys made by a layer below (not the caller's tensor) may take the next skip connection in place,
    # unless autograd or an exporter needs them
    own = False
    may_overwrite = not (torch.is_grad_enabled() or torch.is_autocast_enabled() or torch.jit.is_tracing()
                         or torch.onnx.is_in_onnx_export())
    queries, query_pe = point_embedding, point_embedding
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        # the keys' positional encoding goes in separately: per-prompt keys never get a B x N x C sum
        queries = layer.norm2(queries + token_to_image(layer.cross_attn_token_to_image, queries + query_pe, keys, keys,
                                                       key_pe))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(image_to_token(layer.cross_attn_image_to_token, keys, queries + query_pe, queries, keys,
                                          q_pe=key_pe, inplace=own and may_overwrite))
        own = True
    if keys.shape[0] != queries.shape[0]:  # no layers: keys were never made per prompt
        keys = keys.expand(queries.shape[0], -1, -1)
    if out_tokens is not None:
        rows = list(out_tokens)
        queries, query_pe = queries[:, rows], query_pe[:, rows]
    attn = token_to_image(transformer.final_attn_token_to_image, queries + query_pe, keys, keys, key_pe)
    return transformer.norm_final_attn(queries + attn), keys
