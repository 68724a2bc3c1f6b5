"""SAM-CP model: shapes and padding, the affinity's start and residual, gradients, text queries,
attention masks, mask-RoI inputs, the head file, and a tiny overfit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samantic.heads.samcp import (FpnBackbone, SamcpHead, SamcpInfo, SmallCnn, affinity_attention_mask, load_samcp,
                                  mask_to_roi, save_samcp)

CLASSES = ("circle", "star")
STUFF = ("wall",)
C = len(CLASSES) + len(STUFF)


@pytest.fixture(autouse=True)
def _tiny_models_one_thread(one_thread):
    """these models are tiny: on a shared CPU, intra-op threads cost far more than they bring"""


def tiny_info(**kw) -> SamcpInfo:
    cfg = dict(classes=CLASSES, stuff=STUFF, d_model=32, layers=2, heads=4, encoder_layers=1, ffn_dim=64,
               roi_channels=8, backbone_channels=(8, 16, 16, 32), canonical_box=32.0, input_size=0)
    cfg.update(kw)
    return SamcpInfo(**cfg)


def random_patches(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (size - 20)
    wh = 4 + torch.rand(n, 2, generator=g) * 16
    boxes = torch.cat([xy, xy + wh], 1)
    masks = (torch.rand(n, 7, 7, generator=g) > 0.3).float()
    return boxes, masks


@pytest.fixture()
def head():
    torch.manual_seed(0)
    h = SamcpHead(tiny_info()).eval()
    # move the zero-initialised affinity deltas off zero so that every path is exercised
    with torch.no_grad():
        for a in h.affinity:
            a.head_mlp[-1].weight.normal_(0, 0.5)
            a.patch_bias.weight.normal_(0, 0.1)
    return h


def batch(counts=(3, 5), size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(counts), 3, size, size, generator=g)
    pats = [random_patches(n, size, seed + i) for i, n in enumerate(counts)]
    return images, [p[0] for p in pats], [p[1] for p in pats]


# ---------------------------------------------------------------- shapes and padding


def test_shapes_and_padding_never_change_real_outputs(head):
    images, boxes, masks = batch((3, 5))
    with torch.no_grad():
        out = head(images, boxes, masks)
        alone = [head(images[i:i + 1], boxes[i:i + 1], masks[i:i + 1]) for i in range(2)]
    assert len(out.affinity) == len(out.class_logits) == len(out.presence_logits) == head.info.layers + 1
    assert out.affinity[0].shape == (2, C + 5, 5)
    assert out.class_logits[0].shape == (2, 5, C + 1)
    assert out.presence_logits[0].shape == (2, C)
    assert out.valid.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert out.semantic_affinity().shape == (2, C, 5) and out.instance_affinity().shape == (2, 5, 5)
    for i, n in enumerate((3, 5)):
        for l in range(head.info.layers + 1):
            torch.testing.assert_close(out.affinity[l][i, :C + n, :n], alone[i].affinity[l][0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.class_logits[l][i, :n], alone[i].class_logits[l][0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.presence_logits[l][i], alone[i].presence_logits[l][0], atol=1e-5, rtol=1e-4)
    # the real outputs really depend on the patches (a test a constant model would fail)
    assert not torch.allclose(out.affinity[-1][0, :C + 3, :3], out.affinity[-1][0, :C + 3, :3].mean())


def test_image_without_patches_is_finite(head):
    images, boxes, masks = batch((0, 4))
    with torch.no_grad():
        out = head(images, boxes, masks)
        alone = head(images[1:], boxes[1:], masks[1:])
    assert out.valid[0].sum() == 0
    assert all(torch.isfinite(a).all() for a in out.affinity)
    torch.testing.assert_close(out.affinity[-1][1], alone.affinity[-1][0], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        none = head(images[:1], boxes[:1], masks[:1])
    assert none.affinity[-1].shape == (1, C + 1, 1) and not none.valid.any()


def test_bad_inputs_raise():
    h = SamcpHead(tiny_info())
    images, boxes, masks = batch((3, 5))
    with pytest.raises(ValueError, match=r"patch_masks\[1\]"):
        h(images, boxes, [masks[0], masks[1][:, :5, :5]])
    with pytest.raises(ValueError, match="each of the 2 images"):
        h(images, boxes[:1], masks[:1])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        h(images[:, :1], boxes, masks)
    with pytest.raises(ValueError, match="unique"):
        tiny_info(stuff=("circle",))
    with pytest.raises(ValueError, match="multiple of heads"):
        tiny_info(d_model=30)
    with pytest.raises(ValueError, match="knows: circle, star, wall"):
        h.check_classes(["circle", "dog"])


# ---------------------------------------------------------------- affinity


def test_affinity_starts_at_one_percent_on_every_layer():
    torch.manual_seed(1)
    h = SamcpHead(tiny_info()).eval()
    images, boxes, masks = batch((3, 5))
    with torch.no_grad():
        out = h(images, boxes, masks)
    for l, a in enumerate(out.affinity):
        s = a.sigmoid()[:, :, :3]
        assert abs(float(s.mean()) - 0.01) < 1e-3, l
        assert float(s.max()) < 0.02, l
    probs = out.class_logits[-1][..., :-1].sigmoid()
    # cosine x 10 spreads the logits around the prior (the bias): the median stays at about 0.01
    assert abs(float(probs.median()) - 0.01) < 5e-3 and float(probs.mean()) < 0.05


def test_affinity_residual_across_layers(head):
    images, boxes, masks = batch((3, 5))
    with torch.no_grad():
        for a in head.affinity[1:]:
            a.head_mlp[-1].weight.zero_()
            a.head_mlp[-1].bias.zero_()
            a.patch_bias.weight.zero_()
            a.patch_bias.bias.zero_()
        out = head(images, boxes, masks)
    for l in range(1, head.info.layers + 1):
        torch.testing.assert_close(out.affinity[l], out.affinity[0])
    # layer 1's logits are layer 0's plus layer 1's own delta
    with torch.no_grad():
        head.affinity[1].patch_bias.bias.fill_(0.25)
        out2 = head(images, boxes, masks)
    torch.testing.assert_close(out2.affinity[1], out.affinity[0] + 0.25)
    torch.testing.assert_close(out2.affinity[2], out.affinity[0] + 0.25)
    # without the residual each layer stands alone (and starts at 0.01 itself)
    torch.manual_seed(0)
    flat = SamcpHead(tiny_info(affinity_residual=False)).eval()
    with torch.no_grad():
        o = flat(images, boxes, masks)
    assert all(abs(float(a.sigmoid()[1].mean()) - 0.01) < 1e-3 for a in o.affinity)


def test_gradients_reach_backbone_encoder_and_queries(head):
    head.train()
    images, boxes, masks = batch((3, 5))
    out = head(images, boxes, masks)
    loss = sum(a[:, :, :3].sigmoid().mean() + lg.sigmoid().mean() + p.sigmoid().mean()
               for a, lg, p in zip(out.affinity, out.class_logits, out.presence_logits))
    loss.backward()
    params = {
        "backbone": head.backbone.body.stem[0][0].weight,
        "fpn": head.backbone.lateral[0].weight,
        "roi": head.roi_embed.mlp[0].weight,
        "patch encoder": head.patch_encoder.layers[0].self_attn.in_proj_weight,
        "class queries": head.class_embed,
        "type embeddings": head.type_embed,
        "decoder": head.layers[0].cross_attn.in_proj_weight,
        "affinity": head.affinity[1].q_proj.weight,
        "affinity scale": head.affinity[2].log_scale,
    }
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_text_embedding_queries():
    torch.manual_seed(0)
    h = SamcpHead(tiny_info(text_dim=16))
    images, boxes, masks = batch((3, 5))
    text = torch.randn(5, 16)  # five names, not the head's three
    out = h(images, boxes, masks, class_embeddings=text)
    assert out.num_classes == 5
    assert out.affinity[-1].shape == (2, 5 + 5, 5)
    assert out.class_logits[-1].shape == (2, 5, 6)
    assert out.presence_logits[-1].shape == (2, 5)
    out.class_logits[-1].sum().backward()
    assert h.text_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[C, 16\]"):
        h(images, boxes, masks, class_embeddings=torch.randn(5, 8))
    with pytest.raises(ValueError, match="no text embeddings"):
        SamcpHead(tiny_info())(images, boxes, masks, class_embeddings=text)


def test_attention_mask_never_blocks_a_whole_row():
    g = torch.Generator().manual_seed(0)
    aff = torch.randn(3, 6, 5, generator=g) * 3
    aff[0, 2] = -20.0  # a row that would lose every patch
    aff[1, :, :2] = -20.0  # and rows that keep only padded patches above the threshold
    aff[1, :, 2:] = 20.0
    valid = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    blocked = affinity_attention_mask(aff, valid, 0.5)
    open_ = ~blocked
    assert (open_.sum(-1) > 0).all()
    assert not (open_ & ~valid[:, None, :])[:2].any()  # padded patches stay blocked
    assert open_[0, 2].tolist() == [True] * 5
    assert open_[1, :, :2].all()
    keep = (aff[0].sigmoid() >= 0.5).any(-1)
    keep[2] = False
    assert torch.equal(open_[0][keep], (aff[0].sigmoid() >= 0.5)[keep])
    assert open_[2, :, 0].all()  # an image without patches: one dummy column


# ---------------------------------------------------------------- mask-RoI inputs


def test_mask_to_roi_tensor_rle_and_low_res():
    from samantic.ops import rle_encode

    m = torch.zeros(2, 40, 60, dtype=torch.bool)
    m[0, 10:24, 20:34] = True  # a square filling its box
    m[1, 5:19, 5:12] = True  # the left half of its box
    boxes = torch.tensor([[20.0, 10.0, 34.0, 24.0], [5.0, 5.0, 19.0, 19.0]])
    r = mask_to_roi(m, boxes, 7)
    assert r.shape == (2, 7, 7)
    assert r[0].min() > 0.99
    assert r[1][:, :3].min() > 0.99 and r[1][:, 4:].max() < 0.01
    r_rle = mask_to_roi(rle_encode(m.numpy()).to_dicts(), boxes, 7)
    torch.testing.assert_close(r_rle, r)
    low = F.interpolate(m[:, None].float(), size=(20, 30), mode="nearest")[:, 0]
    r_low = mask_to_roi(low, boxes, 7, image_size=(40, 60))
    assert (r_low - r).abs().mean() < 0.1
    assert mask_to_roi(torch.zeros(0, 8, 8), torch.zeros(0, 4)).shape == (0, 7, 7)
    with pytest.raises(ValueError, match="boxes must be"):
        mask_to_roi(m, boxes[:1])


def test_roi_level_follows_box_size():
    h = SamcpHead(tiny_info(canonical_box=32.0))
    boxes = torch.tensor([[0, 0, 4, 4], [0, 0, 16, 16], [0, 0, 32, 32], [0, 0, 64, 64], [0, 0, 500, 500.0]])
    assert h.roi_embed.levels(boxes).tolist() == [0, 1, 2, 3, 3]  # strides 4, 8, 16, 32, 32


def test_mask_roi_ablation_ignores_the_mask():
    torch.manual_seed(0)
    h = SamcpHead(tiny_info(mask_roi=False)).eval()
    images, boxes, masks = batch((3,))
    with torch.no_grad():
        a = h(images, boxes, masks).patch_tokens
        b = h(images, boxes, [torch.ones_like(masks[0])]).patch_tokens
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- the head file


def test_save_load_round_trip(head, tmp_path):
    path = save_samcp(head, tmp_path / "samcp.safetensors", {"score_thresh": 0.4, "model": "sam_nano"})
    back = load_samcp(path)
    assert back.info.names == CLASSES + STUFF and back.info.stuff == STUFF
    assert back.info.extra["score_thresh"] == "0.4" and back.info.model == "sam_nano"
    assert back.info.config() == head.info.config()
    images, boxes, masks = batch((3, 5))
    with torch.no_grad():
        a, b = head(images, boxes, masks), back(images, boxes, masks)
    for x, y in zip(a.affinity + a.class_logits, b.affinity + b.class_logits):
        assert torch.equal(x, y)
    back.check_model("sam_nano")
    with pytest.raises(ValueError, match="trained on patches of sam_nano"):
        back.check_model("sam_vit_b", source=path)
    with pytest.raises(ValueError, match="reserved"):
        save_samcp(head, tmp_path / "x.safetensors", {"classes": "[]"})


def test_custom_backbone_plugs_in_and_needs_to_be_passed_to_load(tmp_path):
    info = tiny_info(backbone="custom:tiny_cnn")
    body = SmallCnn((8, 8, 16, 16))
    make = lambda: FpnBackbone(SmallCnn((8, 8, 16, 16)), body.channels, body.strides, info.d_model)  # noqa: E731
    with pytest.raises(ValueError, match="pass the backbone"):
        SamcpHead(info)
    h = SamcpHead(info, backbone=make()).eval()
    path = save_samcp(h, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"c\.safetensors.*custom:tiny_cnn"):
        load_samcp(path)
    back = load_samcp(path, backbone=make())
    images, boxes, masks = batch((2,))
    with torch.no_grad():
        assert torch.equal(h(images, boxes, masks).affinity[-1], back(images, boxes, masks).affinity[-1])


def test_bad_files_name_themselves(tmp_path, head):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_samcp(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors.*not a readable safetensors"):
        load_samcp(junk)
    from samantic.heads.usam import HeadInfo, UsamHead

    usam = UsamHead(HeadInfo(classes=("circle",), token_dim=8, hidden_dim=8)).save(tmp_path / "usam.safetensors")
    with pytest.raises(ValueError, match="usam.safetensors.*not a samantic SAM-CP head"):
        load_samcp(usam)
    from samantic.models import save_checkpoint

    meta = head.info.to_metadata()
    state = dict(head.state_dict())
    state.pop("class_embed")
    short = save_checkpoint(state, tmp_path / "short.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="short.safetensors.*missing.*class_embed"):
        load_samcp(short)
    wide = SamcpHead(tiny_info(d_model=64))
    mismatch = save_checkpoint(wide.state_dict(), tmp_path / "wide.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="wide.safetensors.*do not match"):
        load_samcp(mismatch)


# ---------------------------------------------------------------- tiny overfit


def test_tiny_overfit_separates_instances():
    """Eight patches of three objects (two circles, one star) plus two wall patches: after a short
    training the Type-II affinities are high within an instance and low across, and the Type-I
    rows and the class logits name the patches."""
    torch.manual_seed(0)
    h = SamcpHead(tiny_info())
    size = 64
    image = torch.full((1, 3, size, size), 0.5)
    # (box, instance, class)
    parts = [((4, 4, 14, 24), 0, 0), ((14, 4, 24, 24), 0, 0),  # circle A, two halves
             ((36, 4, 46, 14), 1, 0), ((36, 14, 46, 24), 1, 0),  # circle B, two halves
             ((10, 34, 30, 44), 2, 1), ((10, 44, 30, 54), 2, 1), ((30, 34, 40, 54), 2, 1),  # star
             ((0, 56, 32, 64), 3, 2), ((32, 56, 64, 64), 3, 2)]  # wall (stuff)
    colours = [(1.0, 0.2, 0.2), (1.0, 0.2, 0.2), (0.2, 0.2, 1.0), (0.3, 0.8, 0.3)]
    for (x0, y0, x1, y1), inst, _ in parts:
        image[0, :, y0:y1, x0:x1] = torch.tensor(colours[inst])[:, None, None]
    boxes = torch.tensor([p[0] for p in parts], dtype=torch.float32)
    inst = torch.tensor([p[1] for p in parts])
    cls = torch.tensor([p[2] for p in parts])
    masks = torch.ones(len(parts), 7, 7)
    same = (inst[:, None] == inst[None]).float()
    sem = F.one_hot(cls, C).t().float()  # [C, P]
    target = torch.cat([sem, same])[None]
    opt = torch.optim.Adam(h.parameters(), lr=3e-3)
    for _ in range(150):
        out = h(image, [boxes], [masks])
        loss = sum(F.binary_cross_entropy_with_logits(a, target) + F.cross_entropy(lg[0], cls)
                   for a, lg in zip(out.affinity[1:], out.class_logits[1:]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    h.eval()
    with torch.no_grad():
        out = h(image, [boxes], [masks])
    p_inst = out.instance_affinity()[0].sigmoid()
    assert float(p_inst[same.bool()].min()) > 0.5, p_inst
    assert float(p_inst[~same.bool()].max()) < 0.5, p_inst
    assert torch.equal(out.semantic_affinity()[0].argmax(0), cls)
    assert torch.equal(out.class_logits[-1][0, :, :C].argmax(-1), cls)


def test_input_size_resizes_images_and_boxes_together():
    torch.manual_seed(0)
    head = SamcpHead(tiny_info(input_size=96)).eval()
    images, boxes, masks = batch((3,), size=64)
    resized, scaled = head.resize_input(images, boxes)
    assert resized.shape[-2:] == (96, 96)
    assert torch.allclose(scaled[0], boxes[0] * 1.5)
    # the head on 64 px input equals the head told to take the 96 px version as it is
    same = SamcpHead(tiny_info(input_size=0)).eval()
    same.load_state_dict(head.state_dict())
    with torch.no_grad():
        a = head(images, boxes, masks)
        b = same(resized, scaled, masks)
    for x, y in zip(a.affinity, b.affinity):
        assert torch.allclose(x, y, atol=1e-5)
    # already at the size: untouched
    same_images, same_boxes = head.resize_input(resized, scaled)
    assert same_images is resized and torch.equal(same_boxes[0], scaled[0])


# ---------------------------------------------------------------- texture statistics


def test_texture_statistics_start_at_zero_and_round_trip(tmp_path):
    """A head with texture statistics, given a plain head's weights, gives the plain head's tokens (the texture
    MLP's last layer starts at zero: `--init` from a head without them starts as that head); its file keeps the
    option, and a head without it writes the config an older samantic reads (no texture_channels key)."""
    torch.manual_seed(0)
    plain = SamcpHead(tiny_info()).eval()
    tex = SamcpHead(tiny_info(texture_channels=4)).eval()
    missing, unexpected = tex.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("roi_embed.texture_") for k in missing)
    images, boxes, masks = batch((3, 5))
    with torch.no_grad():
        torch.testing.assert_close(tex(images, boxes, masks).patch_tokens, plain(images, boxes, masks).patch_tokens)
    assert "texture_channels" not in plain.info.config() and tex.info.config()["texture_channels"] == 4
    tex.train()  # the zero layer still learns: the loss reaches it
    out = tex(images, boxes, masks)
    sum(lg.sigmoid().mean() for lg in out.class_logits).backward()
    assert tex.roi_embed.texture_mlp[-1].weight.grad.abs().sum() > 0
    tex.eval()
    with torch.no_grad():
        tex.roi_embed.texture_mlp[-1].weight.normal_(0, 1.0)
    back = load_samcp(save_samcp(tex, tmp_path / "tex.safetensors"))
    assert back.info.texture_channels == 4
    with torch.no_grad():
        a, b = tex(images, boxes, masks).patch_tokens, back(images, boxes, masks).patch_tokens
        assert not torch.allclose(a, plain(images, boxes, masks).patch_tokens, atol=1e-3)  # the texture counts now
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="texture_channels must be >= 0"):
        tiny_info(texture_channels=-1)
    with pytest.raises(ValueError, match="no texture statistics"):
        plain.roi_embed.texture(torch.zeros(1, 32, 8, 8), torch.zeros(1, 5), torch.ones(1, 7, 7))


def test_texture_statistics_are_the_masked_mean_and_spread_of_the_finest_level():
    """With the reduction set to pick channels and the MLP taken out, the statistics are exact: a flat region has
    spread 0 and a checkered one of the same mean a large spread; pixels under the mask's zeros do not count."""
    torch.manual_seed(0)
    emb = SamcpHead(tiny_info(texture_channels=2)).roi_embed.eval()
    assert emb.strides[emb.finest] == 4
    with torch.no_grad():
        emb.texture_reduce.weight.zero_()
        emb.texture_reduce.bias.zero_()
        emb.texture_reduce.weight[0, 0] = 1.0  # channel 0 of the map
        emb.texture_reduce.weight[1, 1] = 1.0  # channel 1
    emb.texture_mlp = torch.nn.Identity()
    fmap = torch.full((1, 32, 16, 16), 0.5)        # stride 4: a 64 x 64 image
    blocks = (torch.arange(16)[:, None] // 4 + torch.arange(16)[None] // 4) % 2  # 4 x 4 checker on the map
    fmap[0, 0, :, 8:] = blocks[:, 8:].float()       # right half of channel 0 checkered, left half flat 0.5
    rois = torch.tensor([[0, 0, 0, 32, 64.0], [0, 32, 0, 64, 64.0]])  # left half, right half
    full = torch.ones(2, 7, 7)
    with torch.no_grad():
        st = emb.texture(fmap, rois, full)          # [2, 4]: mean c0, mean c1, spread c0, spread c1
    assert torch.allclose(st[0], torch.tensor([0.5, 0.5, 0.0, 0.0]), atol=2e-3), st
    assert 0.3 < st[1, 0] < 0.7 and st[1, 2] > 0.3 and st[1, 3] < 2e-3, st
    # a mask over the left three columns of cells of the whole image: changing the map right of them changes nothing
    whole = torch.tensor([[0, 0, 0, 64, 64.0]])
    left = torch.zeros(1, 7, 7)
    left[:, :, :3] = 1.0
    other = fmap.clone()
    other[0, :, :, 8:] = torch.rand(32, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(emb.texture(fmap, whole, left), emb.texture(other, whole, left))
        assert not torch.allclose(emb.texture(fmap, whole, torch.ones(1, 7, 7)), emb.texture(other, whole, torch.ones(1, 7, 7)))


# ---------------------------------------------------------------- FPN smoothing


def test_separable_fpn_smoothing_is_depthwise_then_pointwise_and_round_trips(tmp_path):
    """`fpn_smooth="separable"` builds each level's smoothing as a depthwise 3 x 3 then a 1 x 1 (a ninth of the full
    convolution's weights at these widths), computes what those two convolutions compute, trains, and comes back
    from its file; the default writes the config an older samantic reads (no fpn_smooth key); a bad value is
    named."""
    torch.manual_seed(0)
    full = SamcpHead(tiny_info()).eval()
    sep = SamcpHead(tiny_info(fpn_smooth="separable")).eval()
    d = sep.info.d_model
    for smooth in sep.backbone.smooth:
        dw, pw = smooth
        assert dw.groups == d and dw.weight.shape == (d, 1, 3, 3) and pw.weight.shape == (d, d, 1, 1)
    for smooth in full.backbone.smooth:
        assert isinstance(smooth, torch.nn.Conv2d) and smooth.weight.shape == (d, d, 3, 3)
    x = torch.randn(2, d, 9, 11)
    dw, pw = sep.backbone.smooth[0]
    expect = F.conv2d(F.conv2d(x, dw.weight, dw.bias, padding=1, groups=d), pw.weight, pw.bias)
    torch.testing.assert_close(sep.backbone.smooth[0](x), expect)
    smooth_params = lambda h: sum(p.numel() for p in h.backbone.smooth.parameters())  # noqa: E731
    assert smooth_params(sep) * 3 < smooth_params(full)
    assert "fpn_smooth" not in full.info.config() and sep.info.config()["fpn_smooth"] == "separable"

    images, boxes, masks = batch((3, 5))
    sep.train()
    out = sep(images, boxes, masks)
    sum(lg.sigmoid().mean() for lg in out.class_logits).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sep.backbone.smooth[0].parameters())
    sep.eval()
    back = load_samcp(save_samcp(sep, tmp_path / "sep.safetensors"))
    assert back.info.fpn_smooth == "separable"
    with torch.no_grad():
        torch.testing.assert_close(back(images, boxes, masks).patch_tokens, sep(images, boxes, masks).patch_tokens)
    with pytest.raises(ValueError, match="fpn_smooth must be one of conv, separable, got 'depthwise'"):
        tiny_info(fpn_smooth="depthwise")
    with pytest.raises(ValueError, match="smooth must be one of"):
        FpnBackbone(SmallCnn((8, 8, 16, 16)), (8, 8, 16, 16), (4, 8, 16, 32), 32, smooth="none")
