"""SUM's task table as a module, and how it reaches SAM's mask decoder.

A ``Sam`` carries the table as its ``task_prompt`` submodule (state-dict key
``task_prompt.embed.weight``, ``[4, C]``) only when it has one: official and
shipped checkpoints have none and load as they always did;
:func:`~samantic.models.loading.load_checkpoint` attaches the table when a
checkpoint brings one, and fills it with zeros when the model has a table and
the checkpoint does not. Without a table every task decodes as the base model.

Everything that decodes prompts adds the task's row to the dense prompt embedding
with :func:`add_task`: the torch engine of the generator, the
:class:`~samantic.pipeline.predictor.Predictor`, the exported prompts graph and
training code (``SamTrainer(prompt_hook=...)``).
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import nn

from samantic.models.tasks import TASKS, task_index

__all__ = ["TaskPrompt", "add_task", "attach_task_prompt"]


class TaskPrompt(nn.Module):
    """One learned embedding per task (:data:`~samantic.models.tasks.TASKS`), zero-initialised.

    Args:
        embed_dim: the prompt encoder's width C.
        num_tasks: rows of the table.

    Attributes:
        embed: ``nn.Embedding(num_tasks, C)``; row ``k`` is added to the dense prompt
            embedding of a prompt for task ``TASKS[k]``.
    """

    def __init__(self, embed_dim: int, num_tasks: int = len(TASKS)) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_tasks, embed_dim)
        nn.init.zeros_(self.embed.weight)  # a fresh table leaves the base model's outputs unchanged

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B]`` -> ``Tensor[B, C, 1, 1]``, ready to broadcast over a dense embedding."""
        return self.embed(task_ids)[:, :, None, None]


def add_task(dense: torch.Tensor, task_ids: Union[torch.Tensor, Sequence[int], str, int],
             task_prompt: Optional[TaskPrompt]) -> torch.Tensor:
    """Adds each prompt's task embedding to SAM's dense prompt embedding.

    Args:
        dense: Tensor[B, C, h, w], the prompt encoder's dense embedding (``B`` may be 1 when
            every prompt shares it, as with no mask prompts).
        task_ids: LongTensor[B] (one task per prompt) or LongTensor[1], a task name or an index
            (one task for all).
        task_prompt: the model's table (``sam.task_prompt``), or None: a model without a table
            decodes every task as its base model and ``dense`` is returned as is.

    Returns:
        Tensor[max(B, len(task_ids)), C, h, w]; differentiable in the table (for training).

    Raises:
        ValueError: an unknown task name or index, or ``task_ids`` of another length than B or 1.
    """
    if isinstance(task_ids, (str, numbers.Integral)):
        task_ids = [task_index(task_ids)]
    if task_prompt is None:
        return dense
    ids = torch.as_tensor(task_ids, dtype=torch.long, device=dense.device).reshape(-1)
    if len(ids) not in (1, dense.shape[0]) and dense.shape[0] != 1:
        raise ValueError(f"task_ids must hold 1 or B={dense.shape[0]} tasks, got {len(ids)}")
    return dense + task_prompt(ids).to(dense.dtype)


def attach_task_prompt(sam: nn.Module) -> TaskPrompt:
    """Gives a ``Sam`` a zero task table (``sam.task_prompt``) unless it has one; returns the table.

    The model's outputs do not change. Attach before handing the model to an optimizer
    (e.g. before building ``SamTrainer``) so that the table is among its parameters;
    :func:`~samantic.models.save_checkpoint` then writes it.
    """
    table = getattr(sam, "task_prompt", None)
    if table is not None:
        return table
    ref = sam.prompt_encoder.no_mask_embed.weight
    table = TaskPrompt(int(sam.prompt_encoder.embed_dim)).to(device=ref.device, dtype=ref.dtype)
    table.train(sam.training)
    sam.task_prompt = table
    return table
