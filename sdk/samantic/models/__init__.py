"""SAM architectures: frozen configs, a timm-style registry, the weight table, checkpoint I/O.

Importing this package does not import torch; building a model does.

Example:
    >>> from samantic.models import create_model, list_models
    >>> list_models("sam_vit_*")
    ['sam_vit_b', 'sam_vit_h', 'sam_vit_l']
    >>> sam = create_model("sam_vit_b", "sam_vit_b.sa1b")  # doctest: +SKIP
"""

from samantic.models.configs import SamConfig
from samantic.models.loading import (
    load_checkpoint,
    read_metadata,
    read_state_dict,
    record_thresholds,
    recorded_input_size,
    recorded_thresholds,
    resolve_checkpoint,
    save_checkpoint,
)
from samantic.models.registry import (
    ModelEntry,
    build_sam,
    create_model,
    default_thresholds,
    get_config,
    get_model_entry,
    list_models,
    recommended_thresholds,
    register_model,
    thresholds_source,
)
from samantic.models.tasks import TASKS, task_index, task_name
from samantic.models.weights import (
    ChecksumError,
    DownloadError,
    VerifyResult,
    WeightSpec,
    get_weight,
    list_weights,
)

_TORCH = {"TaskPrompt", "add_task", "attach_task_prompt"}  # SUM's task table (samantic.models.task_prompt)

__all__ = [
    "ChecksumError",
    "DownloadError",
    "ModelEntry",
    "SamConfig",
    "TASKS",
    "TaskPrompt",
    "VerifyResult",
    "WeightSpec",
    "add_task",
    "attach_task_prompt",
    "build_sam",
    "create_model",
    "default_thresholds",
    "get_config",
    "get_model_entry",
    "get_weight",
    "list_models",
    "list_weights",
    "load_checkpoint",
    "read_metadata",
    "read_state_dict",
    "recommended_thresholds",
    "record_thresholds",
    "recorded_input_size",
    "recorded_thresholds",
    "register_model",
    "resolve_checkpoint",
    "save_checkpoint",
    "task_index",
    "task_name",
    "thresholds_source",
]


def __getattr__(name: str):
    if name in _TORCH:
        from samantic.models import task_prompt

        return getattr(task_prompt, name)
    raise AttributeError(f"module 'samantic.models' has no attribute {name!r}")
