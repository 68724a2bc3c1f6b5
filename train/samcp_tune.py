"""Tuning a SAM-CP head's inference options on validation scenes, recorded in the head file.

The head's scores for an image do not depend on the inference options (score, affinity,
overlap and NMS thresholds): they are computed once per validation scene and every
combination of a grid re-runs only the candidate selection, merge and fusion, scored with
:func:`samantic.train.samcp_eval.evaluate_samcp`. The best combination by the chosen metric
is written into the head file's header (``inference``), where :class:`SamcpPredictor`,
``Segmenter``, ``samantic segment`` and bundles take their defaults from.

Validation seeds must be held out from training and should be kept apart from the seeds
the head is finally reported on (``samantic eval samcp``): tuning on the reported seeds
would flatter the numbers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

DEFAULT_GRID: Dict[str, Tuple[float, ...]] = {
    "score_thresh": (0.15, 0.25, 0.35, 0.5),
    "affinity_thresh": (0.3, 0.5, 0.7),
    "overlap_thresh": (0.3, 0.5),
}
METRICS = ("pq", "miou", "ap50", "mean")


class MemoScorer:
    """Wraps a scorer; remembers its outputs per (image, patch count), so a sweep runs the head once per scene."""

    def __init__(self, scorer: Any) -> None:
        self.inner = scorer
        self.head = getattr(scorer, "head", None)
        self.names, self.things = scorer.names, scorer.things
        self.model = getattr(scorer, "model", "")
        self.memo: Dict[str, Any] = {}
        self.calls = 0

    def patch_options(self) -> Dict[str, Any]:
        return self.inner.patch_options()

    def check_classes(self, names: Sequence[str]):
        return self.inner.check_classes(names)

    def scores(self, image: np.ndarray, patch_rles: Any, patch_boxes: np.ndarray):
        key = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest() + f":{len(patch_boxes)}"
        if key not in self.memo:
            self.calls += 1
            self.memo[key] = self.inner.scores(image, patch_rles, patch_boxes)
        return self.memo[key]


@dataclass
class TuneResult:
    best: Dict[str, Any]
    metric: str
    rows: List[Dict[str, Any]]  # one per combination: options + pq, sq, rq, miou, ap, ap50
    seeds: Tuple[int, int]


def grid_edges(best: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]) -> List[str]:
    """A note per numeric option whose best value is the largest or smallest of three or more tried (the best
    may lie beyond the grid: worth a wider sweep)."""
    notes = []
    for key, values in grid.items():
        nums = sorted({float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if len(nums) < 3 or key not in best:
            continue
        v = float(best[key])
        if v in (nums[0], nums[-1]):
            side = "largest" if v == nums[-1] else "smallest"
            notes.append(f"{key} {best[key]} is the {side} value tried: the best may lie beyond it; sweep "
                         f"{'larger' if side == 'largest' else 'smaller'} values too")
    return notes


def score_of(row: Mapping[str, float], metric: str) -> float:
    if metric == "mean":
        return (row["pq"] + row["miou"] + row["ap50"]) / 3.0
    return float(row[metric])


def tune_samcp(head: Any, model: Any, seeds: Sequence[int], cache_dir: Union[str, Path], *,
               grid: Optional[Mapping[str, Sequence[Any]]] = None, metric: str = "pq",
               progress: bool = True) -> TuneResult:
    """Scores every combination of ``grid`` on v2 scenes ``seeds``; returns the best by ``metric``.

    Args:
        head: a :class:`~samantic.heads.samcp.SamcpHead` (its patch options select the cached patches).
        model: the SAM whose patches the head labels.
        seeds: validation v2 seeds (held out from training).
        grid: option -> values (default :data:`DEFAULT_GRID`); options not in it keep the defaults.
        metric: ``"pq"``, ``"miou"``, ``"ap50"`` or ``"mean"`` of the three.
    """
    from samantic.pipeline.panoptic import INFERENCE_DEFAULTS, SamcpPredictor, TorchSamcpScorer, patch_options
    from samantic.train.metrics import _progress
    from samantic.train.samcp_eval import evaluate_samcp

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    grid = dict(DEFAULT_GRID if grid is None else grid)
    unknown = sorted(set(grid) - set(INFERENCE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown inference options {unknown}; known: {sorted(INFERENCE_DEFAULTS)}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no validation seeds")
    memo = MemoScorer(TorchSamcpScorer(head))
    keys = list(grid)
    combos = list(itertools.product(*(grid[k] for k in keys)))
    rows: List[Dict[str, Any]] = []
    po = patch_options(head.info)
    with _progress(progress, len(combos)) as advance:
        for values in combos:
            opts = dict(zip(keys, values))
            pred = SamcpPredictor(memo, **opts)
            res = evaluate_samcp(pred, model, seeds, cache_dir, kind="v2", progress=False, **po)
            everything = res.pq["all"]
            rows.append({**{k: pred.options[k] for k in INFERENCE_DEFAULTS}, "pq": everything["pq"],
                         "sq": everything["sq"], "rq": everything["rq"], "miou": res.miou, "ap": res.ap,
                         "ap50": res.ap50})
            advance()
    best = max(rows, key=lambda r: float(np.nan_to_num(score_of(r, metric), nan=-1.0)))
    return TuneResult({k: best[k] for k in INFERENCE_DEFAULTS}, metric, rows, (seeds[0], seeds[-1] + 1))


def write_inference(path: Union[str, Path], options: Mapping[str, Any], out: Optional[Union[str, Path]] = None,
                    note: Optional[Mapping[str, Any]] = None) -> Path:
    """Records inference options in a SAM-CP head file's header (atomically; tensors unchanged)."""
    from samantic.heads._files import read_head_file
    from samantic.heads.samcp import SamcpInfo
    from samantic.models import save_checkpoint
    from samantic.pipeline.panoptic import INFERENCE_KEY, parse_inference

    path, meta, state = read_head_file(path, "SAM-CP head")
    info = SamcpInfo.from_metadata(meta, str(path))  # refuses files that are not SAM-CP heads
    clean = parse_inference(dict(options))
    if set(clean) != set(options):
        raise ValueError(f"unknown inference options {sorted(set(options) - set(clean))}")
    info.extra[INFERENCE_KEY] = json.dumps(clean, sort_keys=True)
    if note:
        info.extra["inference_tuning"] = json.dumps(dict(note), sort_keys=True)
    info.extra.pop("samantic_version", None)  # the writer records its own
    return save_checkpoint(state, Path(out) if out is not None else path, metadata=info.to_metadata())
