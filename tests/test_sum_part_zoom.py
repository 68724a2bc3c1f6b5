"""benchmarks/sum_part_zoom.py: composites' parts clicked on the whole image and on crops around the click."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sum_part_zoom  # noqa: E402
import sum_task_ceiling  # noqa: E402


@pytest.mark.parametrize("xy, shape, zoom, box", [
    ((100.0, 100.0), (600, 800), 1, (0, 0, 800, 600)),      # zoom 1: the whole image
    ((100.0, 50.0), (600, 800), 2, (0, 0, 400, 400)),       # square of side 800 / 2, moved inside
    ((400.0, 300.0), (800, 800), 2, (200, 100, 400, 400)),  # centred
    ((790.0, 10.0), (800, 800), 4, (600, 0, 200, 200)),     # near a corner: moved inside
])
def test_crop_box_is_a_square_of_the_longest_side_over_zoom_moved_inside_the_image(xy, shape, zoom, box):
    assert sum_part_zoom.crop_box(xy, shape, zoom) == box


def test_token_area_counts_encoder_tokens_at_the_model_input_scale():
    from samantic.models import create_model

    sam = create_model("sam_nano")
    img, emb = int(sam.image_encoder.img_size), int(sam.prompt_encoder.image_embedding_size[0])
    stride = img // emb
    m = np.zeros((2 * img, img), bool)  # longest side 2 x img_size: the model sees it at half scale
    m[: 2 * stride * 3, : 2 * stride] = True  # 3 tokens once scaled
    assert sum_part_zoom.token_area(m, sam) == pytest.approx(3.0)


def test_zoom_1_reproduces_the_task_ceiling_on_composites_parts_and_zoom_changes_it(tmp_path):
    seeds = "0:3"
    sum_part_zoom.main(["--column", "base=sam_nano", "--seeds", seeds, "--zoom", "1,2", "--threads", "1",
                        "--out", str(tmp_path / "z")])
    sum_task_ceiling.main(["--column", "base=sam_nano", "--seeds", seeds, "--threads", "1", "--out", str(tmp_path / "c")])
    zoom = json.loads((tmp_path / "z.json").read_text())["results"]["base"]
    ceil = json.loads((tmp_path / "c.json").read_text())["results"]["base"]
    n = ceil["unspecified"][sum_task_ceiling.COMPOSITE]["masks"]
    assert n > 0 and zoom["parts"]["all"] == n
    assert sum(v for k, v in zoom["parts"].items() if k != "all") == n  # the bins partition the parts
    for asked, prompt in (("part", "own"), ("unspecified", "unspecified")):
        for m in ("picked", "oracle"):
            assert zoom["1.0"][asked]["all"][m] == pytest.approx(ceil[prompt][sum_task_ceiling.COMPOSITE][m], abs=1e-9)
    # a model without a task table answers "part" as "unspecified"; a zoomed crop is another input
    assert zoom["2.0"]["part"]["all"] == zoom["2.0"]["unspecified"]["all"]
    assert zoom["2.0"]["part"]["all"]["picked"] != pytest.approx(zoom["1.0"]["part"]["all"]["picked"], abs=1e-6)
    assert "| base | 2 |" in (tmp_path / "z.md").read_text()


def test_training_seeds_and_zoom_below_1_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="training seeds"):
        sum_part_zoom.main(["--column", "base=sam_nano", "--seeds", "2999999:3000001", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="must be >= 1"):
        sum_part_zoom.main(["--column", "base=sam_nano", "--zoom", "0.5", "--out", str(tmp_path / "b")])
    assert not list(tmp_path.iterdir())
