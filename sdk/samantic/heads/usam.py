"""U-SAM's classifier head: SAM's per-mask token -> K class logits + "none of these".

The head reads only the decoder's output mask token of a (prompt, mask) pair,
which exists before any mask is upscaled, so a pipeline can drop masks of
unrequested classes right after the transformer (see
:class:`~samantic.pipeline.scoring.MaskScorer`).

A head file is safetensors with its description in the header:
``classes`` (JSON list), ``groups`` (JSON {superclass: [class, ...]}),
``score_thresh``, ``token_dim`` and ``model`` (the SAM it was trained on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from samantic.pipeline.scoring import NONE_CLASS, ScoredMasks, check_class_names  # noqa: F401 (re-exported)

HEAD_FORMAT = "samantic.usam_head.v1"


def parse_groups(specs: Sequence[str]) -> Dict[str, Tuple[str, ...]]:
    """``["round=circle,ring", ...]`` -> {"round": ("circle", "ring")}; every member must be a known class."""
    groups: Dict[str, Tuple[str, ...]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"a group must look like NAME=class1,class2, got {spec!r}")
        name, members = spec.split("=", 1)
        name = name.strip()
        if not name:
            raise ValueError(f"group {spec!r} has no name")
        if name in groups:
            raise ValueError(f"group {name!r} is given twice")
        groups[name] = check_class_names(members, what=f"group {name!r}")
    return groups


@dataclass
class HeadInfo:
    """What a head file says about itself."""

    classes: Tuple[str, ...]
    groups: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    score_thresh: float = 0.5
    token_dim: int = 256
    hidden_dim: int = 256
    model: str = ""
    extra: Dict[str, str] = field(default_factory=dict)

    def to_metadata(self) -> Dict[str, str]:
        meta = {
            "format": HEAD_FORMAT,
            "classes": json.dumps(list(self.classes)),
            "groups": json.dumps({k: list(v) for k, v in self.groups.items()}),
            "score_thresh": json.dumps(self.score_thresh),
            "token_dim": str(self.token_dim),
            "hidden_dim": str(self.hidden_dim),
            "model": self.model,
        }
        meta.update(self.extra)
        return meta

    @staticmethod
    def from_metadata(meta: Dict[str, str], source: str = "head") -> "HeadInfo":
        if meta.get("format") != HEAD_FORMAT:
            raise ValueError(f"{source}: not a samantic U-SAM head (format {meta.get('format')!r}, expected {HEAD_FORMAT!r})")
        known = {"format", "classes", "groups", "score_thresh", "token_dim", "hidden_dim", "model"}
        return HeadInfo(
            classes=tuple(json.loads(meta["classes"])),
            groups={k: tuple(v) for k, v in json.loads(meta.get("groups", "{}")).items()},
            score_thresh=float(json.loads(meta.get("score_thresh", "0.5"))),
            token_dim=int(meta["token_dim"]),
            hidden_dim=int(meta.get("hidden_dim", "256")),
            model=meta.get("model", ""),
            extra={k: v for k, v in meta.items() if k not in known},
        )


class UsamHead(nn.Module):
    """MLP on a mask token: ``[K, D] -> [K, C + 1]`` logits; the last column is "none of these"."""

    def __init__(self, info: HeadInfo) -> None:
        super().__init__()
        self.info = info
        d, h, c = info.token_dim, info.hidden_dim, len(info.classes)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, c + 1))

    @property
    def classes(self) -> Tuple[str, ...]:
        return self.info.classes

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(tokens))

    def check_model(self, sam, model_name: str, source: Union[str, Path] = "head") -> None:
        """Refuses a SAM other than the one this head was trained on (the tokens would mean nothing)."""
        dim = int(sam.prompt_encoder.embed_dim)
        if self.info.token_dim != dim or (self.info.model and self.info.model != model_name):
            raise ValueError(f"{source}: the head was trained on {self.info.model or 'another model'} (token dim "
                             f"{self.info.token_dim}), not {model_name} (token dim {dim})")

    def save(self, path: Union[str, Path]) -> Path:
        from samantic.models import save_checkpoint

        return save_checkpoint(self.state_dict(), path, metadata=self.info.to_metadata())


def load_head(path: Union[str, Path], map_location: str = "cpu") -> UsamHead:
    """Reads a head file written by :meth:`UsamHead.save` (errors name the file and the problem)."""
    from samantic.heads._files import read_head_file

    path, meta, state = read_head_file(path, "head", map_location)
    head = UsamHead(HeadInfo.from_metadata(meta, str(path)))
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: head weights do not match its description (missing {missing}, unexpected {unexpected})")
    return head.eval()


class HeadScorer:
    """Turns a head into a :class:`~samantic.pipeline.scoring.MaskScorer` for the torch pipeline.

    The head's logits go through :class:`~samantic.pipeline.scoring.ClassLogitScorer`
    (the same numpy rule every backend uses): a mask is kept when its best requested
    class or group beats "anything else" and reaches ``score_thresh``.

    Args:
        head: a :class:`UsamHead`.
        names: requested names: the head's classes and/or its groups (None: all classes).
        score_thresh: None to use the head's own threshold.
    """

    def __init__(self, head: UsamHead, names: Optional[Sequence[str]] = None, score_thresh: Optional[float] = None) -> None:
        from samantic.pipeline.scoring import ClassLogitScorer

        if names is not None:
            names = check_class_names(names, what="requested class list")
        info = head.info
        self.head = head
        self.rule = ClassLogitScorer(info.classes, info.groups, names,
                                     info.score_thresh if score_thresh is None else score_thresh)
        self.names = self.rule.names

    def logits(self, tokens: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.head(tokens.to(next(self.head.parameters()).dtype)).float().cpu().numpy()

    def __call__(self, mask_tokens, iou_preds) -> ScoredMasks:
        return self.rule(self.logits(mask_tokens), iou_preds)
