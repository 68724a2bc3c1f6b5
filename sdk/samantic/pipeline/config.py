"""Options of the automatic mask generator, grouped in one frozen config."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Tuple

import numpy as np

from samantic.models.tasks import task_name

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


@dataclass(frozen=True)
class AmgConfig:
    """Segment-everything options: segment-anything's ``SamAutomaticMaskGenerator``
    arguments with the same names, meanings and defaults, plus samantic's own.

    Attributes:
        points_per_side: grid points per image side (``points_per_side**2`` prompts); None if ``point_grids`` given.
        points_per_batch: prompts run through the decoder together.
        pred_iou_thresh: keep masks whose predicted IoU is above this (0 disables).
        stability_score_thresh: keep masks whose stability score is at least this (0 disables).
        stability_score_offset: logit offset of the stability score.
        box_nms_thresh: box IoU above which duplicate masks of one crop are dropped.
        crop_n_layers: extra crop layers; layer i has (2**i)**2 crops.
        crop_nms_thresh: box IoU for duplicates across crops.
        crop_overlap_ratio: overlap of the first crop layer, as a fraction of the short side.
        crop_n_points_downscale_factor: points per side in layer i are divided by this**i.
        point_grids: explicit [N, 2] grids in [0, 1] per layer, exclusive with ``points_per_side``.
        min_mask_region_area: remove holes and islands smaller than this (pixels), then re-run NMS.
        output_mode: "binary_mask", "uncompressed_rle" or "coco_rle".
        adaptive: samantic's opt-in prompt reduction (not exact). A regular grid is prompted coarse
            to fine (every 4th point of every 4th row, then every 2nd, then the rest); a finer point
            is prompted only if one of its coarser neighbours predicted a mask IoU of at least
            ``pred_iou_thresh - adaptive_margin`` (where nothing came close to the IoU filter,
            nothing is refined), and points inside masks already kept with high confidence are skipped.
        adaptive_margin: how far below ``pred_iou_thresh`` a coarse neighbour's best predicted IoU
            may lie and still get the points around it prompted (``math.inf``: refine everywhere).
        adaptive_iou_thresh: predicted IoU a kept mask needs to cover (skip) later points.
        adaptive_stability_thresh: stability a kept mask needs to cover later points.
        device: where the post-processing kernels run ("cpu" or "cuda[:N]").
        task: SUM's task prompt for every grid point: "unspecified" (SAM's behaviour), "salient",
            "entity" or "part" (see :mod:`samantic.models.tasks`); an index 0-3 is stored as its name.
            A model without trained task embeddings decodes every task alike.
    """

    points_per_side: Optional[int] = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    point_grids: Optional[Tuple[Any, ...]] = field(default=None, compare=False)
    min_mask_region_area: int = 0
    output_mode: str = "binary_mask"
    adaptive: bool = False
    adaptive_margin: float = 0.15
    adaptive_iou_thresh: float = 0.9
    adaptive_stability_thresh: float = 0.95
    device: str = "cpu"
    task: str = "unspecified"

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", task_name(self.task))
        if (self.points_per_side is None) == (self.point_grids is None):
            raise ValueError(
                "exactly one of points_per_side and point_grids must be given, got "
                f"points_per_side={self.points_per_side!r} and point_grids={'None' if self.point_grids is None else 'set'}"
            )
        if self.points_per_side is not None and self.points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {self.points_per_side}")
        if self.point_grids is not None:
            grids = tuple(np.asarray(g, dtype=np.float64) for g in self.point_grids)
            for i, g in enumerate(grids):
                if g.ndim != 2 or g.shape[1] != 2:
                    raise ValueError(f"point_grids[{i}] must have shape [N, 2], got {g.shape}")
            if len(grids) < self.crop_n_layers + 1:
                raise ValueError(
                    f"point_grids needs one grid per crop layer ({self.crop_n_layers + 1}), got {len(grids)}"
                )
            object.__setattr__(self, "point_grids", grids)
        if self.points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {self.points_per_batch}")
        if self.output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {self.output_mode!r}")
        if self.crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {self.crop_n_layers}")
        if self.crop_n_points_downscale_factor < 1:
            raise ValueError(f"crop_n_points_downscale_factor must be >= 1, got {self.crop_n_points_downscale_factor}")
        if self.min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0, got {self.min_mask_region_area}")
        if self.stability_score_offset < 0:
            raise ValueError(f"stability_score_offset must be >= 0, got {self.stability_score_offset}")
        if not self.adaptive_margin >= 0:  # also rejects NaN
            raise ValueError(f"adaptive_margin must be >= 0, got {self.adaptive_margin}")
        for name in ("box_nms_thresh", "crop_nms_thresh"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")

    def replace(self, **changes: Any) -> "AmgConfig":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown AmgConfig options: {sorted(unknown)}")
        return replace(self, **changes)
