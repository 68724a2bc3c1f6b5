"""The model half of the segment-everything pipeline, behind one small interface (torch-free).

:class:`~samantic.pipeline.generator.MaskGenerator` owns everything that does
not depend on how the networks run: crops, grids, batching, the early filters,
post-processing, NMS and records. An :class:`Engine` runs the networks:

    encode(x)                       preprocessed image [1, 3, S, S] -> image embedding (kept inside)
    run_prompts(coords[, task])     points [B, 2] (input frame) [+ SUM task index] -> IoU, mask tokens, class logits
    upscale(out, prompt, mask)      low-res logits of the selected (prompt, mask) pairs only

The torch engine lives in :mod:`samantic.pipeline.amg`; the onnxruntime and
TensorRT engines in :mod:`samantic.runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol, Sequence, Tuple

import numpy as np

from samantic.models.tasks import TASKS, TaskLike, task_index


@dataclass
class PromptOutputs:
    """What the prompt pass of an engine returns for B prompts with M masks each.

    Attributes:
        iou_preds: float32 [B, M] predicted IoU.
        mask_tokens: [B, M, D] mask tokens in the engine's own array type (torch.Tensor,
            numpy array); indexable with two integer numpy arrays.
        class_logits: float32 [B, M, C + 1] from a semantic head run by the engine, or None.
        state: whatever :meth:`Engine.upscale` needs (e.g. the transformer's image embedding).
    """

    iou_preds: np.ndarray
    mask_tokens: Any
    class_logits: Optional[np.ndarray] = None
    state: Any = None


class Engine(Protocol):
    """Runs SAM's networks for :class:`~samantic.pipeline.generator.MaskGenerator`.

    Attributes:
        img_size: side of the square encoder input.
        mask_threshold: logit threshold of a mask pixel.
        pixel_mean, pixel_std: RGB normalisation (0..255) of the encoder input.
        name: a short label for reports ("torch", "onnxruntime", ...).
        tasks: the SUM tasks :meth:`run_prompts` takes, in table order (:data:`~samantic.models.tasks.TASKS`);
            ``()`` (or no attribute) when it takes none: only "unspecified" then runs, without a ``task``
            argument, e.g. on a bundle exported before task prompts.
    """

    img_size: int
    mask_threshold: float
    pixel_mean: Tuple[float, float, float]
    pixel_std: Tuple[float, float, float]
    name: str
    tasks: Tuple[str, ...]

    def encode(self, x: np.ndarray) -> None:
        """Runs the image encoder on float32 ``[1, 3, S, S]`` and keeps the embedding for the prompt passes."""

    def run_prompts(self, coords: np.ndarray, task: int = 0) -> PromptOutputs:
        """Prompt encoder + transformer (+ head) for one positive point per prompt, float ``[B, 2]`` (x, y),
        every prompt for SUM task ``tasks[task]``."""

    def upscale(self, out: PromptOutputs, prompt_idx: np.ndarray, mask_idx: np.ndarray) -> np.ndarray:
        """float32 ``[K, 4h, 4w]`` low-res logits of the pairs (``prompt_idx[k]``, ``mask_idx[k]``)."""

    def reset(self) -> None:
        """Drops the image embedding."""


def engine_task(engine: Any, task: TaskLike) -> int:
    """Index of a SUM task (name or index) that ``engine`` can run.

    Raises:
        ValueError: an unknown task, or a task other than "unspecified" on an engine without task
            prompts (the message says how to get one).
    """
    index = task_index(task)
    if index and index >= len(getattr(engine, "tasks", ()) or ()):
        raise ValueError(
            f"task {TASKS[index]!r} needs a task prompt, which the {getattr(engine, 'name', type(engine).__name__)} "
            "engine does not take (a bundle exported before task prompts has no 'task' input in its prompts graph: "
            "re-export it with `samantic export bundle`); only task 'unspecified' runs on it"
        )
    return index


def unique_rows(prompt_idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(sorted unique prompts, position of each entry among them): which prompts need upscaling."""
    uniq, inverse = np.unique(np.asarray(prompt_idx, np.int64), return_inverse=True)
    return uniq, inverse.reshape(-1)


def check_points(coords: Sequence) -> np.ndarray:
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"point coordinates must have shape [B, 2], got {coords.shape}")
    return coords


def point_prompts(coords: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Inputs of an exported prompt graph for one positive point per prompt.

    Returns:
        (float32 ``[B, 2, 2]`` coordinates, float32 ``[B, 2]`` labels): each point followed by
        segment-anything's padding point (0, 0) with label -1 (no box prompt).
    """
    coords = check_points(coords)
    pc = np.zeros((len(coords), 2, 2), np.float32)
    pc[:, 0] = coords
    pl = np.tile(np.array([[1.0, -1.0]], np.float32), (len(coords), 1))
    return pc, pl


def upscale_indices(prompt_idx: np.ndarray, mask_idx: np.ndarray, multimask: int) -> Dict[str, np.ndarray]:
    """int32 index inputs of an exported upscale graph: ``rows``, ``token_index``, ``mask_index``, ``row_of``."""
    prompt_idx = np.asarray(prompt_idx, np.int64)
    mask_idx = np.asarray(mask_idx, np.int64)
    rows, row_of = unique_rows(prompt_idx)
    return {"rows": rows.astype(np.int32), "token_index": (prompt_idx * multimask + mask_idx).astype(np.int32),
            "mask_index": mask_idx.astype(np.int32), "row_of": row_of.astype(np.int32)}
