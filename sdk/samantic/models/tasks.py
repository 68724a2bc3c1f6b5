"""SUM's task prompt: which granularity of mask the decoder is asked for (torch-free names).

SUM ("Segment with Uncertainty Model") adds one learned embedding per task to
SAM's dense prompt embedding. The table is zero-initialised, so a model whose
table is all zeros, or that has none, behaves exactly as its base model for
every task; only fine-tuning (``samantic train sum``) makes the tasks differ.

The names live here, without torch, because the runtime, the CLI and
:class:`~samantic.pipeline.config.AmgConfig` read them on installs without
torch. The module itself (:class:`~samantic.models.task_prompt.TaskPrompt`)
and the helpers that apply it are imported from here lazily::

    >>> from samantic.models.tasks import TASKS, task_index
    >>> task_index("part"), TASKS[1]
    (3, 'salient')
    >>> from samantic.models.tasks import TaskPrompt, add_task  # doctest: +SKIP (imports torch)
"""

from __future__ import annotations

import difflib
import numbers
from typing import Union

__all__ = ["TASKS", "TaskLike", "TaskPrompt", "add_task", "attach_task_prompt", "task_index", "task_name"]

# Row order of the task table; an exported prompts graph's ``task`` input indexes it.
TASKS = ("unspecified", "salient", "entity", "part")
TASK_PREFIX = "task_prompt."  # state-dict keys of the table on a Sam (``task_prompt.embed.weight``)

TaskLike = Union[str, int]

_TORCH = {"TaskPrompt": "samantic.models.task_prompt", "add_task": "samantic.models.task_prompt",
          "attach_task_prompt": "samantic.models.task_prompt"}


def task_index(task: TaskLike) -> int:
    """Row of a task in the table: a name from :data:`TASKS` or an index ``0 <= task < 4``.

    Raises:
        ValueError: an unknown name (close matches and the four names are listed) or index.
    """
    if isinstance(task, str):
        if task in TASKS:
            return TASKS.index(task)
        close = difflib.get_close_matches(task, TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task {task!r}.{hint} task must be one of {', '.join(TASKS)} (or its index 0-3)")
    if isinstance(task, numbers.Integral) and not isinstance(task, bool):
        if 0 <= int(task) < len(TASKS):
            return int(task)
        raise ValueError(f"task index must lie in [0, {len(TASKS)}) ({', '.join(TASKS)}), got {task}")
    raise ValueError(f"task must be one of {', '.join(TASKS)} or its index, got {task!r} ({type(task).__name__})")


def task_name(task: TaskLike) -> str:
    """The name of a task given by name or index (validated as :func:`task_index` does)."""
    return TASKS[task_index(task)]


def __getattr__(name: str):
    if name in _TORCH:
        import importlib

        return getattr(importlib.import_module(_TORCH[name]), name)
    raise AttributeError(f"module 'samantic.models.tasks' has no attribute {name!r}")
