"""Weight-space blends of a fine-tune with its base model (WiSE-FT), against forgetting.

A fine-tune that learnt a new job (SUM's tasks) often loses some of the base model's old one (point
masks and segment-everything recall on plain scenes). Interpolating the weights,
``base + alpha * (fine_tune - base)``, keeps most of the new job at alpha 0.6-0.8 and gives back much of
the old (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022). Measured on SUM:
``benchmarks/results/sum_stability/README.md``.

The blend is a checkpoint that loads wherever the fine-tune does: the fine-tune's header is kept, with
``blend`` added (the alpha and both sources). A tensor only the fine-tune has (SUM's task table)
blends with zeros, the rows a base model is given when it loads into a model with a table, so alpha 0
is exactly the base model and alpha 1 exactly the fine-tune.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from samantic.models.loading import SAFETENSORS_SUFFIX, read_metadata, read_state_dict, resolve_checkpoint, save_checkpoint

__all__ = ["blend_state_dicts", "blend_checkpoint"]


def blend_state_dicts(base: Dict[str, torch.Tensor], tuned: Dict[str, torch.Tensor],
                      alpha: float) -> Dict[str, torch.Tensor]:
    """``base + alpha * (tuned - base)`` per floating-point tensor, in ``tuned``'s precision (exact at 0 and
    1); other tensors (counters) from ``tuned``.

    Raises:
        ValueError: alpha outside [0, 1], a tensor of the base missing from the fine-tune, or shapes
            or kinds (floating-point or not) that differ (the message names the tensor).
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (0: the base model, 1: the fine-tune), got {alpha:g}")
    missing = sorted(set(base) - set(tuned))
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"the fine-tune lacks {len(missing)} of the base model's tensors ({shown}): "
                         "is it a fine-tune of this base?")
    out: Dict[str, torch.Tensor] = {}
    for name, t in tuned.items():
        b = base.get(name)
        if b is None:
            b = torch.zeros_like(t)
        if b.shape != t.shape or b.is_floating_point() != t.is_floating_point():
            raise ValueError(f"{name}: the base model's tensor is {tuple(b.shape)} {b.dtype}, the fine-tune's "
                             f"{tuple(t.shape)} {t.dtype}: is it a fine-tune of this base?")
        # in the fine-tune's precision (shipped weights may be float16, fine-tunes train in float32); lerp is
        # exact at both ends: alpha 0 gives the base as the model loads it, alpha 1 the fine-tune, bit for bit
        out[name] = torch.lerp(b.to(t.dtype), t, alpha) if t.is_floating_point() else t.clone()
    return out


def blend_checkpoint(fine_tune: Union[str, Path], alpha: float, out: Union[str, Path], *,
                     base: Optional[str] = None) -> Path:
    """Writes the blend of ``fine_tune`` with its base model at ``alpha``, atomically.

    Args:
        fine_tune: a samantic checkpoint (e.g. from ``samantic train sum``).
        alpha: the fraction of the fine-tune's change kept (0: the base model, 1: the fine-tune).
        out: target ``.safetensors``.
        base: the base weights (any form :func:`~samantic.models.resolve_checkpoint` takes); default:
            the shipped weights of the model the fine-tune's header names.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: see :func:`blend_state_dicts`; a fine-tune with no registered model in its header
            and no ``base``; a base saved for another model. Messages name the files.
        FileNotFoundError: a file does not exist.
    """
    from samantic.models import get_model_entry

    fine_tune = resolve_checkpoint(Path(fine_tune))
    meta = read_metadata(fine_tune)
    model = meta.get("model")
    if base is None:
        if model is None:
            raise ValueError(f"{fine_tune}: its header names no registered model, so its base is unknown; "
                             "pass the base weights")
        base = get_model_entry(model).default_weights
    base_path = resolve_checkpoint(base, model)
    base_model = read_metadata(base_path).get("model") if base_path.suffix == SAFETENSORS_SUFFIX else None
    if model is not None and base_model is not None and base_model != model:
        raise ValueError(f"{base_path} holds weights of {base_model!r}, {fine_tune} of {model!r}: not its base")
    try:
        state = blend_state_dicts(read_state_dict(base_path), read_state_dict(fine_tune), alpha)
    except ValueError as e:
        raise ValueError(f"blending {fine_tune} with {base_path}: {e}") from None
    header = dict(meta)
    header["blend"] = json.dumps({"alpha": float(alpha), "fine_tune": str(fine_tune), "base": str(base_path)})
    return save_checkpoint(state, out, header)
