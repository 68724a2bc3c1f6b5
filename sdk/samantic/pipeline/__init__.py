"""The grid-prompted segment-everything pipeline that every semantic head plugs into.

Importing this package does not import torch: the shared pipeline
(:mod:`~samantic.pipeline.generator`), grids, transforms and scoring hooks are
numpy-only, and the torch names below load their modules on first use.
"""

from samantic.pipeline.config import AmgConfig
from samantic.pipeline.engine import Engine, PromptOutputs
from samantic.pipeline.generator import MaskGenerator, MaskSet
from samantic.pipeline.scoring import ClassLogitScorer, MaskScorer, ScoredMasks

_TORCH = {
    "AutomaticMaskGenerator": "samantic.pipeline.amg",
    "TorchEngine": "samantic.pipeline.amg",
    "DecoderOutput": "samantic.pipeline.decoder",
    "PromptMaskDecoder": "samantic.pipeline.decoder",
    "Predictor": "samantic.pipeline.predictor",
}

__all__ = [
    "AmgConfig",
    "ClassLogitScorer",
    "Engine",
    "MaskGenerator",
    "MaskScorer",
    "MaskSet",
    "PromptOutputs",
    "ScoredMasks",
    *_TORCH,
]


def __getattr__(name: str):
    if name in _TORCH:
        import importlib

        return getattr(importlib.import_module(_TORCH[name]), name)
    raise AttributeError(f"module 'samantic.pipeline' has no attribute {name!r}")
