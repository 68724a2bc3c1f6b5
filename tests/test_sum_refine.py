"""SUM's mask-refinement module, the uncertainty map it gives and the AUROC that scores it."""

import itertools

import numpy as np
import pytest
import torch

from samantic.train.sum import LabelledScenes, PseudoLabelCache, UnlabelledPool
from samantic.train.sum_refine import (BinnedAuroc, MaskRefiner, RefinerConfig, UncertaintyEstimator, auroc,
                                       evaluate_uncertainty, load_refiner, refiner_examples, sam_view, save_refiner,
                                       train_refiner)

SIZE = (96, 128)


@pytest.fixture(scope="module")
def nano():
    from samantic.models import create_model

    return create_model("sam_nano").eval()


@pytest.fixture(scope="module")
def examples(nano):
    return refiner_examples(nano, LabelledScenes(3000000, 3, size=SIZE), per_image=6, progress=False)


def test_auroc_matches_counting_pairs_and_the_binned_version_matches_binned_scores():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 2)  # ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert auroc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)
    assert auroc(labels.astype(float), labels) == 1.0 and auroc(1.0 - labels, labels) == 0.0
    assert np.isnan(auroc(scores, np.zeros(300, bool)))
    scores = 10.0 ** rng.uniform(-12, 0, 5000)
    binned = BinnedAuroc(bins=256)
    binned.update(scores[:2000], labels.repeat(17)[:2000])
    binned.update(scores[2000:], labels.repeat(17)[2000:5000])
    assert binned.value() == pytest.approx(auroc(binned.bin(scores), labels.repeat(17)[:5000]), abs=1e-12)
    assert abs(binned.value() - auroc(scores, labels.repeat(17)[:5000])) < 0.01


def test_untrained_refiner_returns_sams_mask_and_survives_a_round_trip(tmp_path):
    torch.manual_seed(0)
    refiner = MaskRefiner(RefinerConfig(embed_dim=16)).eval()
    image, logits = torch.randn(2, 3, 32, 32), torch.randn(2, 32, 32) * 20
    with torch.no_grad():
        out = refiner(image, logits, torch.randn(2, 16, 8, 8))
        assert torch.equal(out, logits.clamp(-8, 8))  # the last layer starts at zero
        torch.nn.init.normal_(refiner.head.weight)
        out = refiner(image, logits, torch.randn(2, 16, 5, 5))  # an embedding of another size is resized
    assert out.shape == (2, 32, 32) and not torch.equal(out, logits.clamp(-8, 8))
    path = save_refiner(refiner, tmp_path / "r.safetensors", {"model": "sam_nano"})
    again = load_refiner(path)
    assert again.config == refiner.config
    e = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(image, logits, e), refiner(image, logits, e))
    with pytest.raises(ValueError, match="widths"):
        RefinerConfig(widths=(8, 16))


def test_refiner_examples_pair_sams_outputs_with_labelled_masks(nano, examples):
    low = nano.prompt_encoder.mask_input_size[0]
    assert len(examples.images) == 3 and examples.images.shape[1:] == (3, low, low)
    assert examples.embeddings.shape[1:] == (128, low // 4, low // 4)
    assert examples.coarse.shape == examples.target.shape == (len(examples), low, low)
    assert examples.owner.max() < 3 and set(examples.prompt.tolist()) <= {0, 1, 2}
    # the recorded overlap is the IoU of SAM's mask and the target, and reaches min_match
    for k in range(len(examples)):
        a, b = examples.coarse[k].float() > 0, examples.target[k] > 128  # soft > 0.5 (quarters: 128 is 0.5)
        iou = (a & b).sum() / (a | b).sum()
        assert examples.coarse_iou[k] >= 0.3 and abs(float(iou) - float(examples.coarse_iou[k])) < 1e-3
    # the image area of the frame is where the examples live
    hl, wl = examples.valid[0].tolist()
    assert (examples.target[examples.owner == 0][:, hl:] == 0).all()


def test_refiner_training_fits_its_examples(examples):
    from samantic.train.sum_refine import RefinerExamples, _valid_mask, refiner_loss

    k = slice(0, 8)
    few = RefinerExamples(examples.images, examples.embeddings, examples.valid, examples.coarse[k],
                          examples.target[k], examples.owner[k], examples.prompt[k], examples.coarse_iou[k])
    config = RefinerConfig(embed_dim=128, widths=(4, 8, 8))

    def loss(refiner):
        own = few.owner
        with torch.no_grad():
            out = refiner(few.images[own].float(), few.coarse.float(), few.embeddings[own].float())
            return float(refiner_loss(out, few.target.float() / 255, _valid_mask(few.valid[own], out.shape[-1])))

    before = loss(MaskRefiner(config).eval())  # an untrained refiner returns SAM's (clamped) logits
    refiner, history = train_refiner(few, config, steps=80, batch_size=8, lr=5e-3, progress=False)
    assert history[-1]["step"] == 80 and not refiner.training
    assert loss(refiner) < 0.8 * before


def test_uncertainty_map_and_its_evaluation(nano, tmp_path):
    torch.manual_seed(0)
    refiner = MaskRefiner()
    with torch.no_grad():
        torch.nn.init.normal_(refiner.head.weight, std=0.5)
    pool = UnlabelledPool(0, 2, size=(160, 200))
    cache = PseudoLabelCache(tmp_path, nano, points_per_side=6, pred_iou_thresh=0.3, stability_score_thresh=0.8)
    estimator = UncertaintyEstimator(nano, refiner)
    labels = cache.get_or_compute(pool[0])
    assert len(labels) > 0
    u = estimator(pool[0], labels)
    sam, refined = estimator.logits(pool[0], labels)
    assert u.shape == (len(labels), 160, 200) and u.min() >= 0 and u.max() <= 1
    assert np.allclose(u, (torch.sigmoid(sam) - torch.sigmoid(refined)).abs().numpy())
    assert ((sam > 0).numpy() == labels.masks()).all()
    assert sam_view(nano, pool[0]).valid == (154, 192)  # 160 x 200 -> 307 x 384 in the input frame, / 2
    result = evaluate_uncertainty(estimator, pool, cache, progress=False)
    assert result["masks"] > 0 and result["images"] == 2
    for region in ("image", "near"):
        assert 0 < result["error_fraction"][region] < 1
        for value in result["auroc"][region].values():
            assert 0.0 <= value <= 1.0
    assert result["error_fraction"]["near"] > result["error_fraction"]["image"]
    assert 0 < result["pseudo_iou"] <= 1 and 0 <= result["refined_iou"] <= 1
