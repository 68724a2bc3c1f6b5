"""benchmarks/hq_skip_ab.py: a decoder at stride 16 with a stride-8 skip, run by SamPredictor and the trainer alike."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import hq_skip_ab  # noqa: E402


def _random_nano():
    from samantic.models import create_model

    torch.manual_seed(0)
    return create_model("sam_nano", pretrained=False)


def test_the_candidate_starts_as_its_base_on_the_pooled_embedding():
    """skip_proj is zero at the start: the candidate's masks are the base decoder's on the stride-16 pooled tokens."""
    from samantic.train.sam import decode_prompts

    base = _random_nano()
    cand = hq_skip_ab.skip_model(base)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        packed = cand.image_encoder(x)
        e8 = base.image_encoder(x)
        assert packed.shape == (1, 5 * 128, 24, 24)
        assert torch.equal(packed[:, :128], F.avg_pool2d(e8, 2))
        assert torch.equal(F.pixel_shuffle(packed[:, 128:], 2), e8)  # the stride-8 embedding travels unchanged
        sparse, dense = cand.prompt_encoder(points=(torch.tensor([[[100.0, 120.0]]]), torch.tensor([[1]])),
                                            boxes=None, masks=None)
        pe = cand.prompt_encoder.get_dense_pe()
        masks, iou = cand.mask_decoder(packed, pe, sparse, dense, True)
        ref_masks, ref_iou = base.mask_decoder(packed[:, :128], pe, sparse, dense, True)  # segment-anything's own
    assert masks.shape == (1, 3, 96, 96)
    torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)
    # the trainer's batched path (decode_prompts) runs the same decoder, skip included
    torch.nn.init.normal_(cand.mask_decoder.skip_proj.weight, std=0.1)
    with torch.no_grad():
        fwd = cand.mask_decoder(packed, pe, sparse, dense, False)
        batched = decode_prompts(cand.mask_decoder, packed, pe, sparse, dense, False)
    assert not torch.allclose(fwd[0], ref_masks[:, :1], atol=1e-3)  # the skip now matters
    torch.testing.assert_close(fwd[0], batched[0])
    torch.testing.assert_close(fwd[1], batched[1])


def test_segment_anything_s_predictor_runs_the_candidate():
    cand = hq_skip_ab.skip_model(_random_nano())
    image = (np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)
    predictor = SamPredictor(cand)
    predictor.set_image(image)
    masks, scores, low = predictor.predict(point_coords=np.array([[150.0, 100.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 200, 300) and scores.shape == (3,) and low.shape == (3, 96, 96)
    assert hq_skip_ab.transformer_ms(cand, 24, prompts=2, seconds=0.05) > 0
