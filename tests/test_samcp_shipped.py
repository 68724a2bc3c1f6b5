"""The shipped SAM-CP head (`pkg:assets/samcp_nano_panoptic.safetensors`): loads by its package path, names the SAM
whose patches it labels, and scores held-out v2 scenes above floors a little under what it measures there."""

from __future__ import annotations

import pytest
import torch

from samantic.heads.samcp import load_samcp
from samantic.models import create_model, resolve_checkpoint

HEAD = "pkg:assets/samcp_nano_panoptic.safetensors"
SEEDS = range(0, 4)  # held-out v2 scenes (the head trained on 1,000,000 up, was tuned on 100-199)
# On these 4 scenes the shipped head (v7: separable FPN smoothing at side 320, texture statistics, on sam_nano_panoptic
# v2's patches) measures PQ 0.794 / mIoU 0.734 / mask AP50 0.991 (0.701 / 0.750 / 0.818 on 40 scenes: model card
# samcp_nano_panoptic.md); v6 0.774 / 0.813 / 0.988, v5 0.739 / 0.736 / 0.982, v4 0.744 / 0.729 / 0.948, v3 (on v1's
# patches) 0.669 / 0.630 / 0.908, v2 0.587 / 0.579 / 0.820.
FLOORS = {"pq": 0.75, "miou": 0.69, "ap50": 0.95}


def test_shipped_head_loads_by_package_path_and_names_its_sam():
    path = resolve_checkpoint(HEAD)
    assert path.stat().st_size <= 8 * 2**20
    head = load_samcp(HEAD)
    assert head.info.model == "sam_nano_panoptic"
    assert head.info.classes[:3] and set(head.info.stuff) == {"wall", "floor", "grass", "water"}
    assert head.check_weights(create_model("sam_nano_panoptic")) is None  # trained on the shipped SAM's patches
    assert all(p.dtype == torch.float32 for p in head.parameters())
    with pytest.raises(FileNotFoundError, match="no_such_head"):
        load_samcp("pkg:assets/no_such_head.safetensors")


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    from samantic.pipeline.panoptic import SamcpPredictor, patch_options
    from samantic.train.samcp_eval import evaluate_samcp

    head = load_samcp(HEAD)
    return evaluate_samcp(SamcpPredictor(head), create_model("sam_nano_panoptic"), SEEDS,
                          tmp_path_factory.mktemp("patches"), kind="v2", progress=False, **patch_options(head.info))


@pytest.mark.parametrize("metric", sorted(FLOORS))
def test_shipped_head_reaches_its_floors_on_held_out_scenes(small_eval, metric):
    got = {"pq": small_eval.pq["all"]["pq"], "miou": small_eval.miou, "ap50": small_eval.ap50}[metric]
    assert got >= FLOORS[metric], (metric, got)
