"""A drop-in replacement for segment-anything's ``SamAutomaticMaskGenerator``.

Same constructor arguments, same records out of :meth:`generate`, on the same
``Sam`` model; the work is reordered so that what is thrown away is never
computed at full resolution (see :mod:`samantic.pipeline.generator`, which
holds the pipeline shared with the onnxruntime and TensorRT runtimes). This
module adds the torch :class:`TorchEngine`: the image encoder and
:class:`~samantic.pipeline.decoder.PromptMaskDecoder` of a ``Sam``, plus an
optional semantic head on the mask tokens. ``task=`` picks SUM's task prompt
(:mod:`samantic.models.tasks`).
"""

from __future__ import annotations

from typing import Any, List, Optional, Union

import numpy as np
import torch

from samantic.models.tasks import TASKS
from samantic.pipeline.config import AmgConfig
from samantic.pipeline.decoder import PromptMaskDecoder
from samantic.pipeline.engine import PromptOutputs, check_points
from samantic.pipeline.generator import STAGES, MaskGenerator, MaskSet, masks_to_boxes, remove_small_regions
from samantic.pipeline.scoring import MaskScorer

__all__ = ["STAGES", "AutomaticMaskGenerator", "MaskSet", "TorchEngine", "masks_to_boxes", "remove_small_regions"]


class TorchEngine:
    """Runs a segment-anything ``Sam`` (and optionally a semantic head) in torch eager mode.

    Every task runs: a model with SUM's task table (``model.task_prompt``) adds the task's
    embedding to the dense prompt embedding, one without decodes every task as its base.

    Args:
        model: a ``segment_anything.modeling.Sam``.
        head: optional ``nn.Module`` mapping mask tokens ``[..., D]`` to class logits ``[..., C + 1]``.
    """

    name = "torch"
    tasks = TASKS

    def __init__(self, model, head=None) -> None:
        self.model = model
        self.head = head
        self.decoder = PromptMaskDecoder(model)
        self.img_size = int(model.image_encoder.img_size)
        self.mask_threshold = float(model.mask_threshold)
        self.pixel_mean = tuple(float(v) for v in model.pixel_mean.flatten().tolist())
        self.pixel_std = tuple(float(v) for v in model.pixel_std.flatten().tolist())
        self.features: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def encode(self, x: np.ndarray) -> None:
        self.features = self.model.image_encoder(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))

    @torch.no_grad()
    def run_prompts(self, coords: np.ndarray, task: int = 0) -> PromptOutputs:
        if self.features is None:
            raise RuntimeError("call encode() first")
        coords = torch.as_tensor(check_points(coords), device=self.device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=self.device)
        out = self.decoder.run(self.features, coords[:, None, :], labels[:, None], multimask_output=True, task=task)
        logits = None
        if self.head is not None:
            param = next(self.head.parameters(), None)
            tokens = out.mask_tokens if param is None else out.mask_tokens.to(param.dtype)
            logits = self.head(tokens).float().cpu().numpy()
        return PromptOutputs(out.iou_preds.float().cpu().numpy(), out.mask_tokens, logits, out)

    @torch.no_grad()
    def upscale(self, out: PromptOutputs, prompt_idx: np.ndarray, mask_idx: np.ndarray) -> np.ndarray:
        p = torch.as_tensor(np.asarray(prompt_idx, np.int64))
        m = torch.as_tensor(np.asarray(mask_idx, np.int64))
        return self.decoder.masks(out.state, p, m).float().cpu().numpy()

    def reset(self) -> None:
        self.features = None


class AutomaticMaskGenerator(MaskGenerator):
    """Segments everything in an image, like ``segment_anything.SamAutomaticMaskGenerator``.

    Args:
        model: a ``segment_anything.modeling.Sam`` (e.g. from :func:`samantic.models.create_model`).
        points_per_side ... output_mode: the reference generator's arguments, same meanings and defaults
            (see :class:`~samantic.pipeline.config.AmgConfig`).
        config: all options at once; keyword arguments given explicitly override it.
        mask_scorer: optional head called on the mask tokens of masks that passed the IoU
            filter, before upscaling (see :class:`~samantic.pipeline.scoring.MaskScorer`).
        adaptive: opt-in prompt reduction (not exact, see ``AmgConfig.adaptive``).
        adaptive_margin: in adaptive mode, how far below ``pred_iou_thresh`` a coarse point's best
            predicted IoU may lie and still get the finer points around it prompted (default 0.15).
        adaptive_iou_thresh, adaptive_stability_thresh: how confident a kept mask must be to cover
            (skip) later points in adaptive mode (``AmgConfig``'s defaults 0.9 and 0.95 when not given).
        device: where the post-processing kernels run.
        task: SUM's task prompt, "unspecified" (default), "salient", "entity" or "part" (or its index);
            :meth:`generate` takes one per call too.
    """

    def __init__(
        self,
        model,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        config: Optional[AmgConfig] = None,
        mask_scorer: Optional[MaskScorer] = None,
        adaptive: Optional[bool] = None,
        adaptive_margin: Optional[float] = None,
        adaptive_iou_thresh: Optional[float] = None,
        adaptive_stability_thresh: Optional[float] = None,
        device: Optional[str] = None,
        task: Union[str, int, None] = None,
    ) -> None:
        if config is None:
            config = AmgConfig(
                points_per_side=None if point_grids is not None else points_per_side,
                points_per_batch=points_per_batch,
                pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh,
                stability_score_offset=stability_score_offset,
                box_nms_thresh=box_nms_thresh,
                crop_n_layers=crop_n_layers,
                crop_nms_thresh=crop_nms_thresh,
                crop_overlap_ratio=crop_overlap_ratio,
                crop_n_points_downscale_factor=crop_n_points_downscale_factor,
                point_grids=tuple(point_grids) if point_grids is not None else None,
                min_mask_region_area=min_mask_region_area,
                output_mode=output_mode,
            )
        overrides = {"adaptive": adaptive, "adaptive_margin": adaptive_margin, "adaptive_iou_thresh": adaptive_iou_thresh,
                     "adaptive_stability_thresh": adaptive_stability_thresh, "device": device, "task": task}
        config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
        super().__init__(TorchEngine(model), config, mask_scorer=mask_scorer)
        self.model = model
        self.decoder = self.engine.decoder

    # the reference generator's attribute names, for code that reads them
    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and name in AmgConfig.__dataclass_fields__:
            return getattr(config, name)
        raise AttributeError(name)

    @torch.no_grad()
    def generate_masks(self, image: np.ndarray, task: Union[str, int, None] = None) -> MaskSet:
        return super().generate_masks(image, task)
