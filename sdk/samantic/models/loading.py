"""Checkpoint files: resolve (path, weight tag or packaged file), read safely, load strictly, save.

Loading never executes pickled code: ``.pth`` files go through
``torch.load(..., weights_only=True)``; samantic writes safetensors only.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

from samantic.models import weights as _weights

if TYPE_CHECKING:
    import torch

__all__ = [
    "TORCH_SUFFIXES",
    "load_checkpoint",
    "read_metadata",
    "read_state_dict",
    "record_thresholds",
    "recorded_thresholds",
    "resolve_checkpoint",
    "save_checkpoint",
]

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
PACKAGE_PREFIX = "pkg:"
# Keys that training scripts commonly wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model")
_MAX_LISTED = 8

CheckpointLike = Union[str, "os.PathLike[str]"]


def resolve_checkpoint(
    checkpoint: CheckpointLike,
    model_name: Optional[str] = None,
    *,
    progress: bool = True,
) -> Path:
    """Turns a checkpoint reference into a local, existing file.

    Args:
        checkpoint: A file path; a weight tag such as ``"sam_vit_b.sa1b"``
            (downloaded to the cache and verified if missing); or
            ``"pkg:<path>"``, a file shipped inside the samantic package.
            A ``str`` that is a known tag is a tag, anything else a path.
        model_name: If given, a weight tag must belong to this model.
        progress: Show a progress bar if a download is needed.

    Returns:
        Path of the file.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The tag belongs to another model.
        DownloadError, ChecksumError: See :func:`samantic.models.weights.download`.
    """
    if isinstance(checkpoint, str):
        if checkpoint.startswith(PACKAGE_PREFIX):
            return _package_file(checkpoint[len(PACKAGE_PREFIX):])
        if _weights.is_weight_ref(checkpoint):
            spec = _weights.get_weight(checkpoint)
            if model_name is not None and spec.model != model_name:
                raise ValueError(
                    f"weights {spec.tag!r} are for model {spec.model!r}, not {model_name!r}; "
                    f"weights for {model_name!r}: "
                    f"{', '.join(s.tag for s in _weights.list_weights(model_name)) or 'none'}"
                )
            return _weights.download(spec, progress=progress)
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def read_state_dict(path: CheckpointLike) -> Dict[str, "torch.Tensor"]:
    """Reads a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    Args:
        path: ``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
            ``weights_only=True``. A state dict wrapped under ``"model"`` or
            ``"state_dict"`` is unwrapped.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Unknown suffix, unreadable file, or not a state dict.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ValueError(f"cannot read safetensors checkpoint {path}: {e}") from None
    elif suffix in TORCH_SUFFIXES:
        try:
            with warnings.catch_warnings():  # torch's note on an unusual pickle protocol: the error says it all
                warnings.simplefilter("ignore", UserWarning)
                data = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
            raise ValueError(f"cannot read checkpoint {path}: {_unpickle_reason(e)}") from None
    else:
        raise ValueError(
            f"unsupported checkpoint suffix {path.suffix!r} for {path}; "
            f"expected one of {', '.join((SAFETENSORS_SUFFIX,) + TORCH_SUFFIXES)}"
        )
    return _as_state_dict(data, path)


def _unpickle_reason(e: BaseException) -> str:
    """torch.load's refusal in one line, without its advice to retry with ``weights_only=False``."""
    text = str(e)
    if "Weights only load failed" not in text:
        return text.strip().splitlines()[0] if text.strip() else type(e).__name__
    after = text.split("WeightsUnpickler error:", 1)[1].strip() if "WeightsUnpickler error:" in text else ""
    detail = after.splitlines()[0].strip() if after else ""
    return ("it holds more than tensors (pickled code or objects, or the file is damaged) and samantic loads "
            ".pth/.pt files with torch.load(weights_only=True) only, so nothing in it ran"
            + (f" ({detail})" if detail else "") + "; if the file is yours and trusted, convert it to .safetensors")


def read_metadata(path: CheckpointLike) -> Dict[str, str]:
    """The string metadata stored in a safetensors header (``{}`` for other formats).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The safetensors header cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"cannot read safetensors header of {path}: {e}") from None


def recorded_input_size(path: CheckpointLike) -> Optional[int]:
    """The input side a samantic safetensors file's weights were trained at, from its header's ``config``
    (None: another format, no config recorded, or none readable).

    A convolutional encoder's weights fit any side (``samantic train sum --input-size``), so the side is not in the
    tensors' shapes; :func:`~samantic.models.create_model` builds such a file's model at the recorded side.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The safetensors header cannot be read.
    """
    saved = read_metadata(path).get("config")
    if not saved:
        return None
    try:
        side = json.loads(saved).get("img_size")
    except (ValueError, AttributeError):
        return None
    return side if isinstance(side, int) and side > 0 else None


THRESHOLDS_KEY = "thresholds"  # header entry: {task: {"pred_iou_thresh": .., "stability_score_thresh": ..[, "box_nms_thresh": ..]}}
THRESHOLD_NAMES = ("pred_iou_thresh", "stability_score_thresh")  # segment-everything's calibrated pair
# calibrated with the pair since `samantic eval thresholds --box-nms`; files and entries from before carry none
# (segment-anything's 0.7 then, what they were calibrated at)
OPTIONAL_THRESHOLD_NAMES = ("box_nms_thresh",)


def _check_thresholds(value: Any, where: str) -> Dict[str, float]:
    names = THRESHOLD_NAMES + OPTIONAL_THRESHOLD_NAMES
    if not isinstance(value, Mapping) or not set(THRESHOLD_NAMES) <= set(value) <= set(names) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= float(v) <= 1.0 for v in value.values()):
        raise ValueError(f"{where}: thresholds must be {{{', '.join(THRESHOLD_NAMES)}}} (and optionally "
                         f"{', '.join(OPTIONAL_THRESHOLD_NAMES)}), each in [0, 1]; got {value!r}")
    return {k: float(value[k]) for k in names if k in value}


def recorded_thresholds(path: CheckpointLike) -> Dict[str, Dict[str, float]]:
    """Segment-everything thresholds calibrated for a samantic safetensors file's weights, per SUM task
    (``{"unspecified": {"pred_iou_thresh": .., "stability_score_thresh": ..}, "part": {..}}``), as
    :func:`record_thresholds` wrote them; ``{}`` when the file records none (or is not safetensors).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The header cannot be read, or its ``thresholds`` entry is malformed (the message names the file).
    """
    return _parse_thresholds(read_metadata(path).get(THRESHOLDS_KEY), path)


def _parse_thresholds(saved: Optional[str], path: CheckpointLike) -> Dict[str, Dict[str, float]]:
    """:func:`recorded_thresholds` of a header's ``thresholds`` entry (``path`` names the file in errors)."""
    from samantic.models.tasks import TASKS

    if not saved:
        return {}
    try:
        data = json.loads(saved)
    except ValueError:
        raise ValueError(f"{path}: the header's {THRESHOLDS_KEY!r} entry is not JSON: {saved[:80]!r}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the header's {THRESHOLDS_KEY!r} entry must map task names to thresholds, got {saved[:80]!r}")
    out = {}
    for task, value in data.items():
        if task not in TASKS:
            raise ValueError(f"{path}: the header's {THRESHOLDS_KEY!r} entry names an unknown task {task!r} "
                             f"(tasks: {', '.join(TASKS)})")
        out[task] = _check_thresholds(value, f"{path}, task {task!r}")
    return out


def record_thresholds(path: CheckpointLike, thresholds: Mapping[str, float], task: str = "unspecified",
                      source: Optional[str] = None) -> Path:
    """Records segment-everything thresholds calibrated for ``task`` in a samantic safetensors file's header
    (other tasks' entries and every tensor kept), so that :func:`~samantic.models.create_model`, ``samantic segment``,
    :class:`~samantic.runtime.Segmenter` and exported bundles use them when the user gives none.

    The file is rewritten atomically (an interrupted run leaves the old file).

    Args:
        path: A ``.safetensors`` file written by samantic (``save_checkpoint``, ``samantic train ...``).
        thresholds: ``{"pred_iou_thresh": .., "stability_score_thresh": ..}``, optionally with ``"box_nms_thresh"``,
            each in [0, 1].
        task: The SUM task the thresholds were calibrated for (a name from ``TASKS`` or its index).
        source: How they were chosen (e.g. the ``samantic eval thresholds`` command), kept beside them.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not a safetensors file, bad thresholds, an unknown task, or a malformed header.
    """
    from safetensors.torch import load_file

    from samantic.models.tasks import task_name

    path = Path(path)
    name = task_name(task)
    value = _check_thresholds(thresholds, f"thresholds for {path}")
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        raise ValueError(f"{path}: thresholds are recorded in a {SAFETENSORS_SUFFIX} header; convert the file first "
                         f"(samantic writes {SAFETENSORS_SUFFIX})")
    header = read_metadata(path)
    table = _parse_thresholds(header.get(THRESHOLDS_KEY), path)
    table[name] = value
    header[THRESHOLDS_KEY] = json.dumps(table, sort_keys=True)
    if source is not None:
        sources = {}
        try:
            sources = json.loads(header.get("thresholds_source", "{}"))
        except ValueError:
            pass
        sources = sources if isinstance(sources, dict) else {}
        sources[name] = source
        header["thresholds_source"] = json.dumps(sources, sort_keys=True)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise ValueError(f"cannot read the tensors of {path}: {e}") from None
    return save_checkpoint(tensors, path, metadata=header)


def _same_architecture(saved_config: Optional[str], config) -> bool:
    """Whether a checkpoint's recorded config is ``config``: registered models that share one architecture
    (``sam_nano`` and ``sam_nano_panoptic``) load each other's weights."""
    if not saved_config or config is None:
        return False
    try:
        return json.loads(saved_config) == json.loads(config.to_json())
    except (TypeError, ValueError):
        return False


def load_checkpoint(
    model: "torch.nn.Module",
    checkpoint: CheckpointLike,
    *,
    model_name: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Loads weights into ``model`` strictly: every key present, none extra, every shape equal.

    One exception, SUM's task table (:mod:`samantic.models.tasks`): a checkpoint that
    holds ``task_prompt.*`` keys gives a model without a table one
    (:func:`~samantic.models.tasks.attach_task_prompt`), and a model with a table loads a
    checkpoint without one (official, shipped) with the table set to zeros, which makes
    every task decode as the base model.

    Args:
        model: The module, e.g. from :func:`~samantic.models.create_model`. A
            model built on the ``meta`` device gets the checkpoint's tensors
            assigned.
        checkpoint: See :func:`resolve_checkpoint`.
        model_name: Registered name of ``model``; checked against weight tags
            and the ``model`` entry of samantic's safetensors metadata.
            Defaults to ``model.samantic_name`` if set.
        progress: Show a progress bar if a download is needed.

    Returns:
        Path of the loaded file.

    Raises:
        ValueError: The checkpoint does not fit; the message names the file and
            lists missing keys, unexpected keys and shape mismatches.
        FileNotFoundError: The file does not exist.
    """
    if model_name is None:
        model_name = getattr(model, "samantic_name", None)
    path = resolve_checkpoint(checkpoint, model_name, progress=progress)
    meta = read_metadata(path)
    saved_for = meta.get("model")
    if model_name is not None and saved_for is not None and saved_for != model_name \
            and not _same_architecture(meta.get("config"), getattr(model, "samantic_config", None)):
        raise ValueError(f"checkpoint {path} was saved for model {saved_for!r}, not {model_name!r} (another "
                         "architecture)")
    state = read_state_dict(path)
    attached = _task_table(model, state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        target = f"model {model_name!r}" if model_name else "the model"
        problems = [
            _listing("missing key", missing),
            _listing("unexpected key", unexpected),
            _listing("shape mismatch", mismatched, plural="shape mismatches"),
        ]
        if attached:
            del model.task_prompt  # a failed load leaves the model as it was
        raise ValueError(
            f"checkpoint {path} does not fit {target}: " + "; ".join(p for p in problems if p)
        )
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(state, strict=True, assign=on_meta)
    return path


def save_checkpoint(
    model: Union["torch.nn.Module", Mapping],
    path: CheckpointLike,
    metadata: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Writes a model's state dict as safetensors, atomically.

    The header records ``format``, the samantic version and, when the model
    came from :func:`~samantic.models.create_model`, its registered ``model``
    name and its ``config`` as JSON.

    Args:
        model: A module or a ``{name: tensor}`` mapping.
        path: Target file; must end in ``.safetensors``.
        metadata: Extra header entries; values that are not ``str`` are
            stored as JSON. They override the automatic entries.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: Wrong suffix, non-string metadata keys, or tensors on the
            ``meta`` device.
    """
    from safetensors.torch import save_file

    from samantic import __version__

    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ValueError(f"samantic saves checkpoints as {SAFETENSORS_SUFFIX}, got {path}")
    header: Dict[str, str] = {"format": "samantic", "samantic_version": __version__}
    name = getattr(model, "samantic_name", None)
    config = getattr(model, "samantic_config", None)
    if name is not None:
        header["model"] = name
    if config is not None:
        header["config"] = config.to_json()
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"metadata keys must be str, got {key!r}")
        header[key] = value if isinstance(value, str) else json.dumps(value)

    state = model.state_dict() if hasattr(model, "state_dict") else dict(model)
    on_meta = [k for k, t in state.items() if t.is_meta]
    if on_meta:
        raise ValueError(f"cannot save tensors on the meta device: {_names(on_meta)}")
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in state.items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _task_table(model: "torch.nn.Module", state: Dict[str, "torch.Tensor"]) -> bool:
    """SUM's task table: attached when the checkpoint has one (returns True if it was attached here),
    zero rows in ``state`` (the base model) when only the model has one."""
    import torch

    from samantic.models.tasks import TASK_PREFIX

    attached = False
    if getattr(model, "task_prompt", None) is None and hasattr(model, "prompt_encoder"):
        if any(k.startswith(TASK_PREFIX) for k in state):
            from samantic.models.task_prompt import attach_task_prompt

            attach_task_prompt(model)
            attached = True
    for k, v in model.state_dict().items():
        if k.startswith(TASK_PREFIX) and k not in state:
            state[k] = torch.zeros(v.shape, dtype=v.dtype)
    return attached


def _as_state_dict(data: Any, path: Path) -> Dict[str, "torch.Tensor"]:
    import torch

    if isinstance(data, Mapping) and not any(isinstance(v, torch.Tensor) for v in data.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping):
        raise ValueError(f"checkpoint {path} does not hold a state dict (got {type(data).__name__})")
    bad = [str(k) for k, v in data.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise ValueError(f"checkpoint {path} is not a flat name -> tensor state dict; bad entries: {_names(bad)}")
    return dict(data)


def _package_file(relative: str) -> Path:
    from importlib import resources

    path = Path(str(resources.files("samantic").joinpath(relative)))
    if not path.is_file():
        raise FileNotFoundError(f"packaged checkpoint not found: {path} ({PACKAGE_PREFIX}{relative})")
    return path


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown}, ... and {more} more" if more > 0 else shown


def _listing(what: str, items: List[str], plural: Optional[str] = None) -> str:
    if not items:
        return ""
    label = what if len(items) == 1 else (plural or what + "s")
    return f"{len(items)} {label} ({_names(items)})"
