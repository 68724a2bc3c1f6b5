"""Prompted segmentation with SUM's task prompt: segment-anything's ``SamPredictor`` plus ``task=``.

Example:
    >>> predictor = Predictor(create_model("sam_nano"), task="part")           # doctest: +SKIP
    >>> predictor.set_image(image)                                              # doctest: +SKIP
    >>> masks, scores, logits = predictor.predict(point_coords=[[60, 40]], point_labels=[1])  # doctest: +SKIP
    >>> predictor.predict(point_coords=[[60, 40]], point_labels=[1], task="salient")          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from segment_anything import SamPredictor

from samantic.models.task_prompt import add_task
from samantic.models.tasks import TASKS, TaskLike, task_index

__all__ = ["Predictor"]


class Predictor(SamPredictor):
    """``SamPredictor`` (same methods, arguments and outputs) whose prompts carry a SUM task.

    With task "unspecified" on a model whose task table is zero, or that has none, the outputs
    are segment-anything's ``SamPredictor``'s.

    Args:
        sam_model: a ``Sam``, e.g. from :func:`samantic.models.create_model`.
        task: the default task of :meth:`predict` and :meth:`predict_torch`, a name from
            :data:`~samantic.models.tasks.TASKS` or its index; settable as ``predictor.task``.

    Raises:
        ValueError: an unknown task.
    """

    def __init__(self, sam_model, task: TaskLike = "unspecified") -> None:
        super().__init__(sam_model)
        self.task = task

    @property
    def task(self) -> str:
        """The default task's name."""
        return TASKS[self._task]

    @task.setter
    def task(self, task: TaskLike) -> None:
        self._task = task_index(task)

    def predict(self, point_coords: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
                box: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
                multimask_output: bool = True, return_logits: bool = False, *,
                task: Optional[TaskLike] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``SamPredictor.predict`` for one task (default: :attr:`task`); see segment-anything for the rest."""
        if task is None:
            return super().predict(point_coords, point_labels, box, mask_input, multimask_output, return_logits)
        default = self._task
        self.task = task  # segment-anything's predict() calls predict_torch() without a task
        try:
            return super().predict(point_coords, point_labels, box, mask_input, multimask_output, return_logits)
        finally:
            self._task = default

    @torch.no_grad()
    def predict_torch(self, point_coords: Optional[torch.Tensor], point_labels: Optional[torch.Tensor],
                      boxes: Optional[torch.Tensor] = None, mask_input: Optional[torch.Tensor] = None,
                      multimask_output: bool = True, return_logits: bool = False,
                      task: Union[TaskLike, torch.Tensor, None] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``SamPredictor.predict_torch`` with the task's embedding added to the dense prompt embedding.

        Args:
            point_coords ... return_logits: as segment-anything's (prompts in the input frame, batched).
            task: a name or index for every prompt, ``LongTensor[B]`` for one task per prompt, or
                None for :attr:`task`.

        Returns:
            masks Tensor[B, C, H, W], IoU predictions Tensor[B, C], low-res logits Tensor[B, C, h, w].
        """
        if not self.is_image_set:
            raise RuntimeError("call set_image() first")
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        dense = add_task(dense, self._task if task is None else task, getattr(self.model, "task_prompt", None))
        low_res, iou = self.model.mask_decoder(
            image_embeddings=self.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res
